"""DICOM results of a DICOM input, built with highdicom: a binary Segmentation (SEG)
and a Comprehensive 3D SR measurement report (TID 1500).

The SEG holds three segments (1 right lung, 2 left lung, 3 heart; SNOMED CT codes) at
the source's own rows and columns, the very masks of the RLE columns, referencing the
source SOP Instance; it is written with the segmentation, as artefact ``seg``. The SR
is written once QC has run (artefact ``sr``), so it carries the Dice RCA values: CTR,
heart/lung area ratio and Dice RCA (Mean/Max) for the image, and per organ its area
(mm^2 when the pixel spacing is known, else pixels) and Dice RCA, each organ's group
referencing its SEG segment.

UIDs are derived from the image's sha256 and the model version, so a rerun makes the
same objects (the store's keys are content-addressed too).
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Mapping
from copy import deepcopy
from dataclasses import dataclass

import highdicom as hd
import numpy as np
import pydicom
from pydicom import config
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pydicom.valuerep import validate_value

from chexmask import __version__
from chexmask.anatomy import ORGAN_NAMES, ORGAN_ROWS
from chexmask.worker.measure import Measurements
from chexmask.worker.weights import ModelInfo

MANUFACTURER = "chexmask-stream"
MODEL_NAME = "HybridGNet (CheXmask)"
SEG_SERIES_NUMBER = 9801  # high numbers keep derived series after the acquired ones in viewers
SR_SERIES_NUMBER = 9802

# SNOMED CT codes of the segments, in the model's organ order (segment numbers 1-3).
ANATOMICAL_STRUCTURE = hd.sr.CodedConcept("91723000", "SCT", "Anatomical structure")
ORGAN_CODES: dict[str, hd.sr.CodedConcept] = {
    "RL": hd.sr.CodedConcept("3341006", "SCT", "Right lung"),
    "LL": hd.sr.CodedConcept("44029006", "SCT", "Left lung"),
    "H": hd.sr.CodedConcept("80891009", "SCT", "Heart"),
}
SEGMENT_NUMBERS = {organ: number for number, organ in enumerate(ORGAN_ROWS, start=1)}
ORGAN_LABELS = {"RL": "Right lung", "LL": "Left lung", "H": "Heart"}

# Concepts no standard terminology names exactly get codes of our own private scheme
# (PS3.16 8.2: a "99" prefix), each with its meaning spelled out.
SCHEME = "99CHEXMASK"
CTR = hd.sr.CodedConcept("CTR", SCHEME, "Cardiothoracic ratio")
HEART_LUNG_AREA_RATIO = hd.sr.CodedConcept("HLAR", SCHEME, "Heart to lung area ratio")
DICE_RCA_MEAN = hd.sr.CodedConcept("DRCAMEAN", SCHEME, "Dice RCA (Mean)")
DICE_RCA_MAX = hd.sr.CodedConcept("DRCAMAX", SCHEME, "Dice RCA (Max)")
QC_STATUS = hd.sr.CodedConcept("QCSTATUS", SCHEME, "Segmentation quality control status")
AREA = codes.SCT.Area
UNITLESS = hd.sr.CodedConcept("1", "UCUM", "no units")
SQUARE_MM = hd.sr.CodedConcept("mm2", "UCUM", "square millimeter")
PIXELS = hd.sr.CodedConcept("{pixels}", "UCUM", "pixels")

# Type 2 attributes of the Patient and General Study modules: present (empty if unknown)
# in every object we write, which sources from old archives do not always honour.
_TYPE2_PATIENT_STUDY = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
)
# Without these the source cannot be referenced: no SEG is made for it.
REFERENCE_ATTRIBUTES = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")


class NotReferenceable(ValueError):
    """The source lacks the UIDs a SEG must reference (an ACR-NEMA file, say)."""


@dataclass(frozen=True)
class QualityScores:
    """The Dice RCA values of a segmentation (overall and per organ code), and QC's status."""

    status: str
    mean: float | None = None
    max: float | None = None
    mean_by_organ: Mapping[str, float | None] | None = None
    max_by_organ: Mapping[str, float | None] | None = None


