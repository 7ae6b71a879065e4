"""What HybridGNet describes: the square model frame and the organs' landmarks.

The model's 120 landmarks are, in order, the right lung (44), the left lung (50)
and the heart (26), as (x, y) = (column, row) pixels of the 1024 frame. Every
module that needs the frame size or an organ's rows takes them from here.
"""

from __future__ import annotations

FRAME = 1024  # side of the square frame the model sees, pixels

# Landmark rows of each organ in the model's output, by the short code the
# annotations use for their folders (RL/, LL/, H/).
ORGAN_ROWS: dict[str, slice] = {
    "RL": slice(0, 44),  # right lung (image left)
    "LL": slice(44, 94),  # left lung
    "H": slice(94, 120),  # heart
}
N_LANDMARKS = 120
ORGAN_SIZES: dict[str, int] = {code: rows.stop - rows.start for code, rows in ORGAN_ROWS.items()}

# The organ names of mask files, index columns and records.
ORGAN_NAMES: dict[str, str] = {"RL": "right_lung", "LL": "left_lung", "H": "heart"}
ORGANS: tuple[str, ...] = tuple(ORGAN_NAMES.values())

# CheXmask CSV mask columns, in the CSV's order.
CSV_MASK_COLUMNS: dict[str, str] = {"Left Lung": "LL", "Right Lung": "RL", "Heart": "H"}

# Columns appended after the CheXmask ones when uncertainty is asked for: the mean
# landmark standard deviation per organ and all 120 of them (pixels of the 1024 frame).
UNCERTAINTY_COLUMNS: dict[str, str] = {
    "Uncertainty Right Lung": "RL",
    "Uncertainty Left Lung": "LL",
    "Uncertainty Heart": "H",
}
LANDMARK_STD_COLUMN = "Landmark Std"
