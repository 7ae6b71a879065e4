"""Limits before decoding: sizes are refused from the header, before any pixel is allocated.

The hostile files are crafted here, tiny on disk, each claiming an image of gigabytes;
a subprocess decodes and preprocesses them and reports its peak memory.
"""

from __future__ import annotations

import io
import json
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import ExplicitVRLittleEndian, RLELossless, SecondaryCaptureImageStorage, generate_uid

from chexmask.config import Settings
from chexmask.errors import ConfigError, RefusedInput
from chexmask.worker.decode import (
    DEFAULT_MAX_PIXELS,
    HeaderSize,
    decode_image,
    decode_path,
    header_size,
    refuse_by_header,
    sniff_format,
)

# Peak memory a refused hostile file may add to the process (measured: about 2 MB,
# see test_hostile_headers_refused_with_bounded_memory); decoding any of them
# before this change took 0.9 to 4.2 GB.
MAX_PEAK_GROWTH_MB = 64
# A header refusal reads a few hundred bytes; the 30000x30000 blank PNG took 25 s.
MAX_SECONDS = 1.0


def gradient(height: int, width: int) -> np.ndarray:
    """A grey image with content (not blank), any size."""
    return (np.add.outer(np.arange(height), np.arange(width)) % 256).astype(np.uint8)


