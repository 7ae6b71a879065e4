"""Re-framing: segment again with the chest where the model expects it.

A model trained on one database learns its framing: JSRT's chests fill most of a
square frame, centred. Images framed otherwise (more abdomen and neck in view, the
patient off-centre, another aspect ratio padded to a square) fall outside it, and
the landmarks come out as a JSRT-shaped guess in the wrong place (``chexmask
evaluate --ood``: Dice of the lungs 0.55 on zoomed-out images, 0.92 on shifted ones).

The model's own latent tells when that happens. ``Framing.distance`` is how far an
image's latent mean lies from those of the training images (root mean squared
z-score over the 64 dimensions); a distance above the training images' own 99th
percentile marks an image the model has not understood. Only such images are
segmented again (``reframe``), from two starts, each an affine warp of the
1024 frame that brings the predicted landmarks' bounding box onto the training
landmarks' median box:

- from the first result, once;
- from a centred zoom-in (``Framing.zoom``), re-framed ``Framing.passes - 1`` times:
  when the first guess is nowhere near the chest, a closer look finds it, and each
  pass moves the box closer.

Of the first result and the two candidates, the one with the smallest latent
distance wins, and its landmarks are mapped back to the original frame. Images the
model understands the first time (nearly all JSRT-like ones) keep their first result
exactly and cost nothing more; the others cost up to ``2 + passes`` forward passes.
The numbers are in the model card (``chexmask evaluate --ood``).
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from chexmask.anatomy import FRAME
from chexmask.worker.model import HybridGNet, segment_batch, segment_with_uncertainty

THRESHOLD_PERCENTILE = 99  # of the training images' latent distances


@dataclass(frozen=True)
class Framing:
    """What a model's training images looked like to it (fitted by
    ``scripts/fit_framing.py``, kept in the weights' manifest)."""

    box: tuple[float, float, float, float]  # median landmark box: centre x, centre y, width, height (1024 px)
    latent_mean: np.ndarray  # [64] of the training images' latent means
    latent_std: np.ndarray  # [64]
    threshold: float  # latent distance above which an image is re-framed
    zoom: float = 1.45  # the second start: a centred zoom-in
    passes: int = 3  # forward passes from that start

    def distance(self, latent: np.ndarray) -> float:
        z = (np.asarray(latent, np.float64) - self.latent_mean) / self.latent_std
        return float(np.sqrt(np.mean(z * z)))

    def towards(self, landmarks: np.ndarray) -> np.ndarray:
        """The 2x3 affine that scales (one factor, by area) and shifts the bounding box
        of ``landmarks`` (pixels of the 1024 frame) onto ``box``."""
        low, high = landmarks.min(0), landmarks.max(0)
        centre, size = (low + high) / 2, np.maximum(high - low, 1.0)
        cx, cy, width, height = self.box
        scale = float(np.sqrt(width * height / (size[0] * size[1])))
        return np.array([[scale, 0.0, cx - scale * centre[0]], [0.0, scale, cy - scale * centre[1]]])

    def to_json(self) -> dict:
        return {
            "box": [round(float(v), 3) for v in self.box],
            "latent_mean": [round(float(v), 6) for v in self.latent_mean],
            "latent_std": [round(float(v), 6) for v in self.latent_std],
            "threshold": round(self.threshold, 4),
            "zoom": self.zoom,
            "passes": self.passes,
        }

    @classmethod
    def from_json(cls, entry: dict) -> Framing:
        return cls(
            box=tuple(float(v) for v in entry["box"]),  # type: ignore[arg-type]
            latent_mean=np.asarray(entry["latent_mean"], np.float64),
            latent_std=np.asarray(entry["latent_std"], np.float64),
            threshold=float(entry["threshold"]),
            zoom=float(entry.get("zoom", 1.45)),
            passes=int(entry.get("passes", 3)),
        )

    @classmethod
    def fit(cls, landmarks: np.ndarray, latents: np.ndarray) -> Framing:
        """From the training images' true landmarks [N,120,2] (1024 px) and latents [N,64]."""
        low, high = landmarks.min(1), landmarks.max(1)
        box = np.median(np.concatenate([(low + high) / 2, high - low], axis=1), axis=0)
        mean, std = latents.mean(0), latents.std(0) + 1e-6
        distances = np.sqrt((((latents - mean) / std) ** 2).mean(1))
        threshold = float(np.percentile(distances, THRESHOLD_PERCENTILE))
        return cls(tuple(float(v) for v in box), mean, std, threshold)  # type: ignore[arg-type]


