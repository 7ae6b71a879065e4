"""Turn the bytes of an uploaded file into one 2-D uint8 grey image, or refuse it.

The result is what the official CheXmask scripts would hand to preprocessing
(SPEC 9.1 step 1 and 9.2 steps 1-3): ``cv2.imread(path, 0)`` for raster files and
``read_xray`` for DICOM. The format is sniffed from the content, never from the
file name. Every problem with the input is reported as ``RefusedInput``.

Before any pixel is allocated, the size the file's header declares is checked
(``refuse_by_header``): PNG IHDR, JPEG SOFn, the DICOM attributes read with
``stop_before_pixels``, and the header Pillow reads for every other format. A
715-byte JPEG can claim 30000x30000 pixels, and decoding, blank-checking or
padding it to a square would take gigabytes.
"""

from __future__ import annotations

import io
import struct
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pydicom
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.pixels import apply_modality_lut, apply_voi_lut, get_decoder
from pydicom.uid import (
    UID,
    AllTransferSyntaxes,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from chexmask.errors import RefusedInput

# Content signatures of the raster formats we name; anything else still gets a
# chance through OpenCV and Pillow (PNM, EXR, ...).
_RASTER_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"\x89PNG\r\n\x1a\n", "png"),
    (b"\xff\xd8\xff", "jpeg"),
    (b"II*\x00", "tiff"),
    (b"MM\x00*", "tiff"),
    (b"BM", "bmp"),
    (b"GIF87a", "gif"),
    (b"GIF89a", "gif"),
    (b"\x00\x00\x00\x0cjP  \r\n\x87\n", "jpeg2000"),
    (b"\xff\x4f\xff\x51", "jpeg2000"),
)
# Old ACR-NEMA files and DICOM datasets written without the 128-byte preamble
# start directly with a little-endian tag of group 0008 or 0002.
_BARE_DICOM_GROUPS = (b"\x08\x00", b"\x02\x00")
_PNG_IEND = b"IEND\xaeB`\x82"
_JPEG_SOS, _JPEG_EOI = b"\xff\xda", b"\xff\xd9"
_PIXEL_DATA_TAG_LE = b"\xe0\x7f\x10\x00"  # (7FE0,0010) as stored little-endian

# Modalities that hold projection radiographs. DR and RG are retired or
# vendor-specific codes still met in archives; OT (other, usually a secondary
# capture of film) is accepted because the grey/colour checks below still apply.
_RADIOGRAPH_MODALITIES = frozenset({"CR", "DX", "DR", "RG", "OT"})
_LATERAL_VIEWS = frozenset({"LL", "RL", "LAT", "LATERAL"})
# Substrings of Body Part Examined that mean a chest, in the languages vendors use.
_CHEST_TERMS = ("CHEST", "THORA", "TORA", "LUNG", "PECHO", "POUMON")

# A grey image stored as RGB has equal channels; lossy chroma coding can leave a
# few levels of difference and burnt-in coloured annotations touch a few
# pixels, so an image is "coloured" only when more than 1 % of its pixels have
# channels more than 8 grey levels apart.
_COLOUR_LEVELS = 8
_COLOUR_SHARE = 0.01
# Fewer grey levels than this between darkest and brightest pixel leaves
# nothing to segment (and an image with max <= 1 has no content for SPEC 9.1's
# remove_padding at all).
_MIN_GREY_RANGE = 16

# Size limits, checked on the header before any pixel is allocated (README,
# "Lifecycle and guarantees"). The pixel budget is configurable
# (CHEXMASK_MAX_PIXELS, passed in by the caller); 100 megapixels is 5x the
# largest detector sold (about 4300x4300) and still bounds a decode to a few GB.
DEFAULT_MAX_PIXELS = 100_000_000
# Decoded bytes allowed per budgeted pixel: room for 8-bit RGBA or 16-bit grey
# at the full budget, not for 16-bit RGB or 32-bit samples of the same size.
_MAX_BYTES_PER_PIXEL = 4
# Preprocessing pads to a square of the long side, so a 60000x4 strip becomes
# 3.6 gigapixels. No radiograph is longer than 4:1 (a chest is about 1.2:1).
_MAX_ASPECT_RATIO = 4
# Smaller than this is a thumbnail or an icon, not a radiograph: the smallest
# real input we know is 440x440 (ACR-NEMA CR), NIH files are 512x512.
_MIN_SIDE = 64