def png_claiming(width: int, height: int) -> bytes:
    """A real 64x64 black PNG whose IHDR (with a valid CRC) declares another size."""
    data = bytearray(cv2.imencode(".png", np.zeros((64, 64), np.uint8))[1].tobytes())
    assert data[12:16] == b"IHDR"
    struct.pack_into(">II", data, 16, width, height)
    struct.pack_into(">I", data, 29, zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def strip_png(width: int, height: int) -> bytes:
    """A complete, valid PNG of a thin strip (compresses to a few KB)."""
    return cv2.imencode(".png", gradient(height, width))[1].tobytes()


def jpeg_claiming(width: int, height: int, junk_before_sof: bytes = b"") -> bytes:
    """A real small JPEG whose SOF0 frame header declares another size."""
    data = bytearray(cv2.imencode(".jpg", gradient(64, 64))[1].tobytes())
    sof = data.index(b"\xff\xc0")
    struct.pack_into(">HH", data, sof + 5, height, width)
    return bytes(data[:sof] + junk_before_sof + data[sof:])


def tiff_claiming(width: int, height: int) -> bytes:
    """A real 64x64 TIFF whose ImageWidth and ImageLength tags declare another size."""
    buffer = io.BytesIO()
    Image.fromarray(gradient(64, 64)).save(buffer, format="TIFF")
    data = bytearray(buffer.getvalue())
    (ifd,) = struct.unpack_from("<I", data, 4)
    (entries,) = struct.unpack_from("<H", data, ifd)
    for entry in range(ifd + 2, ifd + 2 + 12 * entries, 12):
        tag, kind = struct.unpack_from("<HH", data, entry)
        if tag in (256, 257):  # ImageWidth, ImageLength
            layout = {3: "<H", 4: "<I"}[kind]  # SHORT or LONG, at the start of the value field
            struct.pack_into(layout, data, entry + 8, width if tag == 256 else height)
    return bytes(data)


def j2k_claiming(width: int, height: int) -> bytes:
    """A real 64x64 JPEG 2000 codestream whose SIZ marker declares another size."""
    buffer = io.BytesIO()
    Image.fromarray(gradient(64, 64)).save(buffer, format="JPEG2000", no_jp2=True)
    data = bytearray(buffer.getvalue())
    assert data[2:4] == b"\xff\x51"  # SIZ follows SOC
    struct.pack_into(">II", data, 8, width, height)  # Xsiz, Ysiz (no image offset)
    return bytes(data)


def rle_frame(segments: int) -> bytes:
    """A small RLE Lossless frame: its header, then one 128-byte run of zeros per segment."""
    offsets = [64 + 2 * i for i in range(segments)]
    header = struct.pack("<16I", segments, *offsets, *[0] * (15 - segments))
    return header + b"\x81\x00" * segments


def dicom_claiming(
    rows: int, columns: int, syntax: str = RLELossless, *, frames: int = 1, samples: int = 1, bits: int = 16
) -> bytes:
    """A CR chest DICOM whose header declares ``rows`` x ``columns`` but holds a few bytes of pixels."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = syntax
    ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SOPClassUID, ds.SOPInstanceUID = SecondaryCaptureImageStorage, ds.file_meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.BodyPartExamined = "CR", "CHEST"
    ds.Rows, ds.Columns = rows, columns
    ds.SamplesPerPixel = samples
    ds.PhotometricInterpretation = "MONOCHROME2" if samples == 1 else "RGB"
    if samples > 1:
        ds.PlanarConfiguration = 0
    if frames > 1:
        ds.NumberOfFrames = frames
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits, bits, bits - 1, 0
    if syntax == RLELossless:
        ds.PixelData = encapsulate([rle_frame(samples * bits // 8)] * frames)
    else:
        ds.PixelData = bytes(64 * 64 * 2)  # far fewer than declared
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def refusal(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> RefusedInput:
    with pytest.raises(RefusedInput) as caught:
        decode_image(data, max_pixels=max_pixels)
    assert caught.value.message  # one human sentence
    return caught.value


# The attacks of issue 13, and their cousins in the other formats, with the code each gets.
HOSTILE = {
    "jpeg_30000x30000.jpg": (lambda: jpeg_claiming(30000, 30000), "too_large"),
    "jpeg_junk_before_sof.jpg": (lambda: jpeg_claiming(30000, 30000, junk_before_sof=b"\x00junk\xff"), "too_large"),
    "png_zeros_30000x30000.png": (lambda: png_claiming(30000, 30000), "too_large"),
    "png_strip_60000x4.png": (lambda: strip_png(60000, 4), "bad_aspect_ratio"),
    "png_strip_1000000x4.png": (lambda: strip_png(1_000_000, 4), "bad_aspect_ratio"),
    "dicom_rle_40000x40000.dcm": (lambda: dicom_claiming(40000, 40000), "too_large"),
    "dicom_native_40000x40000.dcm": (lambda: dicom_claiming(40000, 40000, ExplicitVRLittleEndian), "too_large"),
    # 25 megapixels a frame is within budget, 12 frames are not: pixel_array decodes all.
    "dicom_rle_12_frames.dcm": (lambda: dicom_claiming(5000, 5000, frames=12), "too_large"),
    # 81 megapixels is within budget, but 3 samples x 2 bytes is 486 MB decoded.
    "dicom_rle_rgb16_9000x9000.dcm": (lambda: dicom_claiming(9000, 9000, samples=3), "too_large"),
    "tiff_30000x30000.tif": (lambda: tiff_claiming(30000, 30000), "too_large"),
    "j2k_30000x30000.j2k": (lambda: j2k_claiming(30000, 30000), "too_large"),
}


@pytest.mark.parametrize("name", HOSTILE)
def test_hostile_header_refused(name: str) -> None:
    make, code = HOSTILE[name]
    data = make()
    assert len(data) < 20_000, "the attack is a small file"
    error = refusal(data)
    assert error.code == code, error.message


def test_too_large_message_names_size_and_limit() -> None:
    message = refusal(jpeg_claiming(30000, 30000)).message
    assert "30000x30000" in message and "900 megapixels" in message and "limit of 100 megapixels" in message


def test_decoded_bytes_message_names_bytes_and_limit() -> None:
    message = refusal(dicom_claiming(9000, 9000, samples=3)).message
    assert "9000x9000" in message and "486 MB" in message and "limit of 400 MB" in message


# Decodes and preprocesses (what pipeline.prepare does) each file given, and reports per
# file the refusal code, the seconds and the peak resident memory above the memory
# resident before it. Linux resets the peak (VmHWM) when "5" is written to
# /proc/self/clear_refs, so each case is measured on its own; a last 256 MB numpy
# allocation shows that the measure sees what the decoders allocate.
MEASURE = r"""
import json, sys, time
from pathlib import Path
import numpy as np
from chexmask.errors import RefusedInput
from chexmask.worker.decode import decode_image
from chexmask.worker.preprocess import preprocess

def status_mb(field):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024  # kB
    raise KeyError(field)

def measure(work):
    Path("/proc/self/clear_refs").write_text("5")  # peak := current
    before, started = status_mb("VmRSS"), time.perf_counter()
    code = work()
    return {"code": code, "seconds": time.perf_counter() - started, "peak_growth_mb": status_mb("VmHWM") - before}

def segment_input(data):
    try:
        preprocess(decode_image(data))
    except RefusedInput as exc:
        return exc.code

files = {Path(p).name: Path(p).read_bytes() for p in sys.argv[1:]}
report = {name: measure(lambda: segment_input(data)) for name, data in files.items()}
report["control_256mb"] = measure(lambda: np.ones(256 * 2**20, np.uint8).sum() and None)
print(json.dumps(report))
"""


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="measures peak memory through Linux /proc")
def test_hostile_headers_refused_with_bounded_memory(tmp_path: Path) -> None:
    paths = []
    for name, (make, _) in HOSTILE.items():
        paths.append(tmp_path / name)
        paths[-1].write_bytes(make())
    run = subprocess.run([sys.executable, "-c", MEASURE, *map(str, paths)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    print(json.dumps(report, indent=1))  # the numbers, with pytest -s
    assert report.pop("control_256mb")["peak_growth_mb"] > 250, "the measure must see a large allocation"
    for name, (_, code) in HOSTILE.items():
        assert report[name]["code"] == code, name
        assert report[name]["peak_growth_mb"] < MAX_PEAK_GROWTH_MB, (name, report[name])
        assert report[name]["seconds"] < MAX_SECONDS, (name, report[name])


# ---------------------------------------------------------------------------
# The bounds themselves


def test_pixel_budget_is_a_parameter(samples_dir: Path) -> None:
    data = (samples_dir / "00000001_000.png").read_bytes()  # 512x512 = 262144 pixels
    assert refusal(data, max_pixels=262_143).code == "too_large"
    assert decode_image(data, max_pixels=262_144).pixels.shape == (512, 512)


def test_pixel_budget_applies_to_dicom(samples_dir: Path) -> None:
    data = (samples_dir / "siim_cr_jpeg_baseline_mono2.dcm").read_bytes()  # 1024x1024, 8 bits
    assert refusal(data, max_pixels=1024 * 1024 - 1).code == "too_large"
    assert decode_image(data, max_pixels=1024 * 1024).pixels.shape == (1024, 1024)


def test_limits_are_inclusive() -> None:
    refuse_by_header(HeaderSize(10000, 10000), DEFAULT_MAX_PIXELS)  # exactly the budget
    with pytest.raises(RefusedInput, match="too_large"):
        refuse_by_header(HeaderSize(10000, 10001), DEFAULT_MAX_PIXELS)
    refuse_by_header(HeaderSize(10000, 10000, samples=4), DEFAULT_MAX_PIXELS)  # 4 bytes a pixel
    with pytest.raises(RefusedInput, match="too_large"):
        refuse_by_header(HeaderSize(10000, 10000, samples=4, bytes_per_sample=2), DEFAULT_MAX_PIXELS)


@pytest.mark.parametrize(
    ("height", "width", "code"),
    [
        (64, 256, None),  # 4:1 and 64 pixels: the limits themselves are accepted
        (256, 64, None),
        (64, 257, "bad_aspect_ratio"),
        (257, 64, "bad_aspect_ratio"),
        (63, 63, "too_small"),
        (63, 200, "too_small"),
        (1, 1, "too_small"),
    ],
)
def test_aspect_ratio_and_minimum_side(height: int, width: int, code: str | None) -> None:
    data = cv2.imencode(".png", gradient(height, width))[1].tobytes()
    if code is None:
        assert decode_image(data).pixels.shape == (height, width)
    else:
        assert refusal(data).code == code


def test_blank_check_comes_after_the_size_check() -> None:
    # The same black PNG header: blank when small enough to look at, too_large when not.
    assert refusal(png_claiming(64, 64)).code == "blank_image"
    assert refusal(png_claiming(30000, 30000)).code == "too_large"


def test_libjpeg_skips_junk_before_a_marker_and_so_does_the_header_walk() -> None:
    # libjpeg only warns about extraneous bytes: a header walk that stopped there would
    # let the frame header through unchecked.
    data = jpeg_claiming(64, 64, junk_before_sof=b"\x00junk\xff")
    assert header_size(data, "jpeg").width == 64
    assert decode_image(data).pixels.shape == (64, 64)


def test_unreadable_header_left_to_the_decoder() -> None:
    data = bytearray(png_claiming(64, 64))
    data[12:16] = b"IHDx"  # libpng needs IHDR first, as we do
    assert header_size(bytes(data), "png") is None
    assert refusal(bytes(data)).code == "corrupt_image"


# ---------------------------------------------------------------------------
# Real files are within the limits, and their headers tell their true size


def test_every_real_sample_header_matches_its_pixels(samples_dir: Path, decoded) -> None:
    for path in sorted(samples_dir.iterdir()):
        data = path.read_bytes()
        size = header_size(data, sniff_format(data))
        image = decoded(path)  # default limits: no refusal
        assert (size.height, size.width) == image.pixels.shape, path.name


def test_pydicom_data_within_limits(pydicom_file, decoded) -> None:
    for name in ("RG1_UNCR.dcm", "RG1_J2KR.dcm"):
        assert decoded(pydicom_file(name)).pixels.shape == (1955, 1841)


# ---------------------------------------------------------------------------
# Configuration


def test_settings_default_is_the_decoder_default() -> None:
    assert Settings().max_pixels == DEFAULT_MAX_PIXELS == 100_000_000


def test_settings_max_pixels_from_environment(monkeypatch: pytest.MonkeyPatch, samples_dir: Path) -> None:
    monkeypatch.setenv("CHEXMASK_MAX_PIXELS", "200000")
    settings = Settings.from_env()
    assert settings.max_pixels == 200_000
    with pytest.raises(RefusedInput) as caught:
        decode_path(samples_dir / "00000001_000.png", max_pixels=settings.max_pixels)
    assert caught.value.code == "too_large"
    assert Settings(max_pixels=300_000).max_pixels == 300_000


def test_settings_max_pixels_must_be_a_number(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CHEXMASK_MAX_PIXELS", "100M")
    with pytest.raises(ConfigError, match="CHEXMASK_MAX_PIXELS"):
        Settings.from_env()
