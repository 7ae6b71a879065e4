"""Quality control of predicted masks: the per-image entry point.

``assess`` / ``assess_batch`` run the plausibility checks and, when a reference
bank is configured, the RCA estimate of the masks' Dice (CheXmask's "Dice RCA
(Max)" and "(Mean)"). Without a bank the result says RCA was skipped and why;
the plausibility flags are still computed.

With a bank the estimates are made honest: the raw RCA values go through the
bank's monotone calibration (raw -> true Dice on held-out cases), and an image
flagged by ``plausibility.check_image`` (inverted, occluded, not frontal) has its
estimates capped at the bank's cap for that flag; ``reason`` then says so.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from chexmask.worker import plausibility, rca
from chexmask.worker.bank import ReferenceBank

# Organ suffixes of the per-organ fields, and their keys in rca's tables.
ORGAN_FIELDS = {"rl": "rl", "ll": "ll", "h": "heart", "lungs": "lungs"}


@dataclass
class QCResult:
    """QC of one mask set. The dice_rca_* and shape_outlier_score fields and
    ``flags`` are named as the mask index's QC columns (MaskIndex.set_qc)."""

    status: str  # 'done' (RCA computed) or 'skipped'
    reason: str = ""  # why RCA was skipped
    dice_rca_max: float | None = None  # max over references of (Dice lungs + Dice heart) / 2
    dice_rca_mean: float | None = None  # the same, mean over references
    dice_rca_max_rl: float | None = None  # per organ, max over references
    dice_rca_max_ll: float | None = None
    dice_rca_max_h: float | None = None  # heart
    dice_rca_max_lungs: float | None = None  # both lungs as one mask
    dice_rca_mean_rl: float | None = None  # per organ, mean over references
    dice_rca_mean_ll: float | None = None
    dice_rca_mean_h: float | None = None
    dice_rca_mean_lungs: float | None = None
    shape_outlier_score: float | None = None  # None without a bank (no shape model)
    flags: list[str] = field(default_factory=list)  # plausibility flag codes
    scores: dict[str, float] = field(default_factory=dict)  # plausibility measurements
    references: list[str] = field(default_factory=list)  # bank ids used, nearest first
    seconds: float = 0.0  # QC time of this image (its share of a batch)


def assess(
    image: np.ndarray,
    landmarks: np.ndarray,
    latent: np.ndarray | None,
    bank: ReferenceBank | None,
    cfg: rca.RCAConfig = rca.RCAConfig(),
) -> QCResult:
    """QC of one image: ``image`` uint8 [1024,1024] (the model input), ``landmarks``
    [120,2] predicted pixels in that frame, ``latent`` [64] from ``segment_batch``
    (None: references are picked by image similarity)."""
    latents = None if latent is None else np.asarray(latent)[None]
    return assess_batch(np.asarray(image)[None], np.asarray(landmarks)[None], latents, bank, cfg)[0]


def assess_batch(
    images: np.ndarray,
    landmarks: np.ndarray,
    latents: np.ndarray | None,
    bank: ReferenceBank | None,
    cfg: rca.RCAConfig = rca.RCAConfig(),
) -> list[QCResult]:
    """QC of B images at once (one batched registration): images [B,1024,1024] uint8,
    landmarks [B,120,2], latents [B,64] or None."""
    started = time.perf_counter()
    shape_model = bank.shape_model if bank is not None else None
    results = []
    if bank is None:
        small, correlations = np.empty(0), np.empty(0)
    else:
        small = np.stack([rca.working_image(image, bank.size) for image in images])
        correlations = bank.correlations(small)
    for n, (image, points) in enumerate(zip(images, landmarks, strict=True)):
        checks = plausibility.check(points, shape_model)
        seen = plausibility.check_image(
            image, points, None if bank is None else correlations[n], 0.0 if bank is None else bank.view_threshold
        )
        results.append(
            QCResult(
                status="skipped",
                flags=checks.flags + seen.flags,
                scores=checks.scores | seen.scores,
                shape_outlier_score=checks.scores.get("shape_outlier"),
            )
        )
    if bank is None:
        for result in results:
            result.reason = "no reference bank configured (CHEXMASK_QC_BANK)"
    else:
        references = bank.nearest(small, latents, cfg.k)
        atlases = rca.carry_references(small, references, bank, cfg)
        for result, points, rows, carried in zip(results, landmarks, references, atlases, strict=True):
            raw = rca.summarise(rca.dice_table(points, carried, cfg.dice_size))
            result.scores |= {f"raw_dice_rca_{key}": value for key, value in raw.items()}
            estimate, reason = honest_estimates(result.flags, raw, bank.calibration, bank.flag_caps)
            _fill_rca(result, estimate)
            result.reason = reason
            result.references = [bank.ids[r] for r in rows]
    seconds = (time.perf_counter() - started) / len(results)
    for result in results:
        result.seconds = seconds
    return results


def honest_estimates(
    flags: list[str], raw: dict[str, float], calibration: rca.Calibration | None, flag_caps: dict[str, float]
) -> tuple[dict[str, float], str]:
    """Calibrated estimates, capped for a suspect input (the lowest cap of its flags),
    and why they were capped ('' when not)."""
    estimate = raw if calibration is None else calibration.apply(raw)
    caps = {flag: flag_caps[flag] for flag in flags if flag in flag_caps}
    if not caps:
        return estimate, ""
    cap = min(caps.values())
    reason = f"estimate capped at {cap:.2f}: suspect input ({', '.join(sorted(caps))})"
    return {key: min(value, cap) for key, value in estimate.items()}, reason


def _fill_rca(result: QCResult, summary: dict[str, float]) -> None:
    result.status = "done"
    result.dice_rca_max, result.dice_rca_mean = summary["max"], summary["mean"]
    for suffix, organ in ORGAN_FIELDS.items():
        setattr(result, f"dice_rca_max_{suffix}", summary[f"max_{organ}"])
        setattr(result, f"dice_rca_mean_{suffix}", summary[f"mean_{organ}"])