_PNG_IHDR_END = 26  # signature (8), chunk length (4), b"IHDR", width, height, depth, colour type
# Channels libpng hands OpenCV per PNG colour type; palette and grey+alpha expand to 4.
_PNG_CHANNELS = {0: 1, 2: 3, 3: 4, 4: 4, 6: 4}
# Frame headers (SOF0-SOF15) that carry the image size; C4 (DHT), C8 (JPG) and
# CC (DAC) share the range but are other segments.
_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
# Markers that stand alone, without a length: TEM, RST0-RST7, SOI.
_JPEG_STANDALONE = frozenset({0x01, *range(0xD0, 0xD9)})
_JPEG_SOS_MARKER, _JPEG_EOI_MARKER = 0xDA, 0xD9


@dataclass
class DecodedImage:
    """One grey image ready for preprocessing, plus where it came from."""

    pixels: np.ndarray  # 2-D uint8, the official path's 8-bit image
    format: str  # 'dicom', 'png', 'jpeg', 'tiff', 'bmp', 'gif', 'jpeg2000', 'other'
    provenance: dict[str, Any] = field(default_factory=dict)
    flags: list[str] = field(default_factory=list)  # worth noting, not worth refusing


@dataclass(frozen=True)
class HeaderSize:
    """The image size a file's header declares, before anything is decoded."""

    width: int
    height: int
    frames: int = 1  # only DICOM decodes every frame at once
    samples: int = 1  # channels the decoder produces
    bytes_per_sample: int = 1

    @property
    def pixels(self) -> int:
        return self.width * self.height * self.frames

    @property
    def decoded_bytes(self) -> int:
        return self.pixels * self.samples * self.bytes_per_sample

    def describe(self) -> str:
        frames = f" x {self.frames} frames" if self.frames > 1 else ""
        return f"{self.width}x{self.height} pixels{frames}"


