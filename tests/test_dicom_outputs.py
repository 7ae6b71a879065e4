"""DICOM SEG and SR of DICOM inputs (worker/dicom_outputs.py): built by the Service for a
real radiograph through the real model, read back with highdicom, equal to the RLE
masks, referencing the source, carrying the CTR and Dice RCA, valid for dciodvfy, and
written out by ``chexmask export --format dicom-seg``."""

from __future__ import annotations

import io
import shutil
import subprocess
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from click.testing import CliRunner
from pydicom.uid import ExplicitVRLittleEndian, SegmentationStorage
from services import embedded_service
from test_measure import synthetic_landmarks

from chexmask.app.cli import cli
from chexmask.ingest.registry import Registry
from chexmask.messages import Arrival
from chexmask.status import ImageStatus, QCStatus
from chexmask.worker.dicom_outputs import NotReferenceable, QualityScores, build_seg, build_sr, encode, source_header
from chexmask.worker.measure import measure_landmarks
from chexmask.worker.postprocess import organ_masks, rle_decode
from chexmask.worker.service import Service
from chexmask.worker.weights import ModelInfo

SOURCE = "sitk_cxr_ExplicitLE.dcm"  # CR chest 2140x1760, Pixel Spacing 0.2 mm


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    """With the bundled trained weights: untrained ones draw organs off the image."""
    with embedded_service(tmp_path_factory.mktemp("home")) as service:
        yield service


@pytest.fixture(scope="module")
def segmented(service, samples_dir, tmp_path_factory):
    """The sample DICOM segmented and QC'd: (source path, segmentation row before QC, after QC)."""
    folder = tmp_path_factory.mktemp("in")
    source = folder / SOURCE
    shutil.copyfile(samples_dir / SOURCE, source)
    ingested = Registry(service.index).admit(Arrival.for_file(source))
    result = service.segment(ingested.image_id)
    assert result.status is ImageStatus.DONE
    before = service.index.get_segmentation(result.segmentation_id)
    assert service.qc(before.id, result.prepared.image) is QCStatus.DONE
    return source, before, service.index.get_segmentation(before.id)


def stored(service, key: str) -> pydicom.Dataset:
    return pydicom.dcmread(io.BytesIO(service.store.get(key)))


def test_measurements_of_a_dicom_with_pixel_spacing(segmented):
    _, before, _ = segmented
    assert before.pixel_spacing_source == "PixelSpacing"
    assert (before.pixel_spacing_row_mm, before.pixel_spacing_col_mm) == (0.2, 0.2)
    assert before.ctr is not None and before.ctr > 0
    assert before.heart_area_px == np.count_nonzero(rle_decode(before.rle_heart, before.height, before.width))
    assert before.heart_area_mm2 == pytest.approx(before.heart_area_px * 0.04)
    assert before.heart_lung_area_ratio == pytest.approx(
        before.heart_area_px / (before.right_lung_area_px + before.left_lung_area_px)
    )


def test_seg_reads_back_with_the_rle_masks_at_original_resolution(service, segmented):
    source_path, before, _ = segmented
    assert "seg" in before.object_keys and "sr" not in before.object_keys  # the SR waits for QC
    assert before.object_keys["seg"].endswith("/seg.dcm")
    source = pydicom.dcmread(source_path, stop_before_pixels=True)
    seg = hd.seg.Segmentation.from_dataset(stored(service, before.object_keys["seg"]), copy=False)
    assert seg.SOPClassUID == SegmentationStorage
    assert seg.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert seg.SegmentationType == "BINARY"
    assert (seg.Rows, seg.Columns) == (source.Rows, source.Columns) == (before.height, before.width)
    assert seg.StudyInstanceUID == source.StudyInstanceUID
    referenced = seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0]
    assert referenced.ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert referenced.ReferencedSOPClassUID == source.SOPClassUID
    codes = [(s.SegmentNumber, s.SegmentedPropertyTypeCodeSequence[0].CodeValue) for s in seg.SegmentSequence]
    assert codes == [(1, "3341006"), (2, "44029006"), (3, "80891009")]
    category = {s.SegmentedPropertyCategoryCodeSequence[0].CodeValue for s in seg.SegmentSequence}
    assert category == {"91723000"}
    algorithm = seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
    assert algorithm.AlgorithmVersion == before.model_version
    assert algorithm.AlgorithmParameters == f"weights_sha256={before.weights_sha256}"

    pixels = seg.get_pixels_by_source_instance([source.SOPInstanceUID], segment_numbers=[1, 2, 3])
    assert pixels.shape == (1, before.height, before.width, 3)
    for number, organ in enumerate(("right_lung", "left_lung", "heart")):
        ours = rle_decode(getattr(before, f"rle_{organ}"), before.height, before.width) == 255
        assert ours.any(), organ
        np.testing.assert_array_equal(pixels[0, :, :, number].astype(bool), ours, err_msg=organ)