def source_header(data: bytes) -> Dataset:
    """The source's attributes (no pixel data) with the type 2 patient and study ones
    present. Raises ``NotReferenceable`` when it has no SOP, study or series UID."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about every non-conformant value
        ds = pydicom.dcmread(io.BytesIO(data), force=True, stop_before_pixels=True)
    missing = [keyword for keyword in REFERENCE_ATTRIBUTES if not ds.get(keyword)]
    if missing:
        raise NotReferenceable(f"the source has no {', '.join(missing)}")
    _drop_invalid_text(ds)
    for keyword in _TYPE2_PATIENT_STUDY:
        if keyword not in ds:
            setattr(ds, keyword, None)
    if "PixelSpacing" in ds and not _positive_pair(ds.PixelSpacing):
        del ds.PixelSpacing  # "0\\0" (RG1): copied into the SEG it would make it invalid
    return ds


def _drop_invalid_text(ds: Dataset) -> None:
    """Remove text values the source's VR forbids (Patient's Age "62" for "062Y"):
    copied into the SEG and SR they would make them invalid. Type 2 ones become empty."""
    for element in list(ds):
        if not isinstance(element.value, str) or not element.value:
            continue
        try:
            validate_value(element.VR, element.value, config.RAISE)
        except ValueError:
            if element.keyword in _TYPE2_PATIENT_STUDY:
                element.value = None
            else:
                del ds[element.tag]


def _positive_pair(value: object) -> bool:
    try:
        numbers = [float(v) for v in value]  # type: ignore[attr-defined]
    except (TypeError, ValueError):
        return False
    return len(numbers) == 2 and all(v > 0 for v in numbers)


def _uid(image_sha256: str, model: ModelInfo, kind: str) -> str:
    return generate_uid(entropy_srcs=[image_sha256, model.version, kind])


def algorithm(model: ModelInfo) -> hd.AlgorithmIdentificationSequence:
    return hd.AlgorithmIdentificationSequence(
        name=model.name,
        family=codes.cid7162.ArtificialIntelligence,
        version=model.version,
        parameters={"weights_sha256": model.weights_sha256},
    )


def build_seg(
    source: Dataset, masks: Mapping[str, np.ndarray], model: ModelInfo, image_sha256: str
) -> hd.seg.Segmentation:
    """A binary SEG of the three organ masks (0/255, the source's rows x columns)."""
    algorithm_id = algorithm(model)
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=SEGMENT_NUMBERS[organ],
            segment_label=ORGAN_LABELS[organ],
            segmented_property_category=ANATOMICAL_STRUCTURE,
            segmented_property_type=ORGAN_CODES[organ],
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm_id,
            tracking_uid=_uid(image_sha256, model, f"track-{organ}"),
            tracking_id=ORGAN_NAMES[organ],
        )
        for organ in ORGAN_ROWS
    ]
    # stacked segments: (frames, rows, columns, segments), one frame
    stacked = np.stack([masks[organ] == 255 for organ in ORGAN_ROWS], axis=-1)[np.newaxis]
    # highdicom copies a projection image's Pixel Spacing into a Pixel Measures item
    # without Slice Thickness, which its own reader (Segmentation.from_dataset) then
    # refuses. Without it the SEG lies on the grid of the source it references, as
    # projection SEGs (no frame of reference) are aligned by viewers anyway.
    grid = deepcopy(source)
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        if keyword in grid:
            delattr(grid, keyword)
    seg = hd.seg.Segmentation(
        source_images=[grid],
        pixel_array=stacked.astype(np.uint8),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=_uid(image_sha256, model, "seg-series"),
        series_number=SEG_SERIES_NUMBER,
        sop_instance_uid=_uid(image_sha256, model, "seg"),
        instance_number=1,
        manufacturer=MANUFACTURER,
        manufacturer_model_name=MODEL_NAME,
        software_versions=f"chexmask-stream {__version__}",
        device_serial_number=model.weights_sha256[:16],
        series_description=f"Lungs and heart ({model.name})",
        content_label="LUNGS_HEART",
        content_description=f"HybridGNet lungs and heart, {model.version}"[:64],
        transfer_syntax_uid=ExplicitVRLittleEndian,
        omit_empty_frames=False,  # every segment keeps its frame, even an empty one
    )
    # Type 2C in General Image for images without a patient position: the source's, or empty.
    seg.PatientOrientation = source.get("PatientOrientation") or None
    return seg