def decode_path(path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> DecodedImage:
    """Decode a file on disk; see ``decode_image``."""
    path = Path(path)
    return decode_image(path.read_bytes(), name=path.name, max_pixels=max_pixels)


def decode_image(data: bytes, name: str = "", max_pixels: int = DEFAULT_MAX_PIXELS) -> DecodedImage:
    """Decode ``data`` (any supported format) into a ``DecodedImage``.

    ``name`` is only recorded in the provenance. Raises ``RefusedInput`` for
    anything that is not a single grey radiograph we can read, and, from the
    header alone, for images above ``max_pixels`` (``too_large``), longer than
    4:1 (``bad_aspect_ratio``) or with a side under 64 pixels (``too_small``).
    """
    if not data:
        raise RefusedInput("not_an_image", "The file is empty.")
    fmt = sniff_format(data)
    # First, so that no later step (decoding, the blank check, padding) ever
    # allocates an image the header says is too large.
    refuse_by_header(header_size(data, fmt), max_pixels)
    if fmt == "dicom":
        decoded = _decode_dicom(data)
    else:
        decoded = _decode_raster(data, fmt)
    if name:
        decoded.provenance["name"] = name
    _refuse_blank(decoded)
    return decoded


def sniff_format(data: bytes) -> str | None:
    """Name the format from the first bytes; None when nothing matches."""
    if data[128:132] == b"DICM":
        return "dicom"
    for magic, fmt in _RASTER_MAGIC:
        if data.startswith(magic):
            return fmt
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    if data[:2] in _BARE_DICOM_GROUPS:
        return "dicom"
    return None


@contextmanager
def _refuse_on_error(code: str, what: str) -> Iterator[None]:
    """Turn a decoder library's exception into a refusal that names it."""
    try:
        yield
    except RefusedInput:
        raise
    except Exception as exc:  # decoders raise anything from ValueError to struct.error
        raise RefusedInput(code, f"{what}: {type(exc).__name__}: {exc}"[:300]) from exc


def _refuse_blank(decoded: DecodedImage) -> None:
    low, high = int(decoded.pixels.min()), int(decoded.pixels.max())
    if high - low < _MIN_GREY_RANGE:
        hint = ""
        if decoded.format != "dicom" and decoded.provenance["bits_stored"] > 8:
            hint = " (a 16-bit file that uses few bits decodes near-black: only its high byte is kept)"
        raise RefusedInput(
            "blank_image",
            f"The image is blank or nearly uniform (grey levels {low}-{high}){hint}.",
        )


# ----------------------------------------------------------------------------
# Sizes from headers, read without decoding a pixel.


def refuse_by_header(size: HeaderSize | None, max_pixels: int) -> None:
    """Refuse sizes no radiograph has; ``None`` (no size found) is left to the decoder.

    The budget is checked first: it is what protects memory. The aspect ratio
    comes before the minimum side, because a 60000x4 strip is dangerous for
    its length (padding), not for its width.
    """
    if size is None:
        return
    if size.pixels > max_pixels:
        raise RefusedInput(
            "too_large",
            f"The header declares {size.describe()} ({_megapixels(size.pixels)} megapixels), "
            f"above the limit of {_megapixels(max_pixels)} megapixels (CHEXMASK_MAX_PIXELS).",
        )
    max_bytes = max_pixels * _MAX_BYTES_PER_PIXEL
    if size.decoded_bytes > max_bytes:
        raise RefusedInput(
            "too_large",
            f"The header declares {size.describe()} of {size.samples} samples x {size.bytes_per_sample} bytes, "
            f"{_megabytes(size.decoded_bytes)} MB decoded, above the limit of {_megabytes(max_bytes)} MB "
            f"({_MAX_BYTES_PER_PIXEL} bytes per pixel of CHEXMASK_MAX_PIXELS).",
        )
    long_side, short_side = max(size.width, size.height), min(size.width, size.height)
    if long_side > _MAX_ASPECT_RATIO * short_side:
        raise RefusedInput(
            "bad_aspect_ratio",
            f"The image is {size.describe()}, longer than {_MAX_ASPECT_RATIO}:1; no radiograph has that shape.",
        )
    if short_side < _MIN_SIDE:
        raise RefusedInput(
            "too_small", f"The image is {size.describe()}, under {_MIN_SIDE} pixels on a side for a radiograph."
        )


def _megapixels(pixels: int) -> str:
    return f"{pixels / 1e6:.4g}"


def _megabytes(count: int) -> str:
    return f"{count / 1e6:.4g}"


def header_size(data: bytes, fmt: str | None) -> HeaderSize | None:
    """The declared size, or ``None`` when no header could be read.

    ``None`` is safe to pass on: libpng and libjpeg need the very header we
    failed to read, pydicom cannot build pixels without Rows and Columns, and
    any other format Pillow cannot open is refused here.
    """
    if fmt == "png":
        return _png_size(data)
    if fmt == "jpeg":
        return _jpeg_size(data)
    if fmt == "dicom":
        return _dicom_header_size(data)
    return _pillow_size(data, fmt)


def _png_size(data: bytes) -> HeaderSize | None:
    """IHDR, which libpng requires as the first chunk."""
    if len(data) < _PNG_IHDR_END or data[12:16] != b"IHDR":
        return None
    width, height, depth, colour = struct.unpack(">IIBB", data[16:_PNG_IHDR_END])
    return HeaderSize(width, height, samples=_PNG_CHANNELS.get(colour, 4), bytes_per_sample=2 if depth == 16 else 1)


def _jpeg_size(data: bytes) -> HeaderSize | None:
    """The first SOFn frame header, found by walking markers the way libjpeg does.

    Like libjpeg's ``next_marker``, bytes that are not a marker are skipped, so a
    file padded with garbage cannot hide its frame header from this walk.
    """
    position = 2  # after SOI
    while True:
        position = data.find(b"\xff", position)
        if position < 0:
            return None
        while position < len(data) and data[position] == 0xFF:  # fill bytes
            position += 1
        if position + 3 > len(data):
            return None
        marker = data[position]
        position += 1
        if marker == 0x00 or marker in _JPEG_STANDALONE:  # stuffed byte or no length
            continue
        if marker in (_JPEG_SOS_MARKER, _JPEG_EOI_MARKER):
            return None  # libjpeg refuses a scan or an end without a frame header
        (length,) = struct.unpack(">H", data[position : position + 2])
        if marker in _JPEG_SOF:
            if position + 8 > len(data):
                return None
            precision, height, width, components = struct.unpack(">BHHB", data[position + 2 : position + 8])
            return HeaderSize(width, height, samples=components, bytes_per_sample=2 if precision > 8 else 1)
        position += length


def _dicom_header_size(data: bytes) -> HeaderSize | None:
    """Rows, Columns, frames, samples and bits, read with ``stop_before_pixels``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = _read_dataset(data, stop_before_pixels=True)
        with _refuse_on_error("corrupt_image", "The DICOM header could not be interpreted"):
            return _dicom_size(ds)


def _dicom_size(ds: Dataset) -> HeaderSize | None:
    if ds.get("Rows") is None or ds.get("Columns") is None:
        return None  # pydicom cannot build pixels without them
    bits = int(ds.get("BitsAllocated") or 8)
    return HeaderSize(
        width=int(ds.Columns),
        height=int(ds.Rows),
        frames=max(1, int(ds.get("NumberOfFrames") or 1)),
        samples=max(1, int(ds.get("SamplesPerPixel") or 1)),
        bytes_per_sample=max(1, (bits + 7) // 8),
    )


def _pillow_size(data: bytes, fmt: str | None) -> HeaderSize:
    """TIFF, JPEG 2000, BMP, GIF, WebP, PNM...: ``Image.open`` reads only the header.

    A format Pillow cannot open is refused here even if OpenCV could decode it
    (Radiance HDR, PFM): its size could not be checked first.
    """
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            bands = len(image.getbands())
            mode = image.mode
    except Image.DecompressionBombError as exc:  # Pillow's own limit, above ours by default
        raise RefusedInput("too_large", f"The header declares an image too large to open: {exc}"[:300]) from exc
    except Exception as exc:
        if fmt is None:
            raise RefusedInput("not_an_image", "The file is not an image format we can read.") from exc
        raise RefusedInput("corrupt_image", f"The {fmt} header could not be read: {exc}"[:300]) from exc
    bytes_per_sample = 4 if mode in ("I", "F") else 2 if mode.startswith("I;16") else 1
    return HeaderSize(width, height, samples=bands, bytes_per_sample=bytes_per_sample)


# ----------------------------------------------------------------------------
# Raster formats: PNG, JPEG and whatever OpenCV or Pillow can read.


def _decode_raster(data: bytes, fmt: str | None) -> DecodedImage:
    _refuse_truncated_raster(data, fmt)
    buf = np.frombuffer(data, np.uint8)
    with _refuse_on_error("corrupt_image", "OpenCV could not decode the image"):
        stored = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)
    if stored is None:
        return _decode_with_pillow(data, fmt)
    _refuse_colour(stored)
    # The official scripts read with cv2.imread(path, 0). For 16-bit files that
    # keeps the high byte (value >> 8, checked against OpenCV 4.10), and for
    # JPEG it is libjpeg's own luma output, so the grey image is taken from
    # OpenCV's grayscale decode rather than computed from ``stored``.
    with _refuse_on_error("corrupt_image", "OpenCV could not decode the image"):
        grey = cv2.imdecode(buf, cv2.IMREAD_GRAYSCALE)
    if grey is None:
        raise RefusedInput("corrupt_image", "OpenCV could not decode the image in grey.")
    flags = []
    if _uses_few_high_bits(stored, grey):
        # A 10- or 12-bit image in a 16-bit PNG keeps only 4-16 grey levels in
        # its high byte: the official path would segment a black picture. We
        # stretch the stored values instead, as the DICOM path does, and say so.
        grey = _display_uint8(stored.astype(np.float64))
        flags.append("rescaled_low_bit_depth")
    provenance = {
        "format": fmt or "other",
        "bits_stored": 8 * stored.dtype.itemsize,
        "channels": 1 if stored.ndim == 2 else int(stored.shape[2]),
        "height": int(grey.shape[0]),
        "width": int(grey.shape[1]),
    }
    return DecodedImage(grey, fmt or "other", provenance, flags)


def _uses_few_high_bits(stored: np.ndarray, grey: np.ndarray) -> bool:
    if stored.dtype != np.uint16 or stored.ndim != 2:
        return False
    return int(grey.max()) - int(grey.min()) < _MIN_GREY_RANGE <= int(stored.max()) - int(stored.min())


def _refuse_truncated_raster(data: bytes, fmt: str | None) -> None:
    """Catch cut-off PNG and JPEG files, which decoders partly fill in silently."""
    if fmt == "png" and _PNG_IEND not in data:
        raise RefusedInput("truncated", "The PNG file ends before its IEND chunk.")
    # Entropy-coded JPEG data never contains 0xFFD9 or 0xFFDA (0xFF is stuffed),
    # so a complete file has its end-of-image marker after the last scan header.
    if fmt == "jpeg" and data.rfind(_JPEG_EOI) < data.rfind(_JPEG_SOS):
        raise RefusedInput("truncated", "The JPEG file ends before its end-of-image marker.")


def _decode_with_pillow(data: bytes, fmt: str | None) -> DecodedImage:
    """Formats OpenCV does not read (GIF, for one)."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            frames = getattr(image, "n_frames", 1)
            rgb = np.asarray(image.convert("RGB"))
            grey = np.asarray(image.convert("L"))
            provenance = {
                "format": fmt or "other",
                "bits_stored": 16 if image.mode.startswith("I;16") else 8,
                "channels": len(image.getbands()),
            }
    except Exception as exc:
        if fmt is None:
            raise RefusedInput("not_an_image", "The file is not an image format we can read.") from exc
        raise RefusedInput("corrupt_image", f"The {fmt} file could not be decoded: {exc}"[:300]) from exc
    if frames > 1:
        raise RefusedInput("multi_frame", f"The file holds {frames} frames; send one image.")
    _refuse_colour(rgb)
    provenance.update(height=int(grey.shape[0]), width=int(grey.shape[1]))
    return DecodedImage(grey, str(provenance["format"]), provenance)


def _refuse_colour(stored: np.ndarray) -> None:
    if stored.ndim == 2 or stored.shape[2] < 3:
        return
    channels = stored[..., :3]  # an alpha channel says nothing about colour
    spread = channels.max(axis=2) - channels.min(axis=2)
    if stored.dtype == np.uint16:
        spread = spread // 257  # compare in 8-bit grey levels
    share = float(np.mean(spread > _COLOUR_LEVELS))
    if share > _COLOUR_SHARE:
        raise RefusedInput(
            "colour_image",
            f"The image is in colour ({share:.0%} of pixels differ between channels); a radiograph is grey.",
        )


# ----------------------------------------------------------------------------
# DICOM (and ACR-NEMA): SPEC 9.2 read_xray, plus the modality LUT.


def _decode_dicom(data: bytes) -> DecodedImage:
    # pydicom warns about every non-conformant value; what matters ends up in a
    # refusal or in the provenance instead.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = _read_dataset(data)
        inferred_syntax = _ensure_transfer_syntax(ds)
        # Values are parsed lazily, so a malformed tag only fails when read.
        with _refuse_on_error("corrupt_image", "The DICOM header could not be interpreted"):
            provenance = _dicom_provenance(ds)
            if inferred_syntax:
                provenance["transfer_syntax_inferred"] = True
            flags = _dicom_flags(ds)
            _refuse_unusable_dataset(ds, data)
        with _refuse_on_error("corrupt_image", "The DICOM values could not be mapped to grey levels"):
            pixels = _display_uint8(_grey_values(_pixel_array(ds), ds, provenance))
    return DecodedImage(pixels, "dicom", provenance, flags)


def _read_dataset(data: bytes, stop_before_pixels: bool = False) -> Dataset:
    # force=True reads ACR-NEMA files, which have neither preamble nor file meta.
    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=True, stop_before_pixels=stop_before_pixels)
    except Exception as exc:
        code = "corrupt_image" if data[128:132] == b"DICM" else "not_an_image"
        raise RefusedInput(code, f"The file could not be read as DICOM: {exc}"[:300]) from exc
    if len(ds) == 0:
        raise RefusedInput("truncated", "The DICOM file is cut off: no complete data element could be read.")
    return ds


