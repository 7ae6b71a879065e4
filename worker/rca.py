"""Reverse Classification Accuracy (RCA) by atlas registration: CheXmask's Dice RCA.

For a new image with predicted landmarks S: take the k references nearest in the
encoder's latent space, register the image to each of them (affine, then a cubic
B-spline field at two resolutions, Adam on a local-NCC^2 similarity, all pairs in
one batch), carry each reference's ground-truth contours into the new image with
the found transform, and measure the Dice of S against each carried contour set.
A correct S agrees with the well-registered references; Max and Mean over the k
references are CheXmask's "Dice RCA (Max)" and "(Mean)".

Direction: CheXmask warps the predicted mask onto each reference and compares it
with the reference's ground truth. We carry the reference's ground-truth polygon
into the new image instead: the same overlap up to the smooth warp's Jacobian,
but polygons need no resampling, and both masks get the CheXmask rasterisation.

Similarity: squared local normalised cross-correlation. Squaring makes it blind to
the sign of the local intensity relation, so inverted or re-windowed images
(datasets differ in windowing; a missed MONOCHROME1 flag inverts one) register as
well as matched ones.

Coordinates are grid_sample's (align_corners=False) in [-1, 1]: the pixel centre
x of the 1024 frame is (2x + 1) / 1024 - 1 at every working resolution.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from chexmask.anatomy import FRAME, ORGAN_ROWS

if TYPE_CHECKING:
    from chexmask.worker.bank import ReferenceBank

ORGAN_KEYS = ("rl", "ll", "lungs", "heart")  # right and left lung, both lungs, heart


@dataclass(frozen=True)
class RCAConfig:
    # Cost: k=5 at 128 px with 30 steps per stage cost 4.5x this on the 20 held-out JSRT
    # images (6 degradations each) for Pearson 0.953 instead of 0.947 and MAE 0.025 vs 0.026.
    k: int = 3  # references per image
    size: int = 96  # fine stage; bank images are stored at it
    coarse_size: int = 64  # affine and coarse deformable stage
    steps: tuple[int, int, int] = (15, 15, 10)  # Adam steps: affine, coarse, fine
    lrs: tuple[float, float, float] = (0.01, 0.005, 0.003)
    grids: tuple[int, int] = (8, 16)  # B-spline control points per side
    # LNCC windows (pixels): wide for the affine stage, whose capture range they set, then
    # at coarse_size and at size.
    affine_window: int = 15
    windows: tuple[int, int] = (11, 9)
    smooth: float = 0.02  # weight of the field's gradient energy
    # torch threads while registering (None: leave torch's setting). Its ~5000 small ops
    # gain little from threads and lose badly to any other load on the cores: on 2 busy
    # cores QC took 22.6 s per image with 2 threads, 2.2 s with 1.
    threads: int | None = 1
    dice_size: int = 512  # raster of the Dice (1024 frame / 2)


# ---------------------------------------------------------------------------
# Coordinates and the transform


def to_norm(points_px: torch.Tensor) -> torch.Tensor:
    return (2 * points_px + 1) / FRAME - 1


def from_norm(points: torch.Tensor) -> torch.Tensor:
    return ((points + 1) * FRAME - 1) / 2


def pixel_centres(size: int) -> torch.Tensor:
    return (2 * torch.arange(size) + 1) / size - 1


def bspline_basis(x: torch.Tensor, g: int) -> torch.Tensor:
    """Cubic B-spline weights [len(x), g] of g control points, spaced so that the
    weights sum to 1 everywhere on [-1, 1] (one control point beyond each edge)."""
    h = 2 / (g - 3)
    t = (x[:, None] - (-1 + (torch.arange(g) - 1) * h)).abs() / h
    return torch.where(t < 1, 2 / 3 - t**2 + t**3 / 2, torch.where(t < 2, (2 - t) ** 3 / 6, 0.0))


@dataclass
class Transform:
    """x_reference -> x_image: an affine map plus a B-spline displacement.

    theta [N,2,3] acts on (x, y); ctrl [N,2,g,g] holds (dx, dy) at control points
    indexed (row = y, column = x); ctrl None means affine only."""

    theta: torch.Tensor
    ctrl: torch.Tensor | None = None

    def points(self, p: torch.Tensor) -> torch.Tensor:
        """Map points [N,P,2] (normalised x, y)."""
        out = p @ self.theta[:, :, :2].transpose(1, 2) + self.theta[:, None, :, 2]
        if self.ctrl is None:
            return out
        g = self.ctrl.shape[-1]
        bx = bspline_basis(p[..., 0].reshape(-1), g).reshape(*p.shape[:2], g)
        by = bspline_basis(p[..., 1].reshape(-1), g).reshape(*p.shape[:2], g)
        return out + torch.einsum("npi,ncij,npj->npc", by, self.ctrl, bx)

    def grid(self, size: int) -> torch.Tensor:
        """Sampling grid [N,size,size,2] for grid_sample of the image in the reference frame."""
        c = pixel_centres(size)
        base = torch.stack(torch.meshgrid(c, c, indexing="xy"), -1).reshape(1, -1, 2)
        out = (base @ self.theta[:, :, :2].transpose(1, 2) + self.theta[:, None, :, 2]).reshape(-1, size, size, 2)
        if self.ctrl is None:
            return out
        B = bspline_basis(c, self.ctrl.shape[-1])  # separable: field = B ctrl B^T per channel
        return out + (B @ self.ctrl @ B.T).permute(0, 2, 3, 1)


def refine(ctrl: torch.Tensor, g: int, samples: int = 64) -> torch.Tensor:
    """Control points of a g-grid whose field best fits (least squares) the given one."""
    c = pixel_centres(samples)
    coarse, fine = bspline_basis(c, ctrl.shape[-1]), torch.linalg.pinv(bspline_basis(c, g))
    return fine @ (coarse @ ctrl @ coarse.T) @ fine.T


# ---------------------------------------------------------------------------
# Similarity and registration


def box_mean(x: torch.Tensor, window: int) -> torch.Tensor:
    """Mean over a window x window box per channel (separable, edges replicated)."""
    c, r = x.shape[1], window // 2
    k = torch.full((c, 1, window, 1), 1 / window, dtype=x.dtype)
    x = F.conv2d(F.pad(x, (0, 0, r, r), mode="replicate"), k, groups=c)
    return F.conv2d(F.pad(x, (r, r, 0, 0), mode="replicate"), k.transpose(2, 3), groups=c)


def lncc2(a: torch.Tensor, b: torch.Tensor, window: int, eps: float = 1e-3) -> torch.Tensor:
    """Mean squared local correlation of a and b [N,1,H,W] -> [N], in [0, 1].
    eps keeps flat regions (where correlation is noise) from counting."""
    m = box_mean(torch.cat([a, b, a * a, b * b, a * b], 1), window)
    ma, mb, aa, bb, ab = m.unbind(1)
    cov = ab - ma * mb
    return (cov * cov / ((aa - ma * ma) * (bb - mb * mb) + eps)).mean((1, 2))


def _standardise(x: torch.Tensor) -> torch.Tensor:
    return (x - x.mean((1, 2, 3), keepdim=True)) / (x.std((1, 2, 3), keepdim=True) + 1e-6)


def _resize(x: torch.Tensor, size: int) -> torch.Tensor:
    return x if x.shape[-1] == size else F.interpolate(x, size=(size, size), mode="area")


def _similarity(transform: Transform, moving: torch.Tensor, fixed: torch.Tensor, window: int) -> torch.Tensor:
    warped = F.grid_sample(moving, transform.grid(fixed.shape[-1]), align_corners=False, padding_mode="border")
    return lncc2(warped, fixed, window)


def register(fixed: torch.Tensor, moving: torch.Tensor, cfg: RCAConfig = RCAConfig()) -> Transform:
    """Register each moving image onto its fixed image; both [N,1,size,size] float.

    The pairs are independent problems in one batch: the loss is their sum and
    Adam scales each parameter by itself."""
    n = fixed.shape[0]
    with torch.inference_mode(False), torch.enable_grad(), _torch_threads(cfg.threads):
        # Callers may hold inference tensors (segment_batch runs in inference_mode);
        # those cannot be saved for backward, plain copies can.
        fixed, moving = fixed.clone(), moving.clone()
        f, m = _standardise(_resize(fixed, cfg.coarse_size)), _standardise(_resize(moving, cfg.coarse_size))
        theta = torch.eye(2, 3).repeat(n, 1, 1).requires_grad_(True)
        _optimise(
            theta, cfg.steps[0], cfg.lrs[0], lambda: -_similarity(Transform(theta), m, f, cfg.affine_window).sum()
        )
        theta = theta.detach()

        ctrl = torch.zeros(n, 2, cfg.grids[0], cfg.grids[0])
        stages = zip((cfg.coarse_size, cfg.size), cfg.grids, cfg.windows, cfg.steps[1:], cfg.lrs[1:], strict=True)
        for size, g, window, steps, lr in stages:
            f, m = _standardise(_resize(fixed, size)), _standardise(_resize(moving, size))
            ctrl = (refine(ctrl, g) if ctrl.shape[-1] != g else ctrl).requires_grad_(True)
            # _optimise calls the loss within this iteration, so the loop variables are the current ones.
            _optimise(ctrl, steps, lr, lambda: _deformable_loss(theta, ctrl, m, f, window, cfg.smooth).sum())  # noqa: B023
            ctrl = ctrl.detach()
    return Transform(theta, ctrl)


@contextmanager
def _torch_threads(n: int | None):
    """Run with n intra-op threads, then restore. torch's setting is per process: a
    segmentation running meanwhile in another thread of it would get n threads too."""
    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _deformable_loss(theta, ctrl, moving, fixed, window: int, smooth: float) -> torch.Tensor:
    # Squared differences of neighbouring control points times g^2 approximate the
    # field's gradient energy whatever the grid spacing.
    g = ctrl.shape[-1]
    energy = ctrl.diff(dim=2).pow(2).mean((1, 2, 3)) + ctrl.diff(dim=3).pow(2).mean((1, 2, 3))
    return -_similarity(Transform(theta, ctrl), moving, fixed, window) + smooth * g * g * energy


def _optimise(param: torch.Tensor, steps: int, lr: float, loss_fn) -> None:
    opt = torch.optim.Adam([param], lr=lr)
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        loss_fn().backward()
        opt.step()


# ---------------------------------------------------------------------------
# RCA


def working_image(image1024: np.ndarray, size: int) -> np.ndarray:
    """The 1024 uint8 image at the registration size (area average, as the bank stores it)."""
    return cv2.resize(np.asarray(image1024), (size, size), interpolation=cv2.INTER_AREA)


def carry_references(
    images: np.ndarray, references: np.ndarray, bank: ReferenceBank, cfg: RCAConfig = RCAConfig()
) -> np.ndarray:
    """Register images [B,size,size] uint8 to their references [B,k] (bank rows) and
    return the references' ground-truth landmarks carried into each image [B,k,120,2]
    (1024-frame pixels)."""
    b, k = references.shape
    as_float = lambda a: torch.from_numpy(np.asarray(a, np.float32) / 255)[:, None]  # noqa: E731
    fixed = as_float(bank.images[references.ravel()])
    moving = as_float(images).repeat_interleave(k, dim=0)
    transform = register(fixed, moving, cfg)
    truth = to_norm(torch.from_numpy(bank.landmarks[references.ravel()]).float())
    return from_norm(transform.points(truth)).reshape(b, k, -1, 2).numpy()


def _masks(points: np.ndarray, size: int) -> dict[str, np.ndarray]:
    """Filled organ polygons (OpenCV, as postprocess.organ_masks) at size/1024 scale."""
    scaled = np.round(np.asarray(points) * size / FRAME).astype(np.int32)
    masks = {}
    for organ, name in (("RL", "rl"), ("LL", "ll"), ("H", "heart")):
        mask = np.zeros((size, size), np.uint8)
        cv2.drawContours(mask, [scaled[ORGAN_ROWS[organ]].reshape(-1, 1, 2)], -1, (1,), thickness=cv2.FILLED)
        masks[name] = mask.astype(bool)
    masks["lungs"] = masks["rl"] | masks["ll"]
    return masks


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    total = a.sum() + b.sum()
    return 1.0 if total == 0 else float(2 * (a & b).sum() / total)


def dice_table(landmarks: np.ndarray, atlases: np.ndarray, size: int = 512) -> dict[str, np.ndarray]:
    """Dice of predicted landmarks [120,2] against each carried reference [k,120,2]:
    ORGAN_KEYS and 'overall' -> [k]. 'overall' averages lungs and heart per
    reference, as CheXmask's Dice RCA does."""
    predicted = _masks(landmarks, size)
    rows = [{organ: _dice(predicted[organ], mask) for organ, mask in _masks(atlas, size).items()} for atlas in atlases]
    table = {organ: np.array([r[organ] for r in rows]) for organ in ORGAN_KEYS}
    table["overall"] = (table["lungs"] + table["heart"]) / 2
    return table