def build_sr(
    source: Dataset,
    seg: Dataset,
    measurements: Measurements,
    quality: QualityScores,
    model: ModelInfo,
    image_sha256: str,
) -> hd.sr.Comprehensive3DSR:
    """A TID 1500 measurement report: one image-level group, one group per organ."""
    algorithm_id = hd.sr.AlgorithmIdentification(name=model.name, version=model.version)
    image_group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=_uid(image_sha256, model, "sr-image"), identifier="chest radiograph"
        ),
        algorithm_id=algorithm_id,
        source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(source)],
        measurements=_measured(
            (CTR, measurements.ctr, UNITLESS),
            (HEART_LUNG_AREA_RATIO, measurements.heart_lung_area_ratio, UNITLESS),
            (DICE_RCA_MEAN, quality.mean, UNITLESS),
            (DICE_RCA_MAX, quality.max, UNITLESS),
        ),
        qualitative_evaluations=[
            hd.sr.QualitativeEvaluation(QC_STATUS, hd.sr.CodedConcept(quality.status.upper(), SCHEME, quality.status))
        ],
    )
    organ_groups = [
        hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(
                uid=_uid(image_sha256, model, f"track-{organ}"), identifier=ORGAN_NAMES[organ]
            ),
            referenced_segment=_segment_reference(seg, source, SEGMENT_NUMBERS[organ]),
            finding_type=ORGAN_CODES[organ],
            algorithm_id=algorithm_id,
            measurements=_measured(
                (AREA, *_area(measurements, organ)),
                (DICE_RCA_MEAN, (quality.mean_by_organ or {}).get(organ), UNITLESS),
                (DICE_RCA_MAX, (quality.max_by_organ or {}).get(organ), UNITLESS),
            ),
        )
        for organ in ORGAN_ROWS
    ]
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(
            observer_device_context=hd.sr.ObserverContext(
                observer_type=codes.DCM.Device,
                observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
                    uid=_uid(image_sha256, model, "device"), name=model.version, model_name=MODEL_NAME
                ),
            )
        ),
        procedure_reported=hd.sr.CodedConcept("399208008", "SCT", "Plain chest X-ray"),
        imaging_measurements=[image_group, *organ_groups],
    )
    sr = hd.sr.Comprehensive3DSR(
        evidence=[source, seg],
        content=report,
        series_instance_uid=_uid(image_sha256, model, "sr-series"),
        series_number=SR_SERIES_NUMBER,
        sop_instance_uid=_uid(image_sha256, model, "sr"),
        instance_number=1,
        manufacturer=MANUFACTURER,
        series_description=f"Lung and heart measurements ({model.name})",
        is_complete=True,
        is_final=True,
    )
    sr.CodingSchemeIdentificationSequence = [_private_scheme()]
    return sr


def _private_scheme() -> Dataset:
    """Declares our private coding scheme, as PS3.3 C.12.1.1.2 asks of private schemes."""
    scheme = Dataset()
    scheme.CodingSchemeDesignator = SCHEME
    scheme.CodingSchemeName = "chexmask-stream measurements and quality control"
    scheme.CodingSchemeResponsibleOrganization = MANUFACTURER
    return scheme


def _segment_reference(seg: Dataset, source: Dataset, segment_number: int) -> hd.sr.ReferencedSegmentationFrame:
    """A segment of our SEG: one frame per segment, in segment order (``build_seg``
    keeps empty frames), so segment n is frame n."""
    reference = hd.sr.ReferencedSegmentationFrame(
        sop_class_uid=seg.SOPClassUID,
        sop_instance_uid=seg.SOPInstanceUID,
        frame_number=segment_number,
        segment_number=segment_number,
        source_image=hd.sr.SourceImageForSegmentation.from_source_image(source),
    )
    # The Image SOP Instance Reference macro (PS3.3 table 10-3) allows a frame or a
    # segment number, not both (dciodvfy: "shall not be present when ReferencedFrameNumber
    # is present"); highdicom writes both. The frame names the segment on its own.
    del reference[0].ReferencedSOPSequence[0].ReferencedSegmentNumber
    return reference


def _area(measurements: Measurements, organ: str) -> tuple[float | None, hd.sr.CodedConcept]:
    """An organ's area in mm^2 when the spacing is known, else in pixels."""
    name = ORGAN_NAMES[organ]
    in_mm2 = getattr(measurements, f"{name}_area_mm2")
    if in_mm2 is not None:
        return in_mm2, SQUARE_MM
    return getattr(measurements, f"{name}_area_px"), PIXELS


def _measured(*items: tuple[hd.sr.CodedConcept, float | None, hd.sr.CodedConcept]) -> list[hd.sr.Measurement]:
    """The measurements that have a value (Dice RCA is None when QC was skipped)."""
    return [hd.sr.Measurement(name=name, value=value, unit=unit) for name, value, unit in items if value is not None]


def encode(dataset: Dataset) -> bytes:
    """A Part 10 file's bytes."""
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()
