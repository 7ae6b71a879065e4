"""Cheap anatomical plausibility checks of one predicted landmark set.

Each check yields a short flag code when it fails; every measured quantity
goes into ``scores``. The checks need no image: contour self-intersections,
organ areas and ratios, the heart's position relative to the lungs, and a
shape-outlier score from a statistical shape model (PCA of Procrustes-aligned
reference landmarks) that the reference bank carries.

``check_image`` adds what the masks cannot tell: an inverted, occluded or
non-frontal input image.

Fixed ranges are wide on purpose: they bracket the JSRT ground truth (lung
area 18-46 % of the frame, heart/lungs 0.18-0.52, left/right lung 0.54-1.00)
with room for other populations, so that a flag means "anatomically
implausible", not "unusual".
"""

from __future__ import annotations

from dataclasses import dataclass, field

import cv2
import numpy as np

from chexmask.anatomy import FRAME, ORGAN_ROWS

FRAME_AREA = FRAME * FRAME
LUNG_AREA_RANGE = (0.08, 0.65)  # both lungs, fraction of the 1024 frame
HEART_LUNG_RANGE = (0.08, 0.90)  # heart area / lung area
LEFT_RIGHT_RANGE = (0.35, 1.60)  # left lung area / right lung area
# PPCA degrees of freedom of a 120-point shape after Procrustes (translation 2, rotation 1, scale 1).
SHAPE_DOF = 2 * 120 - 4


@dataclass
class Plausibility:
    flags: list[str] = field(default_factory=list)
    scores: dict[str, float] = field(default_factory=dict)


# ---------------------------------------------------------------------------
# Geometry