def summarise(table: dict[str, np.ndarray]) -> dict[str, float]:
    """Max and Mean over the references: 'max', 'mean', 'max_rl', 'mean_rl', ..."""
    out = {"max": float(table["overall"].max()), "mean": float(table["overall"].mean())}
    for organ in ORGAN_KEYS:
        out[f"max_{organ}"] = float(table[organ].max())
        out[f"mean_{organ}"] = float(table[organ].mean())
    return out


# ---------------------------------------------------------------------------
# Calibration


def fit_isotonic(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Non-decreasing least-squares fit of y on x (pool adjacent violators), as knots
    (x, y) of a piecewise-linear map: each pooled block's mean x and mean y. Joining
    block centres rather than holding each block's value keeps nearby estimates apart."""
    order = np.argsort(x, kind="stable")
    x, y = np.asarray(x, np.float64)[order], np.asarray(y, np.float64)[order]
    blocks: list[list[float]] = []  # [sum of y, count, sum of x]
    for xi, yi in zip(x, y, strict=True):
        blocks.append([yi, 1, xi])
        while len(blocks) > 1 and blocks[-2][0] / blocks[-2][1] >= blocks[-1][0] / blocks[-1][1]:
            total, count, total_x = blocks.pop()
            blocks[-1][0] += total
            blocks[-1][1] += count
            blocks[-1][2] += total_x
    return np.array([b[2] / b[1] for b in blocks]), np.array([b[0] / b[1] for b in blocks])


@dataclass
class Calibration:
    """Monotone maps from raw Dice RCA to the true Dice seen on held-out cases, one
    per ``summarise`` key ('max', 'mean', 'max_rl', ...); keys without one pass through.
    Beyond the fitted range the end values hold (np.interp)."""

    knots: dict[str, tuple[np.ndarray, np.ndarray]]

    @classmethod
    def fit(cls, raw: dict[str, np.ndarray], true: dict[str, np.ndarray]) -> Calibration:
        return cls({key: fit_isotonic(raw[key], true[key]) for key in raw})

    def apply(self, summary: dict[str, float]) -> dict[str, float]:
        out = {
            key: float(np.interp(value, *self.knots[key])) if key in self.knots else value
            for key, value in summary.items()
        }
        # Mapped one by one, a mean could land above its max; over references it never can.
        for key in out:
            if key.startswith("mean") and (top := "max" + key[4:]) in out:
                out[key] = min(out[key], out[top])
        return out

    def to_arrays(self, prefix: str = "calibration_") -> dict[str, np.ndarray]:
        return {f"{prefix}{key}": np.stack(knots) for key, knots in self.knots.items()}

    @classmethod
    def from_arrays(cls, arrays, prefix: str = "calibration_") -> Calibration | None:
        knots = {key[len(prefix) :]: (arrays[key][0], arrays[key][1]) for key in arrays if key.startswith(prefix)}
        return cls(knots) if knots else None