def _ensure_transfer_syntax(ds: Dataset) -> bool:
    """ACR-NEMA files have no file meta: name the encoding pydicom read them with.

    Returns True when the transfer syntax had to be inferred.
    """
    meta = getattr(ds, "file_meta", None)
    if meta is not None and "TransferSyntaxUID" in meta:
        return False
    implicit_vr, little_endian = ds.original_encoding
    if implicit_vr:
        uid = ImplicitVRLittleEndian
    else:
        uid = ExplicitVRLittleEndian if little_endian else ExplicitVRBigEndian
    ds.file_meta = meta if meta is not None else FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = uid
    return True


def _text(ds: Dataset, keyword: str) -> str:
    """A tag's value as stripped text; '' when absent or empty."""
    value = ds.get(keyword)
    return "" if value is None else str(value).strip()


def _dicom_provenance(ds: Dataset) -> dict[str, Any]:
    provenance: dict[str, Any] = {
        "format": "dicom",
        "transfer_syntax": str(ds.file_meta.TransferSyntaxUID),
        "photometric_interpretation": _text(ds, "PhotometricInterpretation"),
        "bits_stored": int(ds.get("BitsStored") or 0),
        "height": int(ds.get("Rows") or 0),
        "width": int(ds.get("Columns") or 0),
    }
    optional = {
        "study_instance_uid": "StudyInstanceUID",
        "series_instance_uid": "SeriesInstanceUID",
        "sop_instance_uid": "SOPInstanceUID",
        "modality": "Modality",
        "view_position": "ViewPosition",
        "body_part": "BodyPartExamined",
        "presentation_lut_shape": "PresentationLUTShape",
    }
    for key, keyword in optional.items():
        if value := _text(ds, keyword):
            provenance[key] = value
    provenance.update(_pixel_spacings(ds))
    return provenance


