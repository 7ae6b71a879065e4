"""Augmentation for images that are not JSRT: other framing (zoom, shift, other aspect
ratios, rotation), collimation borders, burnt-in text and markers, and other
acquisition and processing (gamma, contrast, unsharp masking, equalisation, noise,
blur, JPEG artefacts).

Every transform takes and returns a uint8 [1024,1024] image and its [120,2] landmarks
(x, y pixels of the 1024 frame) and draws its randomness from a ``numpy.random.Generator``
only, so a seed fixes the result. Geometric transforms are affine maps applied to both
with the same matrix; the others leave the landmarks as they are.

``world`` is the training policy (a random subset of everything); ``CONDITIONS`` are the
single, stronger transforms of the out-of-distribution validation set (``ood_sample``).
"""

from __future__ import annotations

import string
import zlib
from collections.abc import Callable

import cv2
import numpy as np

from chexmask.anatomy import FRAME

Points = np.ndarray  # [120,2] float32, (x, y) pixels of the 1024 frame
Transform = Callable[[np.ndarray, Points, np.random.Generator], tuple[np.ndarray, Points]]

CENTRE = (FRAME / 2, FRAME / 2)


# ---------------------------------------------------------------------------
# Geometry: one affine matrix for image and landmarks


def warp(image: np.ndarray, points: Points, matrix: np.ndarray) -> tuple[np.ndarray, Points]:
    """Apply the 2x3 affine ``matrix`` to the image (black outside it, as padding is)
    and to the landmarks."""
    out = cv2.warpAffine(image, matrix, (FRAME, FRAME), flags=cv2.INTER_LINEAR, borderValue=(0,))
    return out, (points @ matrix[:, :2].T + matrix[:, 2]).astype(np.float32)


def zoom(image: np.ndarray, points: Points, scale: float) -> tuple[np.ndarray, Points]:
    """Scale about the centre: < 1 shows more around the chest (neck, abdomen, arms),
    > 1 crops closer."""
    return warp(image, points, cv2.getRotationMatrix2D(CENTRE, 0.0, scale))


def rotate(image: np.ndarray, points: Points, degrees: float) -> tuple[np.ndarray, Points]:
    return warp(image, points, cv2.getRotationMatrix2D(CENTRE, degrees, 1.0))


def shift(image: np.ndarray, points: Points, dx: float, dy: float) -> tuple[np.ndarray, Points]:
    return warp(image, points, np.array([[1, 0, dx], [0, 1, dy]], np.float64))


def reframe(image: np.ndarray, points: Points, box: tuple[float, float, float, float]) -> tuple[np.ndarray, Points]:
    """What the preprocessing makes of an image of another aspect ratio: the region
    ``box`` = (x, y, width, height) of the frame (it may reach outside it: more
    padding) becomes the image, padded to a centred square and resized to 1024."""
    x, y, w, h = box
    s = FRAME / max(w, h)
    matrix = np.array([[s, 0, (FRAME - s * w) / 2 - s * x], [0, s, (FRAME - s * h) / 2 - s * y]], np.float64)
    cut = image.copy()
    x0, y0, x1, y1 = (int(round(v)) for v in (x, y, x + w, y + h))
    cut[:, : max(x0, 0)] = 0
    cut[:, max(x1, 0) :] = 0
    cut[: max(y0, 0)] = 0
    cut[max(y1, 0) :] = 0
    return warp(cut, points, matrix)


def random_zoom(image, points, rng, low=0.6, high=1.15):
    return zoom(image, points, rng.uniform(low, high))


def random_rotation(image, points, rng, limit=15.0):
    return rotate(image, points, rng.uniform(-limit, limit))


def random_shift(image, points, rng, low=0.10, high=0.25):
    """A translation of 10-25% of the frame in a random direction."""
    angle = rng.uniform(0, 2 * np.pi)
    distance = rng.uniform(low, high) * FRAME
    return shift(image, points, distance * np.cos(angle), distance * np.sin(angle))


def random_aspect(image, points, rng, low=0.65, high=0.95):
    """Crop to a portrait or landscape rectangle (width / height or height / width in
    [low, high]) that keeps the organs, then pad to square as preprocessing does."""
    ratio = rng.uniform(low, high)
    left, top = points.min(0)
    right, bottom = points.max(0)
    if rng.random() < 0.5:  # portrait: narrower than tall (cut the sides)
        w, h = FRAME * ratio, float(FRAME)
        x = rng.uniform(min(0.0, right - w), max(0.0, min(left, FRAME - w)))
        y = 0.0
    else:  # landscape: less tall than wide (cut above and below)
        w, h = float(FRAME), FRAME * ratio
        x = 0.0
        y = rng.uniform(min(0.0, bottom - h), max(0.0, min(top, FRAME - h)))
    return reframe(image, points, (x, y, w, h))