def numeric_values(content: pydicom.Sequence) -> list[tuple[str, float, str]]:
    """(concept meaning, value, unit code) of every NUM item, depth first."""
    found = []
    for item in content:
        if item.ValueType == "NUM":
            value = item.MeasuredValueSequence[0]
            found.append(
                (
                    item.ConceptNameCodeSequence[0].CodeMeaning,
                    float(value.NumericValue),
                    value.MeasurementUnitsCodeSequence[0].CodeValue,
                )
            )
        found += numeric_values(item.get("ContentSequence", []))
    return found


def test_sr_after_qc_carries_ctr_areas_and_dice_rca(service, segmented):
    source_path, _, after = segmented
    assert "sr" in after.object_keys and after.object_keys["sr"].endswith("/sr.dcm")
    sr = hd.sr.Comprehensive3DSR.from_dataset(stored(service, after.object_keys["sr"]))
    source = pydicom.dcmread(source_path, stop_before_pixels=True)
    assert sr.StudyInstanceUID == source.StudyInstanceUID
    evidence = {uid for _, _, uid in _evidence(sr)}
    seg = stored(service, after.object_keys["seg"])
    assert {source.SOPInstanceUID, seg.SOPInstanceUID} <= evidence
    values = numeric_values(sr.ContentSequence)
    ctr = [value for meaning, value, _ in values if meaning == "Cardiothoracic ratio"]
    assert ctr == [pytest.approx(after.ctr, abs=1e-6)]
    dice = [value for meaning, value, _ in values if meaning == "Dice RCA (Mean)"]
    assert pytest.approx(after.dice_rca_mean, abs=1e-6) in dice
    areas = sorted((value, unit) for meaning, value, unit in values if meaning == "Area")
    expected = sorted((a, "mm2") for a in (after.right_lung_area_mm2, after.left_lung_area_mm2, after.heart_area_mm2))
    assert [(pytest.approx(a, rel=1e-6), u) for a, u in expected] == areas


def _evidence(sr: pydicom.Dataset) -> list[tuple[str, str, str]]:
    found = []
    for study in sr.CurrentRequestedProcedureEvidenceSequence:
        for series in study.ReferencedSeriesSequence:
            for sop in series.ReferencedSOPSequence:
                found.append((study.StudyInstanceUID, sop.ReferencedSOPClassUID, sop.ReferencedSOPInstanceUID))
    return found


def test_dciodvfy_finds_no_error(service, segmented, tmp_path):
    if shutil.which("dciodvfy") is None:
        pytest.skip("dciodvfy is not installed: apt-get install dicom3tools (scripts/ensure-services.sh does)")
    _, _, after = segmented
    for kind in ("seg", "sr"):
        path = tmp_path / f"{kind}.dcm"
        path.write_bytes(service.store.get(after.object_keys[kind]))
        assert dciodvfy_errors(path) == [], kind


def test_export_dicom_seg_writes_the_files(service, segmented, tmp_path, monkeypatch):
    _, _, after = segmented
    monkeypatch.setenv("CHEXMASK_DATABASE_URL", service.settings.database_url)
    monkeypatch.setenv("CHEXMASK_STORE_URL", service.settings.store_url)
    image = service.index.get_image(after.image_id)
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["export", "--dataset", image.dataset, "--format", "dicom-seg", "--out", str(out)])
    assert result.exit_code == 0, result.output
    folder = out / after.model_version
    stem = image.dataset_image_id.replace("/", "__")
    assert (folder / f"{stem}.seg.dcm").read_bytes() == service.store.get(after.object_keys["seg"])
    assert (folder / f"{stem}.sr.dcm").read_bytes() == service.store.get(after.object_keys["sr"])