def _pixel_spacings(ds: Dataset) -> dict[str, Any]:
    """Every pixel spacing the header gives (mm, [row, column]) and the one measurements use.

    Pixel Spacing is preferred: in CR/DX it is the spacing in the patient (calibrated
    for magnification when the modality did so, else equal to the detector's); Imager
    Pixel Spacing is at the detector front, larger than the anatomy by the geometric
    magnification (~1.1 for a PA chest); Nominal Scanned Pixel Spacing is a digitised
    film's. A value that is not two positive numbers is ignored, as if absent.
    """
    spacings: dict[str, Any] = {}
    used: tuple[str, list[float]] | None = None
    for key, keyword in _SPACING_KEYWORDS:
        value = _spacing(ds, keyword)
        if value is not None:
            spacings[key] = value
            used = used or (keyword, value)
    spacings["pixel_spacing_source"] = used[0] if used else "none"
    if used:
        spacings["pixel_spacing_mm"] = used[1]
    return spacings


# In order of preference (see _pixel_spacings).
_SPACING_KEYWORDS = (
    ("pixel_spacing", "PixelSpacing"),
    ("imager_pixel_spacing", "ImagerPixelSpacing"),
    ("nominal_scanned_pixel_spacing", "NominalScannedPixelSpacing"),
)


