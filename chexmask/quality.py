"""The quality-control numbers every segmentation carries, named once.

RCA estimates the masks' Dice overall (CheXmask's "Dice RCA (Max)" and
"(Mean)") and per organ (``rl``, ``ll``, ``h``); the plausibility checks add a
shape-outlier score and flags. These are the index's QC columns, the fields of
``QCResult`` and the keyword arguments of ``MaskIndex.set_qc``.
"""

from __future__ import annotations

# CheXmask's suggested cut-off for a usable mask.
GOOD_DICE = 0.7

QC_ORGANS = ("rl", "ll", "h")
DICE_FIELDS: tuple[str, ...] = (
    "dice_rca_mean",
    "dice_rca_max",
    *(f"dice_rca_mean_{organ}" for organ in QC_ORGANS),
    *(f"dice_rca_max_{organ}" for organ in QC_ORGANS),
)
QC_FIELDS: tuple[str, ...] = (*DICE_FIELDS, "shape_outlier_score", "flags")
