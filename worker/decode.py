"""Turn the bytes of an uploaded file into one 2-D uint8 grey image, or refuse it.

The result is what the official CheXmask scripts would hand to preprocessing
(SPEC 9.1 step 1 and 9.2 steps 1-3): ``cv2.imread(path, 0)`` for raster files and
``read_xray`` for DICOM. The format is sniffed from the content, never from the
file name. Every problem with the input is reported as ``RefusedInput``.
"""

from __future__ import annotations

import io
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
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

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


@dataclass
class DecodedImage:
    """One grey image ready for preprocessing, plus where it came from."""

    pixels: np.ndarray  # 2-D uint8, the official path's 8-bit image
    format: str  # 'dicom', 'png', 'jpeg', 'tiff', 'bmp', 'gif', 'jpeg2000', 'other'
    provenance: dict[str, Any] = field(default_factory=dict)
    flags: list[str] = field(default_factory=list)  # worth noting, not worth refusing


def decode_path(path: str | Path) -> DecodedImage:
    """Decode a file on disk; see ``decode_image``."""
    path = Path(path)
    return decode_image(path.read_bytes(), name=path.name)


def decode_image(data: bytes, name: str = "") -> DecodedImage:
    """Decode ``data`` (any supported format) into a ``DecodedImage``.

    ``name`` is only recorded in the provenance. Raises ``RefusedInput`` for
    anything that is not a single grey radiograph we can read.
    """
    if not data:
        raise RefusedInput("not_an_image", "The file is empty.")
    fmt = sniff_format(data)
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
    return DecodedImage(grey, provenance["format"], provenance)


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
            f"The image is in colour ({share:.0%} of pixels differ between channels); "
            "a radiograph is grey.",
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


def _read_dataset(data: bytes) -> Dataset:
    # force=True reads ACR-NEMA files, which have neither preamble nor file meta.
    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=True)
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
    return provenance


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