def _spacing(ds: Dataset, keyword: str) -> list[float] | None:
    try:
        value = [float(v) for v in ds.get(keyword) or ()]
    except (TypeError, ValueError):  # a malformed DS string
        return None
    if len(value) != 2 or not all(0 < v < float("inf") for v in value):
        return None
    return value


def _dicom_flags(ds: Dataset) -> list[str]:
    flags = []
    if not _text(ds, "Modality"):
        flags.append("modality_missing")
    if _text(ds, "ViewPosition").upper() in _LATERAL_VIEWS:
        flags.append("lateral_view")
    body_part = _text(ds, "BodyPartExamined").upper()
    if body_part and not any(term in body_part for term in _CHEST_TERMS):
        flags.append("non_chest_body_part")
    return flags


def _refuse_unusable_dataset(ds: Dataset, data: bytes) -> None:
    """Everything that can be refused from the header alone, cheapest first."""
    modality = _text(ds, "Modality").upper()
    if modality and modality not in _RADIOGRAPH_MODALITIES:
        raise RefusedInput("wrong_modality", f"Modality {modality} is not a projection radiograph.")
    if "PixelData" not in ds:
        # pydicom drops an element cut off by the end of the file, so a Pixel
        # Data tag in the bytes but not in the dataset means truncation.
        if _PIXEL_DATA_TAG_LE in data:
            raise RefusedInput("truncated", "The DICOM file ends inside its pixel data.")
        raise RefusedInput("no_pixel_data", "The DICOM file holds no pixel data.")
    if int(ds.get("NumberOfFrames") or 1) > 1:
        raise RefusedInput("multi_frame", f"The DICOM holds {ds.NumberOfFrames} frames; send one image.")
    photometric = _text(ds, "PhotometricInterpretation").upper()
    if photometric == "PALETTE COLOR":
        raise RefusedInput("colour_image", "The DICOM is a palette-colour image; a radiograph is grey.")
    uid = ds.file_meta.TransferSyntaxUID
    try:
        decoder = get_decoder(uid)
    except NotImplementedError as exc:
        raise RefusedInput("unsupported_transfer_syntax", f"No decoder exists for transfer syntax {uid}.") from exc
    if not decoder.is_available:
        raise RefusedInput(
            "unsupported_transfer_syntax", f"No installed plugin decodes transfer syntax {uid} ({uid.name})."
        )