# ---------------------------------------------------------------------------
# Things burnt into the image: the landmarks stay where they are


def collimate(image: np.ndarray, points: Points, rng: np.random.Generator, value: int | None = None) -> np.ndarray:
    """Collimation borders: flat bands along some edges, up to the organs but not over
    them, dark (unexposed) or bright (shutters in MONOCHROME1-like output)."""
    out = image.copy()
    left, top = np.maximum(points.min(0), 0)
    right, bottom = np.minimum(points.max(0), FRAME)
    fill = int(value if value is not None else (rng.integers(0, 40) if rng.random() < 0.7 else rng.integers(200, 256)))
    room = {"left": left, "top": top, "right": FRAME - right, "bottom": FRAME - bottom}
    sides = [s for s in room if rng.random() < 0.6] or [str(rng.choice(list(room)))]
    for side in sides:
        width = int(rng.uniform(0.3, 0.9) * max(room[side] - 8, 0))
        if width <= 0:
            continue
        if side == "left":
            out[:, :width] = fill
        elif side == "right":
            out[:, FRAME - width :] = fill
        elif side == "top":
            out[:width] = fill
        else:
            out[FRAME - width :] = fill
    return out


def burn_text(image: np.ndarray, rng: np.random.Generator, items: int | None = None) -> np.ndarray:
    """Burnt-in annotations: side markers (L/R), words, dates, and filled rectangles
    (lead markers, labels), bright or dark, anywhere in the frame."""
    out = image.copy()
    words = ["L", "R", "AP", "PA", "PORTABLE", "SUPINE", "ERECT", "CHEST", "LEFT", "RT"]
    for _ in range(items if items is not None else int(rng.integers(1, 5))):
        colour = (int(rng.integers(220, 256)) if rng.random() < 0.8 else int(rng.integers(0, 30)),)
        x, y = (int(v) for v in rng.integers(0, FRAME - 60, size=2))
        kind = rng.random()
        if kind < 0.5:
            text = str(rng.choice(words))
        elif kind < 0.75:
            text = f"{rng.integers(1, 29):02d}/{rng.integers(1, 13):02d}/{rng.integers(1990, 2025)}"
        else:
            text = "".join(rng.choice(list(string.ascii_uppercase + string.digits), size=int(rng.integers(3, 9))))
        if rng.random() < 0.3:
            w, h = (int(v) for v in rng.integers(20, 90, size=2))
            cv2.rectangle(out, (x, y), (x + w, y + h), colour, -1 if rng.random() < 0.6 else 3)
        else:
            scale = rng.uniform(0.8, 3.0)
            cv2.putText(out, text, (x, y + 40), cv2.FONT_HERSHEY_SIMPLEX, scale, colour, int(rng.integers(1, 6)))
    return out


# ---------------------------------------------------------------------------
# Acquisition and processing: the landmarks stay where they are


def _unit(image: np.ndarray) -> np.ndarray:
    return image.astype(np.float32) / 255


def _uint8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.round(x * 255), 0, 255).astype(np.uint8)


def gamma_contrast(image: np.ndarray, gamma: float, contrast: float, brightness: float) -> np.ndarray:
    x = _unit(image) ** gamma
    return _uint8((x - 0.5) * contrast + 0.5 + brightness)


def unsharp(image: np.ndarray, sigma: float, amount: float) -> np.ndarray:
    """Unsharp masking with a wide kernel: the edge-enhanced, flattened look of
    processed CR/DR images."""
    x = _unit(image)
    return _uint8(x + amount * (x - cv2.GaussianBlur(x, (0, 0), sigma)))


def equalise(image: np.ndarray, clip: float) -> np.ndarray:
    """Local histogram equalisation (CLAHE): another processing style."""
    return cv2.createCLAHE(clipLimit=clip, tileGridSize=(8, 8)).apply(image)


def noise(image: np.ndarray, rng: np.random.Generator, sigma: float) -> np.ndarray:
    return _uint8(_unit(image) + rng.normal(0, sigma, image.shape).astype(np.float32))


def blur(image: np.ndarray, sigma: float) -> np.ndarray:
    return cv2.GaussianBlur(image, (0, 0), sigma)


def jpeg(image: np.ndarray, quality: int) -> np.ndarray:
    ok, encoded = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, quality])
    assert ok  # encoding a uint8 grey image cannot fail
    return cv2.imdecode(encoded, cv2.IMREAD_GRAYSCALE)


def random_gamma_contrast(image, rng):
    return gamma_contrast(image, rng.uniform(0.5, 2.0), rng.uniform(0.6, 1.5), rng.uniform(-0.15, 0.15))


def random_processing(image, rng):
    if rng.random() < 0.6:
        return unsharp(image, rng.uniform(8, 40), rng.uniform(0.5, 2.5))
    return equalise(image, rng.uniform(1.5, 4.0))