def polygon_area(points: np.ndarray) -> float:
    """Shoelace area of a closed polygon [N,2] (absolute, pixels^2)."""
    x, y = points[:, 0], points[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


def self_intersects(points: np.ndarray) -> bool:
    """Whether two non-adjacent edges of the closed polygon cross (strictly).

    All edge pairs at once: with <= 50 points the 2500 orientation tests are cheaper
    in numpy than any sweep line."""
    p = np.asarray(points, dtype=np.float64)
    a, b = p, np.roll(p, -1, axis=0)  # edge i runs from a[i] to b[i]

    def orient(o, u, v):  # sign of the cross product (u - o) x (v - o), broadcast over pairs
        return np.sign(
            (u[..., 0] - o[..., 0]) * (v[..., 1] - o[..., 1]) - (u[..., 1] - o[..., 1]) * (v[..., 0] - o[..., 0])
        )

    ai, bi, aj, bj = a[:, None], b[:, None], a[None], b[None]
    crosses = (orient(ai, bi, aj) * orient(ai, bi, bj) < 0) & (orient(aj, bj, ai) * orient(aj, bj, bi) < 0)
    n = len(p)
    i, j = np.triu_indices(n, k=2)
    non_adjacent = (j - i) != n - 1  # the first and last edges share a point too
    return bool(crosses[i[non_adjacent], j[non_adjacent]].any())


# ---------------------------------------------------------------------------
# Statistical shape model


def _normalise(shapes: np.ndarray) -> np.ndarray:
    """Centre each [120,2] shape and scale it to unit Frobenius norm."""
    centred = shapes - shapes.mean(axis=-2, keepdims=True)
    return centred / np.linalg.norm(centred, axis=(-2, -1), keepdims=True)


def _rotate_onto(shapes: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Best rotation (no reflection: a mirrored chest must stay an outlier) of each
    normalised shape onto the target (orthogonal Procrustes)."""
    u, _, vt = np.linalg.svd(np.swapaxes(shapes, -1, -2) @ target)
    d = np.sign(np.linalg.det(u @ vt))
    u[..., :, -1] *= d[..., None]
    return shapes @ (u @ vt)


@dataclass
class ShapeModel:
    """Probabilistic PCA of Procrustes-aligned shapes.

    ``scores`` gives the PPCA Mahalanobis distance per degree of freedom (kept
    modes by their variances, the rest by the mean discarded variance), so a
    typical shape scores about 1. ``threshold`` is twice the 99th percentile of
    cross-validated scores of the shapes the model was built from (about 4.5 on
    JSRT): real but unusual anatomy (a tall, rotated heart) scores up to 3.5,
    landmark noise of 10 px about 3, of 20 px 5-6, mirrored lungs over 20.
    """

    mean: np.ndarray  # [240] aligned mean shape
    modes: np.ndarray  # [m,240] orthonormal principal directions
    variances: np.ndarray  # [m]
    residual_variance: float
    threshold: float

    @classmethod
    def fit(cls, landmarks: np.ndarray, explained: float = 0.98, folds: int = 5) -> ShapeModel:
        if len(landmarks) < 3:
            raise ValueError(f"a shape model needs at least 3 shapes, got {len(landmarks)}")
        model = cls._fit_pca(landmarks, explained)
        # Scores of shapes the model saw are optimistic; calibrate on held-out folds.
        held_out = []
        for k in range(min(folds, len(landmarks))):
            test = np.arange(len(landmarks)) % folds == k
            held_out.append(cls._fit_pca(landmarks[~test], explained).scores(landmarks[test]))
        model.threshold = 2 * float(np.percentile(np.concatenate(held_out), 99))
        return model

    @classmethod
    def _fit_pca(cls, landmarks: np.ndarray, explained: float) -> ShapeModel:
        shapes = _normalise(np.asarray(landmarks, dtype=np.float64))
        mean = shapes[0]
        for _ in range(5):  # generalised Procrustes: align to the mean, re-estimate it
            mean = _normalise(_rotate_onto(shapes, mean).mean(0))
        flat = _rotate_onto(shapes, mean).reshape(len(shapes), -1) - mean.ravel()
        _, s, vt = np.linalg.svd(flat, full_matrices=False)
        eig = s**2 / (len(shapes) - 1)
        m = int(np.searchsorted(np.cumsum(eig) / eig.sum(), explained)) + 1
        # Floored so that a model of very few shapes (all variance in its modes) stays finite.
        residual = float(max(eig[m:].sum(), 1e-3 * eig.sum()) / (SHAPE_DOF - m))
        return cls(mean.ravel(), vt[:m], eig[:m], residual, threshold=np.inf)

    def scores(self, landmarks: np.ndarray) -> np.ndarray:
        """Outlier scores of shapes [N,120,2] (any frame: pose and size are removed)."""
        shapes = _normalise(np.asarray(landmarks, dtype=np.float64))
        mean = self.mean.reshape(-1, 2)
        d = _rotate_onto(shapes, mean).reshape(len(shapes), -1) - self.mean
        b = d @ self.modes.T
        off_model = (d * d).sum(1) - (b * b).sum(1)
        return np.sqrt(((b * b / self.variances).sum(1) + off_model / self.residual_variance) / SHAPE_DOF)

    def to_arrays(self, prefix: str = "ssm_") -> dict[str, np.ndarray | np.float64]:
        return {
            f"{prefix}mean": self.mean,
            f"{prefix}modes": self.modes,
            f"{prefix}variances": self.variances,
            f"{prefix}residual_variance": np.float64(self.residual_variance),
            f"{prefix}threshold": np.float64(self.threshold),
        }

    @classmethod
    def from_arrays(cls, arrays, prefix: str = "ssm_") -> ShapeModel:
        return cls(
            arrays[f"{prefix}mean"],
            arrays[f"{prefix}modes"],
            arrays[f"{prefix}variances"],
            float(arrays[f"{prefix}residual_variance"]),
            float(arrays[f"{prefix}threshold"]),
        )


# ---------------------------------------------------------------------------
# The checks


def check(landmarks: np.ndarray, shape_model: ShapeModel | None = None) -> Plausibility:
    """Flags and scores of one landmark set [120,2] in the 1024 frame (model order)."""
    points = np.asarray(landmarks, dtype=np.float64)
    organ = {name.lower(): points[rows] for name, rows in ORGAN_ROWS.items()}
    result = Plausibility()
    flags, scores = result.flags, result.scores

    for name, contour in organ.items():
        if self_intersects(contour):
            flags.append(f"self_intersection_{name}")

    area = {name: polygon_area(contour) for name, contour in organ.items()}
    lungs = area["rl"] + area["ll"]
    scores["lung_area_fraction"] = lungs / FRAME_AREA
    scores["heart_lung_ratio"] = area["h"] / max(lungs, 1.0)
    scores["left_right_ratio"] = area["ll"] / max(area["rl"], 1.0)
    for key, (low, high), flag in (
        ("lung_area_fraction", LUNG_AREA_RANGE, "lung_area"),
        ("heart_lung_ratio", HEART_LUNG_RANGE, "heart_lung_ratio"),
        ("left_right_ratio", LEFT_RIGHT_RANGE, "left_right_ratio"),
    ):
        if not low <= scores[key] <= high:
            flags.append(flag)

    # The right lung is on the image's left (x smaller); the heart sits between the
    # lungs and starts below their apices.
    x = {name: contour[:, 0].mean() for name, contour in organ.items()}
    if x["rl"] >= x["ll"]:
        flags.append("lungs_swapped")
    else:
        scores["heart_position"] = float((x["h"] - x["rl"]) / (x["ll"] - x["rl"]))
        if not 0 < scores["heart_position"] < 1:
            flags.append("heart_not_between_lungs")
    lungs_top = min(organ["rl"][:, 1].min(), organ["ll"][:, 1].min())
    scores["heart_top_below_lungs_px"] = float(organ["h"][:, 1].min() - lungs_top)
    if scores["heart_top_below_lungs_px"] <= 0:
        flags.append("heart_above_lungs")

    if shape_model is not None:
        scores["shape_outlier"] = float(shape_model.scores(points[None])[0])
        if scores["shape_outlier"] > shape_model.threshold:
            flags.append("shape_outlier")
    return result


# ---------------------------------------------------------------------------
# Checks of the image itself: what RCA cannot see


OCCLUSION_SIZE = 256  # working size of the occlusion check (area average of the 1024 frame)
OCCLUDED_FRACTION = 0.45  # one grey level over this share of a lung's half of the lung box


def check_image(
    image1024: np.ndarray, landmarks: np.ndarray, correlations: np.ndarray | None = None, view_threshold: float = 0.0
) -> Plausibility:
    """Flags of the input image: ``inverted`` (grey levels reversed), ``not_frontal``
    (like no frontal chest X-ray of the bank) and ``occluded`` (a uniform patch over a lung).

    ``correlations``: the image thumbnail's signed correlations with the bank's
    references (``ReferenceBank.correlations``); without them only occlusion is checked.
    RCA registers with a sign-blind similarity and the model can follow a box's edge,
    so both can agree on masks of an image that should not be trusted."""
    result = Plausibility()
    if correlations is not None:
        best, worst = float(correlations.max()), float(correlations.min())
        result.scores["view_correlation"] = max(best, -worst)
        # Inverted: the image matches the references best with the sign reversed.
        if -worst > max(best, view_threshold):
            result.flags.append("inverted")
        if max(best, -worst) < view_threshold:
            result.flags.append("not_frontal")
    result.scores["uniform_fraction"] = uniform_fraction(image1024, landmarks)
    if result.scores["uniform_fraction"] > OCCLUDED_FRACTION:
        result.flags.append("occluded")
    return result


def uniform_fraction(image1024: np.ndarray, landmarks: np.ndarray) -> float:
    """The largest share of one grey level in either half of the box around both
    predicted lungs, at 256 px. A pasted box or a shield is one level; lung tissue,
    even burnt out or heavily JPEG-compressed, spreads over many (JSRT at most 0.30).
    The box, not the lung contours: a model fooled by the patch draws lungs around it."""
    small = cv2.resize(np.asarray(image1024), (OCCLUSION_SIZE, OCCLUSION_SIZE), interpolation=cv2.INTER_AREA)
    lungs = np.asarray(landmarks, dtype=np.float64)[np.r_[ORGAN_ROWS["RL"], ORGAN_ROWS["LL"]]] * OCCLUSION_SIZE / FRAME
    (x0, y0), (x1, y1) = np.clip(np.floor(lungs.min(0)), 0, None).astype(int), np.ceil(lungs.max(0)).astype(int)
    middle = (x0 + x1) // 2
    shares = [0.0]
    for left, right in ((x0, middle), (middle, x1)):
        region = small[y0:y1, left:right]
        if region.size:
            shares.append(np.bincount(region.ravel(), minlength=256).max() / region.size)
    return float(max(shares))