def decodable_transfer_syntaxes() -> list[UID]:
    """The transfer syntaxes whose pixel data this decoder reads with the plugins
    installed here (what a DICOM listener may accept: anything else would be refused
    as ``unsupported_transfer_syntax`` after the sender was told it was stored)."""
    readable = []
    for uid in AllTransferSyntaxes:
        try:
            if get_decoder(uid).is_available:
                readable.append(uid)
        except NotImplementedError:  # no decoder for it at all
            continue
    return readable


def _pixel_array(ds: Dataset) -> np.ndarray:
    try:
        return ds.pixel_array
    except Exception as exc:
        code = "truncated" if _pixel_data_short(ds) else "corrupt_image"
        raise RefusedInput(code, f"The DICOM pixel data could not be decoded: {exc}"[:300]) from exc


def _pixel_data_short(ds: Dataset) -> bool:
    """True when uncompressed pixel data holds fewer bytes than its header promises."""
    if ds.file_meta.TransferSyntaxUID.is_compressed:
        return False
    samples = int(ds.get("Rows") or 0) * int(ds.get("Columns") or 0) * int(ds.get("SamplesPerPixel") or 1)
    return len(ds.PixelData) < samples * int(ds.get("BitsAllocated") or 8) // 8


def _grey_values(raw: np.ndarray, ds: Dataset, provenance: dict[str, Any]) -> np.ndarray:
    """Stored values to display values: modality LUT, VOI, then inversion."""
    photometric = provenance["photometric_interpretation"].upper()
    if raw.ndim == 3:
        # pydicom hands RGB and YBR data over as RGB; grey only when the
        # channels agree, and then there is no VOI to apply (it is defined for
        # MONOCHROME data only).
        _refuse_colour(raw)
        provenance["voi"] = "none"
        return raw[..., 0]
    if raw.ndim != 2:
        raise RefusedInput("corrupt_image", f"The DICOM pixel data has shape {raw.shape}, not one image.")
    # The official read_xray applies only the VOI; the modality LUT comes first
    # per the DICOM grayscale pipeline and is the identity for the goldens (no
    # rescale tags), so their read_xray output is unchanged.
    values = apply_modality_lut(raw, ds)
    provenance["voi"] = _voi_kind(ds)
    if provenance["voi"] != "none":
        values = apply_voi_lut(values, ds)
    # MONOCHROME1 shows low values white, so invert as read_xray does. Presentation
    # LUT Shape INVERSE is how the DX IOD *describes* MONOCHROME1 data (PS3.3
    # C.8.11.6.1.2: INVERSE "shall be used" with MONOCHROME1), not a second
    # inversion: the sitk_cxr samples (MONOCHROME1 + INVERSE) need exactly one
    # inversion to match their MONOCHROME2 export. INVERSE on MONOCHROME2 asks
    # for an inversion of its own.
    inverse = _text(ds, "PresentationLUTShape").upper() == "INVERSE"
    provenance["inverted"] = photometric == "MONOCHROME1" or inverse
    if provenance["inverted"]:
        values = np.amax(values) - values
    return values


def _voi_kind(ds: Dataset) -> str:
    if ds.get("VOILUTSequence"):
        return "lut"
    if ds.get("WindowCenter") is not None and ds.get("WindowWidth") is not None:
        return "window"
    return "none"


def _display_uint8(values: np.ndarray) -> np.ndarray:
    """SPEC 9.2 step 3: shift to 0, divide by the max, scale to 255 and truncate."""
    values = values.astype(np.float64)
    values = values - np.min(values)
    peak = np.max(values)
    if peak == 0:
        raise RefusedInput("blank_image", "The DICOM image has a single grey value.")
    # Same operation order as read_xray, so truncation lands on the same integers.
    values = values / peak
    return (values * 255).astype(np.uint8)
