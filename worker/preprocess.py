"""Bring a decoded image to the model's 1024x1024 input, remembering the padding.

SPEC 9.1 (PNG/JPEG, the MIMIC/PadChest scripts): crop the dark border
(``remove_padding``), pad to a centred square, resize to 1024.
SPEC 9.2 (DICOM, the VinDr script): the same without ``remove_padding``.
``Padding`` holds what back-projection (postprocess.to_original) needs.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import cv2
import numpy as np

from chexmask.anatomy import FRAME
from chexmask.errors import RefusedInput
from chexmask.worker.decode import DecodedImage

# remove_padding keeps pixels strictly above this value: 1 still counts as padding.
_PADDING_MAX_VALUE = 1


@dataclass(frozen=True)
class Padding:
    """How the 1024 frame relates to the original image.

    ``height`` and ``width`` are the original image's true height and width
    (unlike the official MIMIC CSV reader, which swaps them, SPEC 9.4). The
    ``*_rem`` fields are the borders cut by remove_padding, the others the zero
    fill added to make the cropped image square.
    """

    height: int
    width: int
    pad_left_rem: int
    pad_top_rem: int
    pad_right_rem: int
    pad_bottom_rem: int
    pad_left: int
    pad_top: int
    pad_right: int
    pad_bottom: int
    remove_padding: bool

    @property
    def square_size(self) -> int:
        """Side of the padded square that was resized to 1024."""
        cropped_height = self.height - self.pad_top_rem - self.pad_bottom_rem
        cropped_width = self.width - self.pad_left_rem - self.pad_right_rem
        return max(cropped_height, cropped_width)

    def to_dict(self) -> dict[str, int | bool]:
        return asdict(self)


@dataclass
class Preprocessed:
    image: np.ndarray  # uint8, FRAME x FRAME
    padding: Padding


def preprocess(decoded: DecodedImage, size: int = FRAME) -> Preprocessed:
    """SPEC 9.1 for raster files, 9.2 for DICOM (which skips remove_padding)."""
    image = decoded.pixels
    height, width = image.shape
    remove = decoded.format != "dicom"
    if remove:
        image, (left_rem, top_rem, right_rem, bottom_rem) = remove_padding(image)
    else:
        left_rem = top_rem = right_rem = bottom_rem = 0
    square, (left, top, right, bottom) = pad_to_square_centered(image)
    padding = Padding(height, width, left_rem, top_rem, right_rem, bottom_rem, left, top, right, bottom, remove)
    return Preprocessed(resize(square, size), padding)


def remove_padding(image: np.ndarray) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """Crop to the bounding box of all pixels > 1; returns (crop, (left, top, right, bottom)).

    One stray bright pixel enlarges the box, as in the official script.
    """
    mask = (image > _PADDING_MAX_VALUE).astype(np.uint8)
    x, y, w, h = cv2.boundingRect(mask)
    if w == 0 or h == 0:
        raise RefusedInput("blank_image", "The image has no pixel brighter than the padding value 1.")
    height, width = image.shape
    return image[y : y + h, x : x + w], (x, y, width - x - w, height - y - h)


def pad_to_square_centered(image: np.ndarray) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """Zero-pad to a square; the odd pixel goes right/bottom. Returns (square, (left, top, right, bottom))."""
    height, width = image.shape
    side = max(height, width)
    top, left = (side - height) // 2, (side - width) // 2
    bottom, right = side - height - top, side - width - left
    square = cv2.copyMakeBorder(image, top, bottom, left, right, cv2.BORDER_CONSTANT, value=(0,))
    return square, (left, top, right, bottom)


def resize(square: np.ndarray, size: int = FRAME) -> np.ndarray:
    # OpenCV's default INTER_LINEAR on uint8 is fixed-point (and an exact 2x
    # downscale becomes INTER_AREA); a float bilinear differs by +-1 on ~10 % of
    # pixels (SPEC 9.1 step 4), so the library call is the specification.
    return cv2.resize(square, (size, size))