def warp(image: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """The 1024 image under ``matrix``, black outside it as the preprocessing's padding is."""
    return cv2.warpAffine(image, matrix, (FRAME, FRAME), flags=cv2.INTER_LINEAR, borderValue=(0,))


def unwarp(points: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """Points found in the warped image, in the original 1024 frame."""
    inverse = cv2.invertAffineTransform(matrix)
    return (points @ inverse[:, :2].T + inverse[:, 2]).astype(np.float32)


def zoom_matrix(scale: float) -> np.ndarray:
    return cv2.getRotationMatrix2D((FRAME / 2, FRAME / 2), 0.0, scale)


@dataclass
class Framed:
    """One pass's result: landmarks in the 1024 frame of the image (pixels), its
    latent and that latent's distance from the training images'."""

    landmarks: np.ndarray
    latent: np.ndarray
    std: np.ndarray | None  # per-landmark spread (pixels of the image's frame) when sampled
    distance: float


def _look(model: HybridGNet, image: np.ndarray, matrix: np.ndarray, framing: Framing, samples: int) -> Framed:
    """One forward pass of the image warped by ``matrix``, mapped back to its frame."""
    seen = warp(image, matrix)[None]
    std = None
    if samples:
        landmarks, latents, stds = segment_with_uncertainty(model, seen, samples)
        std = stds[0] / np.sqrt(abs(np.linalg.det(matrix[:, :2])))  # back to the image's scale
    else:
        landmarks, latents = segment_batch(model, seen)
    return Framed(unwarp(landmarks[0] * FRAME, matrix), latents[0], std, framing.distance(latents[0]))


def reframe(model: HybridGNet, image: np.ndarray, first: Framed, framing: Framing, samples: int = 0) -> Framed:
    """The result for one preprocessed uint8 [1024,1024] image the model did not
    understand (``first``, its plain result, is too far from the training latents):
    of ``first`` and the two re-framed candidates, the closest (see the module doc).
    With ``samples``, each pass also draws that many latents for the uncertainty."""
    candidates = [first, _look(model, image, framing.towards(first.landmarks), framing, samples)]
    closer = _look(model, image, zoom_matrix(framing.zoom), framing, samples)
    for _ in range(framing.passes - 1):
        closer = _look(model, image, framing.towards(closer.landmarks), framing, samples)
    candidates.append(closer)
    return min(candidates, key=lambda c: c.distance)


def segment_reframed(
    model: HybridGNet, images: np.ndarray, framing: Framing, samples: int = 0, together: bool = False
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray]:
    """``segment_batch`` (or, with ``samples``, ``segment_with_uncertainty``) with each
    image the model did not understand re-framed: landmarks [B,120,2] in [0,1] units of
    the image's 1024 frame, latents [B,64], std [B,120] or None, and each image's first
    latent distance [B] (re-framed where above ``framing.threshold``). The others keep
    their plain result, bit for bit."""
    if samples:
        landmarks, latents, stds = segment_with_uncertainty(model, images, samples)
    else:
        (landmarks, latents), stds = segment_batch(model, images, together), None
    distances = np.array([framing.distance(z) for z in latents])
    for i, image in enumerate(images):
        if distances[i] <= framing.threshold:
            continue
        first = Framed(landmarks[i] * FRAME, latents[i], None if stds is None else stds[i], distances[i])
        best = reframe(model, image, first, framing, samples)
        landmarks[i], latents[i] = best.landmarks / FRAME, best.latent
        if stds is not None and best.std is not None:
            stds[i] = best.std
    return landmarks, latents, stds, distances