def test_a_source_without_uids_cannot_be_referenced(samples_dir, tmp_path):
    ds = pydicom.dcmread(samples_dir / SOURCE)
    del ds.SOPInstanceUID
    path = tmp_path / "no-uid.dcm"
    ds.save_as(path)
    with pytest.raises(NotReferenceable, match="SOPInstanceUID"):
        source_header(path.read_bytes())


# ---------------------------------------------------------------------------
# The builders on every DICOM sample (no model: the synthetic thorax of test_measure)

SAMPLE_SOURCES = [
    "siim_cr_jpeg_baseline_mono2.dcm",
    "Fake_MONOHR1.dcm",
    "cr_jpeg_lossless_mono1_inverse.dcm",
    "cr_mono1_acr_nema_no_preamble.dcm",
    "sitk_cxr_JPEGLS.dcm",
    "sitk_cxr_RLE.dcm",
]
PYDICOM_SOURCES = ["RG1_UNCR.dcm", "RG1_J2KI.dcm", "RG3_UNCR.dcm"]  # RG1: Pixel Spacing 0\0


def dciodvfy_errors(path: Path) -> list[str]:
    run = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=120)
    return [line for line in (run.stdout + run.stderr).splitlines() if line.startswith("Error")]


@pytest.mark.parametrize("name", SAMPLE_SOURCES + PYDICOM_SOURCES)
def test_seg_and_sr_of_every_sample_source(name, samples_dir, pydicom_file, tmp_path):
    path = pydicom_file(name) if name in PYDICOM_SOURCES else samples_dir / name
    if not path.is_file():
        pytest.skip(f"{path} is not available")
    source = source_header(path.read_bytes())
    rows, columns = int(source.Rows), int(source.Columns)
    points = synthetic_landmarks() * min(rows, columns) // 1000  # the thorax fitted to the image
    masks = organ_masks(points, rows, columns)
    model = ModelInfo("chexmask-test", "chexmask-test-0123456789ab", "ab" * 32, "")
    seg_bytes = encode(build_seg(source, masks, model, "cd" * 32))
    seg = hd.seg.segread(io.BytesIO(seg_bytes))
    pixels = seg.get_pixels_by_source_instance([source.SOPInstanceUID], segment_numbers=[1, 2, 3])
    for number, organ in enumerate(("RL", "LL", "H")):
        np.testing.assert_array_equal(pixels[0, :, :, number].astype(bool), masks[organ] == 255, err_msg=organ)
    quality = QualityScores("done", 0.8, 0.9, {"RL": 0.8, "LL": 0.81, "H": 0.7}, {"RL": 0.9, "LL": 0.9, "H": 0.8})
    measured = measure_landmarks(points, rows, columns)
    sr_bytes = encode(build_sr(source, pydicom.dcmread(io.BytesIO(seg_bytes)), measured, quality, model, "cd" * 32))
    values = numeric_values(pydicom.dcmread(io.BytesIO(sr_bytes)).ContentSequence)
    assert ("Cardiothoracic ratio", pytest.approx(measured.ctr, abs=1e-6), "1") in values
    if shutil.which("dciodvfy"):
        for kind, data in (("seg", seg_bytes), ("sr", sr_bytes)):
            (tmp_path / f"{kind}.dcm").write_bytes(data)
            assert dciodvfy_errors(tmp_path / f"{kind}.dcm") == [], (name, kind)


def test_a_qc_worker_elsewhere_writes_the_sr(service, samples_dir, tmp_path):
    """QC in another process (Celery): the SR is made from the source read again."""
    source = tmp_path / "other.dcm"
    ds = pydicom.dcmread(samples_dir / SOURCE)
    ds.SOPInstanceUID = pydicom.uid.generate_uid()  # other bytes: a segmentation of its own
    ds.save_as(source)
    ingested = Registry(service.index).admit(Arrival.for_file(source))
    result = service.segment(ingested.image_id)
    assert "sr" not in service.index.get_segmentation(result.segmentation_id).object_keys
    elsewhere = Service(service.settings)
    try:
        assert elsewhere.qc(result.segmentation_id) is QCStatus.DONE
    finally:
        elsewhere.close()
    row = service.index.get_segmentation(result.segmentation_id)
    sr = stored(service, row.object_keys["sr"])
    assert sr.SOPInstanceUID != stored(service, row.object_keys["seg"]).SOPInstanceUID
    assert ds.SOPInstanceUID in {uid for _, _, uid in _evidence(sr)}
