"""decode_image: every real sample decodes like the official path; bad input is refused."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
from pathlib import Path

import cv2
import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.encaps import encapsulate
from pydicom.uid import (
    JPEG2000,
    MPEG2MPML,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
)

from chexmask.errors import RefusedInput
from chexmask.worker.decode import decode_image, decode_path

SIIM_UID = "1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819"
CR_CHEST_PA = {"modality": "CR", "view_position": "PA", "body_part": "CHEST"}
SITK = {
    "photometric_interpretation": "MONOCHROME1",
    "bits_stored": 10,
    "height": 2140,
    "width": 1760,
    "modality": "CR",
    "body_part": "CHEST",
    "presentation_lut_shape": "INVERSE",
    "inverted": True,
}
RG1 = {
    "photometric_interpretation": "MONOCHROME1",
    "bits_stored": 15,
    "height": 1955,
    "width": 1841,
    "voi": "window",
    "inverted": True,
    **CR_CHEST_PA,
}

# Expected provenance (a subset) of every file in data/samples that decodes.
SAMPLES = {
    "00000001_000.png": {"format": "png", "bits_stored": 8, "channels": 1, "height": 512, "width": 512},
    "00027426_000.png": {"format": "png", "bits_stored": 8, "channels": 1, "height": 512, "width": 512},
    "tbx11k_h0001_rgb.png": {"format": "png", "bits_stored": 8, "channels": 3, "height": 512, "width": 512},
    "rg1_raw_MONO1_15bit.png": {"format": "png", "bits_stored": 16, "channels": 1, "height": 1955, "width": 1841},
    "sitk_cxr_MONO2_16bit_scaled.png": {"format": "png", "bits_stored": 16, "height": 2140, "width": 1760},
    "16747_3_1.jpg": {"format": "jpeg", "bits_stored": 8, "channels": 3, "height": 885, "width": 1036},
    "covid-19-pneumonia-58-prior.jpg": {"format": "jpeg", "channels": 3, "height": 2373, "width": 2373},
    "utils_example1.jpg": {"format": "jpeg", "channels": 1, "height": 899, "width": 786},
    "siim_cr_jpeg_baseline_mono2.dcm": {
        "format": "dicom",
        "transfer_syntax": JPEGBaseline8Bit,
        "photometric_interpretation": "MONOCHROME2",
        "bits_stored": 8,
        "height": 1024,
        "width": 1024,
        "sop_instance_uid": SIIM_UID,
        "voi": "none",
        "inverted": False,
        **CR_CHEST_PA,
    },
    "Fake_MONOHR1.dcm": {
        "format": "dicom",
        "transfer_syntax": JPEGBaseline8Bit,
        "photometric_interpretation": "MONOCHROME1",
        "bits_stored": 8,
        "height": 1024,
        "width": 1024,
        "sop_instance_uid": SIIM_UID,
        "inverted": True,
        **CR_CHEST_PA,
    },
    "cr_jpeg_lossless_mono1_inverse.dcm": {"format": "dicom", "transfer_syntax": JPEGLosslessSV1, **SITK},
    "sitk_cxr_JPEGLS.dcm": {"format": "dicom", "transfer_syntax": JPEGLSLossless, **SITK},
    "sitk_cxr_RLE.dcm": {"format": "dicom", "transfer_syntax": RLELossless, **SITK},
    "sitk_cxr_ExplicitLE.dcm": {"format": "dicom", "transfer_syntax": ExplicitVRLittleEndian, **SITK},
    "cr_mono1_acr_nema_no_preamble.dcm": {
        "format": "dicom",
        "transfer_syntax": ImplicitVRLittleEndian,
        "transfer_syntax_inferred": True,
        "photometric_interpretation": "MONOCHROME1",
        "bits_stored": 10,
        "height": 440,
        "width": 440,
        "voi": "window",
        "inverted": True,
        **CR_CHEST_PA,
    },
}
# Samples refused on purpose, with the reason.
# 10 significant bits in a 16-bit PNG: cv2.imread(..., 0) keeps the high byte (values 0-3),
# so these are stretched from the stored values instead, and flagged.
LOW_BIT_SAMPLES = ["sitk_cxr_raw_MONO1_10bit.png"]
PYDICOM_DATA = {
    "RG1_UNCR.dcm": {"transfer_syntax": ExplicitVRLittleEndian, **RG1},
    "RG1_J2KR.dcm": {"transfer_syntax": JPEG2000Lossless, **RG1},
    "RG1_UNCI.dcm": {"transfer_syntax": ExplicitVRLittleEndian, **RG1},
    "RG1_J2KI.dcm": {"transfer_syntax": JPEG2000, **RG1},
}


def assert_refused(data: bytes, code: str) -> RefusedInput:
    with pytest.raises(RefusedInput) as caught:
        decode_image(data)
    assert caught.value.code == code, caught.value.message
    assert caught.value.message  # one human sentence
    return caught.value


def assert_provenance(provenance: dict, expected: dict) -> None:
    assert {key: provenance.get(key) for key in expected} == expected


# ---------------------------------------------------------------------------
# Real files decode, with their provenance


def test_sample_table_covers_every_sample(samples_dir: Path) -> None:
    assert {p.name for p in samples_dir.iterdir()} == set(SAMPLES) | set(LOW_BIT_SAMPLES)


@pytest.mark.parametrize("name", LOW_BIT_SAMPLES)
def test_low_bit_depth_16bit_png_is_stretched_not_blank(samples_dir: Path, name: str) -> None:
    stored = cv2.imread(str(samples_dir / name), cv2.IMREAD_UNCHANGED)
    assert stored.dtype == np.uint16 and int(cv2.imread(str(samples_dir / name), 0).max()) < 16
    decoded = decode_path(samples_dir / name)
    assert "rescaled_low_bit_depth" in decoded.flags
    assert decoded.pixels.min() == 0 and decoded.pixels.max() == 255
    expected = ((stored - stored.min()) / (stored.max() - stored.min()) * 255).astype(np.uint8)
    np.testing.assert_array_equal(decoded.pixels, expected)


@pytest.mark.parametrize("name", SAMPLES)
def test_sample_decodes_with_provenance(name: str, samples_dir: Path, decoded) -> None:
    image = decoded(samples_dir / name)
    assert image.pixels.dtype == np.uint8 and image.pixels.ndim == 2
    assert image.pixels.shape == (SAMPLES[name]["height"], SAMPLES[name]["width"])
    assert image.format == SAMPLES[name]["format"]
    assert_provenance(image.provenance, SAMPLES[name] | {"name": name})
    assert image.flags == []


@pytest.mark.parametrize("name", PYDICOM_DATA)
def test_pydicom_data_rg1_decodes(name: str, pydicom_file, decoded) -> None:
    image = decoded(pydicom_file(name))
    assert image.pixels.shape == (1955, 1841)
    assert_provenance(image.provenance, PYDICOM_DATA[name])


@pytest.mark.parametrize("name", [n for n in SAMPLES if not n.endswith(".dcm")])
def test_raster_equals_official_imread(name: str, samples_dir: Path, decoded) -> None:
    path = samples_dir / name
    np.testing.assert_array_equal(decoded(path).pixels, cv2.imread(str(path), cv2.IMREAD_GRAYSCALE))


@pytest.mark.parametrize("name", ["rg1_raw_MONO1_15bit.png", "sitk_cxr_MONO2_16bit_scaled.png"])
def test_16bit_png_keeps_high_byte(name: str, samples_dir: Path, decoded) -> None:
    stored = cv2.imread(str(samples_dir / name), cv2.IMREAD_UNCHANGED)
    assert stored.dtype == np.uint16
    np.testing.assert_array_equal(decoded(samples_dir / name).pixels, (stored >> 8).astype(np.uint8))


def test_decoded_arrays_hash_as_in_preprocessing_info(
    golden_name: str, golden_source, preprocessing_dir: Path, decoded
) -> None:
    info = json.loads((preprocessing_dir / "preprocessing_info.json").read_text())["images"]
    entry = next(v for k, v in info.items() if Path(k).stem == golden_name)
    expected = entry.get("sha256_decoded") or entry["sha256_read_xray"]
    assert hashlib.sha256(decoded(golden_source(golden_name)).pixels.tobytes()).hexdigest() == expected


def test_dicom_matches_read_xray_golden(dicom_golden_name: str, golden_source, preprocessing_dir, decoded) -> None:
    golden = cv2.imread(str(preprocessing_dir / f"{dicom_golden_name}_read_xray.png"), cv2.IMREAD_UNCHANGED)
    np.testing.assert_array_equal(decoded(golden_source(dicom_golden_name)).pixels, golden)


def test_lossless_dicom_codecs_agree(samples_dir: Path, decoded) -> None:
    reference = decoded(samples_dir / "sitk_cxr_ExplicitLE.dcm").pixels
    for name in ("sitk_cxr_JPEGLS.dcm", "sitk_cxr_RLE.dcm", "cr_jpeg_lossless_mono1_inverse.dcm"):
        np.testing.assert_array_equal(decoded(samples_dir / name).pixels, reference, err_msg=name)


def test_jpeg2000_matches_uncompressed(pydicom_file, decoded) -> None:
    for lossless, reference in (("RG1_J2KR.dcm", "RG1_UNCR.dcm"), ("RG1_J2KI.dcm", "RG1_UNCI.dcm")):
        np.testing.assert_array_equal(decoded(pydicom_file(lossless)).pixels, decoded(pydicom_file(reference)).pixels)


def test_monochrome1_with_inverse_lut_is_inverted_once(samples_dir: Path, decoded) -> None:
    # The MONOCHROME2 export of the same pixels shows how the image should look;
    # inverting twice (MONOCHROME1 and INVERSE) would anti-correlate with it.
    export = cv2.imread(str(samples_dir / "sitk_cxr_MONO2_16bit_scaled.png"), cv2.IMREAD_UNCHANGED)
    ours = decoded(samples_dir / "sitk_cxr_ExplicitLE.dcm").pixels
    assert np.corrcoef(export.ravel(), ours.ravel())[0, 1] > 0.9


# ---------------------------------------------------------------------------
# DICOM header checks, on edited copies of real files


def edited_dicom(source: Path, tmp_path: Path, edit) -> bytes:
    ds = pydicom.dcmread(source, force=True)
    edit(ds)
    target = tmp_path / "edited.dcm"
    ds.save_as(target, enforce_file_format="TransferSyntaxUID" in ds.file_meta)
    return target.read_bytes()


@pytest.mark.parametrize(
    ("name", "looks_like"),
    [
        # INVERSE on MONOCHROME2 inverts: the SIIM pixels then look like Fake_MONOHR1.
        ("siim_cr_jpeg_baseline_mono2.dcm", "Fake_MONOHR1.dcm"),
        # INVERSE on MONOCHROME1 restates the single MONOCHROME1 inversion.
        ("Fake_MONOHR1.dcm", "Fake_MONOHR1.dcm"),
    ],
)
def test_presentation_lut_shape_inverse(name: str, looks_like: str, samples_dir: Path, tmp_path: Path, decoded) -> None:
    def edit(ds):
        ds.PresentationLUTShape = "INVERSE"

    image = decode_image(edited_dicom(samples_dir / name, tmp_path, edit))
    assert image.provenance["inverted"] is True
    np.testing.assert_array_equal(image.pixels, decoded(samples_dir / looks_like).pixels)


def test_flags_lateral_non_chest_and_missing_modality(samples_dir: Path, tmp_path: Path, decoded) -> None:
    def edit(ds):
        ds.ViewPosition = "LL"
        ds.BodyPartExamined = "SKULL"
        del ds.Modality

    source = samples_dir / "siim_cr_jpeg_baseline_mono2.dcm"
    image = decode_image(edited_dicom(source, tmp_path, edit))
    assert sorted(image.flags) == ["lateral_view", "modality_missing", "non_chest_body_part"]
    assert image.provenance["view_position"] == "LL" and "modality" not in image.provenance
    np.testing.assert_array_equal(image.pixels, decoded(source).pixels)


@pytest.mark.parametrize("modality", ["DX", "DR", "RG", "OT"])
def test_radiograph_modalities_accepted(modality: str, samples_dir: Path, tmp_path: Path) -> None:
    def edit(ds):
        ds.Modality = modality

    image = decode_image(edited_dicom(samples_dir / "siim_cr_jpeg_baseline_mono2.dcm", tmp_path, edit))
    assert image.provenance["modality"] == modality


@pytest.mark.parametrize(
    ("name", "code"),
    [
        ("CT_small.dcm", "wrong_modality"),
        ("MR_small.dcm", "wrong_modality"),
        ("US1_UNCR.dcm", "wrong_modality"),
        ("rtstruct.dcm", "wrong_modality"),
        ("emri_small.dcm", "wrong_modality"),
        ("SC_rgb.dcm", "colour_image"),  # modality OT, but in colour
    ],
)
def test_pydicom_non_radiographs_refused(name: str, code: str, pydicom_file) -> None:
    assert_refused(pydicom_file(name).read_bytes(), code)


def test_multi_frame_refused(pydicom_file, tmp_path: Path) -> None:
    def edit(ds):
        ds.Modality = "DX"  # a 10-frame MR relabelled, so only the frame count is wrong

    assert_refused(edited_dicom(pydicom_file("emri_small.dcm"), tmp_path, edit), "multi_frame")


def test_no_pixel_data_refused(samples_dir: Path, tmp_path: Path) -> None:
    def edit(ds):
        del ds.PixelData

    assert_refused(edited_dicom(samples_dir / "siim_cr_jpeg_baseline_mono2.dcm", tmp_path, edit), "no_pixel_data")


def test_unsupported_transfer_syntax_refused(samples_dir: Path, tmp_path: Path) -> None:
    def edit(ds):
        ds.file_meta.TransferSyntaxUID = MPEG2MPML

    assert_refused(
        edited_dicom(samples_dir / "siim_cr_jpeg_baseline_mono2.dcm", tmp_path, edit), "unsupported_transfer_syntax"
    )


def test_corrupt_compressed_pixel_data_refused(samples_dir: Path, tmp_path: Path) -> None:
    def edit(ds):
        ds.PixelData = encapsulate([b"\xff\xd8\xff\xe0" + bytes(range(256)) * 8 + b"\xff\xd9"])

    assert_refused(edited_dicom(samples_dir / "siim_cr_jpeg_baseline_mono2.dcm", tmp_path, edit), "corrupt_image")


def test_uniform_dicom_refused_as_blank(samples_dir: Path, tmp_path: Path) -> None:
    def edit(ds):
        ds.PixelData = np.full((ds.Rows, ds.Columns), 600, np.uint16).tobytes()

    assert_refused(edited_dicom(samples_dir / "cr_mono1_acr_nema_no_preamble.dcm", tmp_path, edit), "blank_image")


# ---------------------------------------------------------------------------
# Truncated, corrupt and non-image input


@pytest.mark.parametrize(
    ("name", "keep"),
    [
        ("00000001_000.png", 0.5),
        ("00000001_000.png", 0.999),
        ("utils_example1.jpg", 0.5),
        ("utils_example1.jpg", 0.999),
        ("siim_cr_jpeg_baseline_mono2.dcm", 0.5),  # encapsulated pixel data
        ("siim_cr_jpeg_baseline_mono2.dcm", 0.002),  # inside the file meta
        ("cr_mono1_acr_nema_no_preamble.dcm", 0.9),  # native pixel data, no preamble
    ],
)
def test_truncated_files_refused(name: str, keep: float, samples_dir: Path, tmp_path: Path) -> None:
    data = (samples_dir / name).read_bytes()
    cut = tmp_path / name
    cut.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(RefusedInput) as caught:
        decode_path(cut)
    assert caught.value.code == "truncated", caught.value.message


def test_corrupt_png_refused(samples_dir: Path) -> None:
    data = bytearray((samples_dir / "00000001_000.png").read_bytes())
    middle = len(data) // 2
    data[middle : middle + 64] = bytes(64)  # breaks the IDAT checksum, IEND still there
    assert_refused(bytes(data), "corrupt_image")


@pytest.mark.parametrize(
    "data",
    [
        b"",
        np.random.default_rng(7).integers(0, 256, 4096, dtype=np.uint8).tobytes(),
        b"patient_id,finding\n17,none\n",
    ],
    ids=["empty", "random", "text"],
)
def test_not_an_image_refused(data: bytes) -> None:
    assert_refused(data, "not_an_image")


def test_black_png_refused_as_blank() -> None:
    assert_refused(cv2.imencode(".png", np.zeros((64, 64), np.uint8))[1].tobytes(), "blank_image")


def test_gif_decodes_through_pillow(samples_dir: Path) -> None:
    # OpenCV 4.10 reads no GIF, so this exercises the Pillow fallback.
    grey = cv2.imread(str(samples_dir / "00000001_000.png"), cv2.IMREAD_GRAYSCALE)
    buffer = io.BytesIO()
    Image.fromarray(grey).save(buffer, format="GIF")
    image = decode_image(buffer.getvalue())
    assert image.format == "gif" and image.provenance["channels"] == 1
    np.testing.assert_array_equal(image.pixels, grey)


def test_animated_gif_refused(samples_dir: Path) -> None:
    grey = Image.fromarray(cv2.imread(str(samples_dir / "00000001_000.png"), cv2.IMREAD_GRAYSCALE))
    buffer = io.BytesIO()
    grey.save(buffer, format="GIF", save_all=True, append_images=[grey.rotate(90)])
    assert_refused(buffer.getvalue(), "multi_frame")


# ---------------------------------------------------------------------------
# Colour


def coloured_image() -> np.ndarray:
    """A 256x256 BGR gradient whose channels differ almost everywhere."""
    ramp = np.linspace(0, 255, 256, dtype=np.uint8)
    blue, green = np.meshgrid(ramp, ramp)
    return np.dstack([blue, green, 255 - blue])


@pytest.mark.parametrize("extension", [".png", ".jpg"])
def test_colour_image_refused(extension: str) -> None:
    assert_refused(cv2.imencode(extension, coloured_image())[1].tobytes(), "colour_image")


@pytest.mark.parametrize("extension", [".png", ".jpg"])
def test_grey_stored_as_rgb_accepted(extension: str, samples_dir: Path, tmp_path: Path) -> None:
    grey = cv2.imread(str(samples_dir / "00000001_000.png"), cv2.IMREAD_GRAYSCALE)
    path = tmp_path / f"rgb{extension}"
    cv2.imwrite(str(path), cv2.cvtColor(grey, cv2.COLOR_GRAY2BGR))
    image = decode_path(path)
    assert image.provenance["channels"] == 3
    np.testing.assert_array_equal(image.pixels, cv2.imread(str(path), cv2.IMREAD_GRAYSCALE))
    if extension == ".png":
        np.testing.assert_array_equal(image.pixels, grey)


def test_small_coloured_annotation_accepted(samples_dir: Path) -> None:
    picture = cv2.cvtColor(cv2.imread(str(samples_dir / "00000001_000.png"), cv2.IMREAD_GRAYSCALE), cv2.COLOR_GRAY2BGR)
    picture[10:30, 10:60] = (0, 0, 255)  # a red burnt-in marker, 0.4 % of the pixels
    image = decode_image(cv2.imencode(".png", picture)[1].tobytes())
    assert image.pixels.shape == (512, 512)


# ---------------------------------------------------------------------------
# Whatever the damage, only RefusedInput comes out


@pytest.mark.parametrize(
    "name",
    ["00000001_000.png", "utils_example1.jpg", "siim_cr_jpeg_baseline_mono2.dcm", "cr_mono1_acr_nema_no_preamble.dcm"],
)
def test_damaged_input_never_raises_anything_else(name: str, samples_dir: Path) -> None:
    rng = np.random.default_rng(0)
    original = np.frombuffer((samples_dir / name).read_bytes(), np.uint8)
    for _ in range(6):
        data = original[: rng.integers(1, len(original))].copy()
        data[rng.integers(0, len(data), 8)] = rng.integers(0, 256, 8, dtype=np.uint8)
        with contextlib.suppress(RefusedInput):  # a refusal is a fine answer; anything else is not
            decode_image(data.tobytes())