def random_degradation(image, rng):
    """Some of noise, blur and JPEG artefacts."""
    if rng.random() < 0.5:
        image = blur(image, rng.uniform(0.5, 3.0))
    if rng.random() < 0.5:
        image = noise(image, rng, rng.uniform(0.01, 0.06))
    if rng.random() < 0.5:
        image = jpeg(image, int(rng.integers(10, 60)))
    return image


# ---------------------------------------------------------------------------
# Policies


def organs_visible(points: Points, margin: float = 0.03) -> bool:
    """Every landmark within the frame, up to a small margin: real images show the chest."""
    limit = margin * FRAME
    return bool((points >= -limit).all() and (points <= FRAME + limit).all())


def _geometric(image, points, rng, transform: Transform, tries: int = 10):
    """``transform`` redrawn until the organs stay in view (unchanged if they never do)."""
    for _ in range(tries):
        moved, moved_points = transform(image, points, rng)
        if organs_visible(moved_points):
            return moved, moved_points
    return image, points


def world(image: np.ndarray, points: Points, rng: np.random.Generator) -> tuple[np.ndarray, Points]:
    """The training augmentation: each kind of difference with its own probability, so
    most samples combine a few and about one in ten stays close to the original."""
    for p, transform in (
        (0.5, random_zoom),
        (0.3, random_aspect),
        (0.5, random_rotation),
        (0.4, lambda i, q, r: random_shift(i, q, r, 0.0, 0.25)),
    ):
        if rng.random() < p:
            image, points = _geometric(image, points, rng, transform)
    if rng.random() < 0.3:
        image = collimate(image, points, rng)
    if rng.random() < 0.4:
        image = burn_text(image, rng)
    if rng.random() < 0.7:
        image = random_gamma_contrast(image, rng)
    if rng.random() < 0.4:
        image = random_processing(image, rng)
    if rng.random() < 0.5:
        image = random_degradation(image, rng)
    return image, points


def basic(image: np.ndarray, points: Points, rng: np.random.Generator) -> tuple[np.ndarray, Points]:
    """The original training augmentation (chexmask-jsrt-v1/v2): a small random affine
    (rotation +-8 degrees, scale 0.9-1.1, shift +-40 px), then gamma and contrast."""
    matrix = np.asarray(cv2.getRotationMatrix2D(CENTRE, rng.uniform(-8, 8), rng.uniform(0.9, 1.1)), np.float64)
    matrix[:, 2] += rng.uniform(-40, 40, size=2)
    image, points = warp(image, points, matrix)
    x = np.clip((_unit(image) ** rng.uniform(0.7, 1.4)) * rng.uniform(0.85, 1.15) + rng.uniform(-0.08, 0.08), 0, 1)
    return (x * 255).astype(np.uint8), points


POLICIES: dict[str, Transform | None] = {"none": None, "basic": basic, "world": world}


# ---------------------------------------------------------------------------
# The out-of-distribution validation conditions: one kind of difference each, strong


def _photometric(f: Callable[[np.ndarray, np.random.Generator], np.ndarray]) -> Transform:
    return lambda image, points, rng: (f(image, rng), points)


CONDITIONS: dict[str, Transform] = {
    "zoomed_out": lambda i, q, r: zoom(i, q, r.uniform(0.6, 0.75)),
    "shifted": lambda i, q, r: _geometric(i, q, r, lambda i2, q2, r2: random_shift(i2, q2, r2, 0.10, 0.25)),
    "cropped_aspect": random_aspect,
    "collimated": lambda i, q, r: (collimate(i, q, r), q),
    "text_markers": _photometric(lambda i, r: burn_text(i, r, items=int(r.integers(3, 7)))),
    "rotated": lambda i, q, r: _geometric(
        i, q, r, lambda i2, q2, r2: rotate(i2, q2, r2.choice([-1, 1]) * r2.uniform(8, 15))
    ),
    "gamma_contrast": _photometric(random_gamma_contrast),
    "processed": _photometric(lambda i, r: unsharp(i, r.uniform(15, 40), r.uniform(1.0, 2.5))),
    "noise_blur_jpeg": _photometric(
        lambda i, r: jpeg(noise(blur(i, r.uniform(1.0, 2.5)), r, r.uniform(0.02, 0.05)), int(r.integers(15, 40)))
    ),
}


def ood_sample(image: np.ndarray, points: Points, condition: str, image_id: str, seed: int = 0):
    """The OOD validation version of one image under one condition: the same for the
    same (condition, image id, seed) on every machine."""
    rng = np.random.default_rng([seed, zlib.crc32(condition.encode()), zlib.crc32(image_id.encode())])
    return CONDITIONS[condition](image, points.astype(np.float32), rng)
