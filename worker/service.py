"""The worker's stages, whatever schedules them: segment and QC.

Celery tasks (``worker/tasks.py``) and the embedded server (``chexmask.app.serve``)
both call a ``Service``; they differ only in how work reaches it and how
retries are timed (``chexmask.retry``). Every stage is idempotent through the
index: a stage run twice for the same image never makes a second result.

Callers bring their own threads; each image is decoded, segmented and encoded
in its caller's thread while it holds one of the process's CPU slots.
"""

from __future__ import annotations

import io
import json
import logging
import os
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import numpy as np
import pydicom

from chexmask.anatomy import ORGAN_ROWS
from chexmask.config import Settings, resolve_device
from chexmask.errors import NotARegularFile, NotFound, PushFailed, RefusedInput, WeightsError
from chexmask.faults import fault_point
from chexmask.logs import bind, image_context
from chexmask.quality import QC_FIELDS
from chexmask.retry import RETRY, next_failed_retry, transient_cause
from chexmask.status import ImageStatus, QCStatus
from chexmask.storage import pushes, sources
from chexmask.storage.index import MaskIndex
from chexmask.storage.models import DicomPush, SourceImage
from chexmask.storage.models import Segmentation as SegmentationRow
from chexmask.storage.objectstore import open_store, segmentation_keys
from chexmask.worker import bank as qc_bank
from chexmask.worker import dicom_outputs
from chexmask.worker.bank import ReferenceBank
from chexmask.worker.leases import Heartbeat, process_owner
from chexmask.worker.measure import Measurements
from chexmask.worker.pipeline import Prepared, Segmentation, Segmenter, prepare
from chexmask.worker.postprocess import grey_jpeg
from chexmask.worker.push import DICOM_MEDIA_TYPE, PUSH_HOLD_S, Pusher
from chexmask.worker.qc import assess
from chexmask.worker.weights import ModelInfo

# What highdicom and pydicom raise for source attributes they cannot use.
DICOM_BUILD_ERRORS = (ValueError, TypeError, AttributeError, KeyError)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Result:
    """What segmenting one image came to."""

    image_id: int
    status: ImageStatus
    segmentation_id: int | None = None
    qc_pending: bool = False
    reused: bool = False  # the content already had a segmentation by this model
    code: str | None = None
    reason: str | None = None
    prepared: Prepared | None = None  # the 1024 input, for QC in the same process


class Service:
    """Ingest, segment and QC over one index, one store and (loaded on first use) one model."""

    def __init__(self, settings: Settings, qc_handoff_s: float | None = None):
        """``qc_handoff_s``: QC is queued for other processes (Celery), so a new
        segmentation's QC is held for that long (the broker redelivers within it);
        None: QC runs in this process, held by it while it lives."""
        self.settings = settings
        self.index = MaskIndex(settings.database_url)
        self.store = open_store(settings.store_url, settings.s3_endpoint_url)
        self.qc_handoff_s = qc_handoff_s
        self.heartbeat = Heartbeat(self.index, settings.lease_s)
        self.pusher = Pusher(settings)
        # An image holds one of these slots from decoding through the model to encoding, so
        # at most CHEXMASK_MODEL_THREADS images (one per core by default) are in CPU work, as
        # in ``chexmask segment``: more would only make them compete for the cores and caches.
        self._cpu = threading.BoundedSemaphore(settings.model_threads or os.cpu_count() or 1)
        self._model_lock = threading.Lock()
        self._segmenter: Segmenter | None = None
        # The QC bank is read now: a bank that cannot be read is a ConfigError at start,
        # not a failure of every image. ``qc_state`` says in one line what QC will do.
        self._bank, self.qc_state = qc_bank.resolve(settings.qc_bank, self._weights_sha256())
        log.info("%s", self.qc_state)

    def close(self) -> None:
        self.heartbeat.stop()
        self.index.close()

    @property
    def segmenter(self) -> Segmenter:
        """The model, loaded once per process on first use."""
        with self._model_lock:
            if self._segmenter is None:
                from chexmask.worker.weights import load

                model, info = load(None, self.settings, resolve_device(self.settings.device))
                self._segmenter = Segmenter(
                    model,
                    info,
                    self.settings.batch_size,
                    self.settings.model_threads,
                    self.settings.max_pixels,
                    uncertainty=self.settings.uncertainty_samples,
                )
                log.info("model %s loaded", info.version)
            return self._segmenter

    @property
    def model(self) -> ModelInfo:
        return self.segmenter.info

    # --- segment ------------------------------------------------------------------

    def segment(self, image_id: int, data: bytes | None = None, timings: dict[str, float] | None = None) -> Result:
        """Segment one image and write its results; refusals are recorded, not raised.

        Raises ``TransientError`` (retry) or any unexpected error (retry, then ``fail``).
        Logs the image's one outcome line (``fail`` logs it for an image that raised
        for good); every line logged meanwhile carries the image id and dataset.
        """
        with image_context(image_id=image_id):
            started = time.perf_counter()
            image = self.index.get_image(image_id)
            if image is None:
                log.warning("image %d is not in the index", image_id)
                return Result(image_id, ImageStatus.FAILED, reason="not in the index")
            bind(dataset=image.dataset)
            result = self._segment(image_id, image, data, timings)
            _log_outcome(_label(image_id, image), result, time.perf_counter() - started)
            return result

    def _segment(
        self, image_id: int, image: SourceImage, data: bytes | None, timings: dict[str, float] | None
    ) -> Result:
        if image.status is ImageStatus.REFUSED:
            return Result(image_id, ImageStatus.REFUSED, code=image.refusal_code, reason=image.reason)
        version = self.model.version
        if image.sha256 and (done := self._reuse(image_id, image.sha256, version)):
            return done
        if image.status in (ImageStatus.PROCESSING, ImageStatus.QUEUED) and image.attempts >= RETRY.max_attempts:
            reason = f"gave up after {image.attempts} attempts that ended without a result (the worker died each time)"
            self.index.mark(image_id, ImageStatus.FAILED, reason=reason)
            return Result(image_id, ImageStatus.FAILED, reason=reason)
        self.heartbeat.ensure_started()
        self.index.mark(image_id, ImageStatus.PROCESSING, owner=process_owner(), lease_s=self.settings.lease_s)
        started = time.perf_counter()
        try:
            data = sources.read(image.uri) if data is None else data
        except FileNotFoundError:
            reason = f"source not found: {image.uri}"
            self.index.mark(image_id, ImageStatus.FAILED, reason=reason)
            return Result(image_id, ImageStatus.FAILED, reason=reason)
        except NotARegularFile as exc:
            self.index.mark(image_id, ImageStatus.REFUSED, "not_a_regular_file", str(exc))
            return Result(image_id, ImageStatus.REFUSED, code="not_a_regular_file", reason=str(exc))
        fault_point("after_fetch")
        fetched = time.perf_counter() - started
        with self._cpu:  # decoding, the model and encoding; writing (fsync) waits on the disk
            try:
                prepared = prepare(data, image.uri.rsplit("/", 1)[-1], self.settings.max_pixels)
            except RefusedInput as exc:
                self.index.mark(image_id, ImageStatus.REFUSED, exc.code, exc.message)
                return Result(image_id, ImageStatus.REFUSED, code=exc.code, reason=exc.message)
            fault_point("after_decode")
            if prepared.sha256 != image.sha256:
                # The source changed after it was registered: record what was read.
                self.index.update_image(image_id, sha256=prepared.sha256, size=prepared.size)
                if done := self._reuse(image_id, prepared.sha256, version):
                    return done
            prepared.seconds["fetch"] = fetched
            segmentation = self.segmenter.segment([prepared])[0]
            started = time.perf_counter()
            artefacts = self._artefacts(segmentation, data)
            prepared.seconds["encode"] = time.perf_counter() - started
        row = self._write(image_id, segmentation, artefacts, timings or {})
        fault_point("after_index_insert")
        self.index.update_image(
            image_id,
            height=prepared.padding.height,
            width=prepared.padding.width,
            modality=_short(prepared.source.get("modality")),
            view_position=_short(prepared.source.get("view_position")),
        )
        self.index.mark(image_id, ImageStatus.DONE)
        return Result(image_id, ImageStatus.DONE, row.id, row.qc_status is QCStatus.PENDING, prepared=prepared)

    def fail(self, image_id: int, exc: BaseException) -> None:
        """Record that an image failed (its retries here spent), and log its outcome line.
        A transient cause (a full or read-only store, a database away) is tried again by
        the sweep with growing waits until it has failed for CHEXMASK_RETRY_FAILED_FOR."""
        reason = f"{type(exc).__name__}: {exc}"[:2000]
        with image_context(image_id=image_id):
            try:
                image = self.index.get_image(image_id)
            except Exception:  # the index may be what failed; the line goes out all the same
                image = None
            if image is not None:
                bind(dataset=image.dataset)
            log.error("image %s failed: %s", _label(image_id, image), reason, exc_info=exc)
            retry_at = None
            if transient_cause(exc) and image is not None:
                now = datetime.now(timezone.utc)
                retry_at = next_failed_retry(image.failing_since, now, self.settings.retry_failed_for_s)
            self.index.mark(image_id, ImageStatus.FAILED, reason=reason, retry_at=retry_at)

    def _reuse(self, image_id: int, sha256: str, version: str) -> Result | None:
        """The existing segmentation of this content by this model, if any (marks the image done)."""
        row = self.index.segmentation_for(sha256, version)
        if row is None:
            return None
        self.index.mark(image_id, ImageStatus.DONE)
        return Result(image_id, ImageStatus.DONE, row.id, row.qc_status is QCStatus.PENDING, reused=True)

    def _artefacts(self, segmentation: Segmentation, data: bytes) -> dict[str, tuple[bytes, str]]:
        """The stored objects by key attribute: record, masks (RLE), mask PNGs, overlay,
        picture and, for a DICOM input, the DICOM SEG (its SR follows QC, see ``_write_sr``)."""
        padding = segmentation.prepared.padding
        rle, rle_1024 = segmentation.rle_by_name()
        masks = {"height": padding.height, "width": padding.width, "rle": rle, "rle_1024": rle_1024}
        artefacts = {
            "record": (json.dumps(segmentation.record()).encode(), "application/json"),
            "masks": (json.dumps(masks).encode(), "application/json"),
        }
        for filename, picture in segmentation.pictures().items():
            name, suffix = filename.rsplit(".", 1)
            artefacts[name] = (picture, "image/png" if suffix == "png" else "image/jpeg")
        artefacts["picture"] = (grey_jpeg(segmentation.prepared.image), "image/jpeg")
        if segmentation.prepared.source.get("format") == "dicom":
            try:
                source = dicom_outputs.source_header(data)
                seg = dicom_outputs.build_seg(
                    source, segmentation.masks_original, segmentation.model, segmentation.prepared.sha256
                )
            except dicom_outputs.NotReferenceable as exc:
                log.info("no DICOM SEG: %s", exc)
            except DICOM_BUILD_ERRORS as exc:
                # A header highdicom cannot work with costs the image its SEG, not its masks.
                log.warning("no DICOM SEG: %s: %s", type(exc).__name__, exc)
            else:
                artefacts["seg"] = (dicom_outputs.encode(seg), DICOM_MEDIA_TYPE)
        return artefacts

    def _write(
        self,
        image_id: int,
        segmentation: Segmentation,
        artefacts: dict[str, tuple[bytes, str]],
        timings: dict[str, float],
    ) -> SegmentationRow:
        """Artefacts to the store first, then the index row, so a row never points at
        missing objects. Keys are content-addressed: a rerun rewrites the same objects."""
        started = time.perf_counter()
        prepared, info = segmentation.prepared, segmentation.model
        keys = segmentation_keys(prepared.sha256, info.version)
        for name, (data, content_type) in artefacts.items():
            self.store.put(getattr(keys, name), data, content_type)
        fault_point("after_store_write")
        rle, rle_1024 = segmentation.rle_by_name()
        seconds = {**timings, **prepared.seconds, "store": time.perf_counter() - started}
        row, _ = self.index.add_segmentation(
            image_id=image_id,
            image_sha256=prepared.sha256,
            model_version=info.version,
            weights_sha256=info.weights_sha256,
            landmarks_1024=segmentation.landmarks_1024.tolist(),
            landmarks_original=segmentation.landmarks_original.tolist(),
            height=prepared.padding.height,
            width=prepared.padding.width,
            rle=rle,
            rle_1024=rle_1024,
            latent=segmentation.latent.tolist(),
            landmark_std=None if segmentation.landmark_std is None else segmentation.landmark_std.tolist(),
            uncertainty_samples=segmentation.uncertainty_samples or None,
            object_keys={**keys.as_dict(), **{name: getattr(keys, name) for name in artefacts}},
            timings=seconds,
            # QC run here is held by this process; QC sent to a queue, for as long as
            # the broker takes to redeliver it.
            qc_owner=process_owner() if self.qc_handoff_s is None else None,
            qc_lease_s=self.settings.lease_s if self.qc_handoff_s is None else self.qc_handoff_s,
            measurements=segmentation.measurements.columns(),
        )
        return row

    # --- qc -------------------------------------------------------------------------

    @property
    def bank(self) -> ReferenceBank | None:
        """The QC reference bank (``CHEXMASK_QC_BANK``, else the bundled one), or None:
        then only the plausibility checks run and RCA is marked skipped, with ``qc_state``
        as the reason."""
        return self._bank

    def _weights_sha256(self) -> str | None:
        """The serving weights' identity, without loading the model (QC workers may have none)."""
        from chexmask.worker.weights import resolve_weights

        try:
            return resolve_weights(None, self.settings)[1].weights_sha256
        except WeightsError:
            return None

    def qc(self, segmentation_id: int, image1024: np.ndarray | None = None) -> QCStatus:
        """Plausibility checks and, with a bank, Dice RCA scores of one segmentation."""
        with image_context(segmentation_id=segmentation_id):
            row = self.index.get_segmentation(segmentation_id)
            if row is None:
                raise NotFound(f"no segmentation with id {segmentation_id}")
            bind(image_id=row.image_id, dataset=row.dataset)
            self.heartbeat.ensure_started()
            self.index.take_qc(segmentation_id, process_owner(), self.settings.lease_s)
            fault_point("before_qc")
            status = self._qc(segmentation_id, row, image1024)
            fault_point("after_qc")
            log.debug("segmentation %d: QC %s", segmentation_id, status.value)
            return status

    def _qc(self, segmentation_id: int, row: SegmentationRow, image1024: np.ndarray | None) -> QCStatus:
        data = None
        if image1024 is None:
            uri = self._image_of(row).uri
            data = sources.read(uri)
            image1024 = prepare(data, uri.rsplit("/", 1)[-1], self.settings.max_pixels).image
        latent = None if row.latent is None else np.asarray(row.latent, dtype=np.float32)
        with self._cpu:  # QC takes a core slot like a segmentation, so the two share the cores
            result = assess(image1024, np.asarray(row.landmarks_1024, dtype=np.float64), latent, self.bank)
        status = QCStatus.DONE if result.status == "done" else QCStatus.SKIPPED
        reason = result.reason if self.bank is not None else self.qc_state
        destinations = self.settings.push_destinations if "seg" in row.object_keys else []
        if destinations:
            # Registered before QC is done: should this process die before sending, a
            # sweep finds the push once its hold runs out, and sends it.
            pushes.hold(self.index, segmentation_id, destinations, PUSH_HOLD_S)
        scored = self.index.set_qc(
            segmentation_id, status=status, reason=reason, **{name: getattr(result, name) for name in QC_FIELDS}
        )
        if "seg" in row.object_keys:
            self._write_sr(scored, data)
        if destinations:
            try:
                self._push(segmentation_id, destinations, again=False)
            except Exception:  # the index is away: the push stays held, and the sweep sends it later
                log.exception("segmentation %s: could not send its DICOM outputs; the sweep will", segmentation_id)
        return status

    # --- push -------------------------------------------------------------------------

    def push(self, segmentation_id: int, again: bool = False) -> list[DicomPush]:
        """Send the DICOM SEG and SR of a segmentation to each configured destination
        that has not taken them yet (``again``: to every one), and record each outcome.
        A destination's failure is recorded with its reason and next try, never raised.
        Returns the pushes tried, as recorded."""
        with image_context(segmentation_id=segmentation_id):
            row = self.index.get_segmentation(segmentation_id)
            if row is None:
                raise NotFound(f"no segmentation with id {segmentation_id}")
            bind(image_id=row.image_id, dataset=row.dataset)
            destinations = self.settings.push_destinations
            if "seg" not in row.object_keys or not destinations or row.qc_status is QCStatus.PENDING:
                return []  # not a DICOM input, nowhere to send, or its QC (which sends) is still to come
            if "sr" not in row.object_keys:  # its writer died after QC: write it now
                self._write_sr(row, None)
            return self._push(segmentation_id, destinations, again)

    def _push(self, segmentation_id: int, destinations: list[str], again: bool) -> list[DicomPush]:
        row = self.index.get_segmentation(segmentation_id)
        if row is None:
            raise NotFound(f"no segmentation with id {segmentation_id}")
        held = pushes.hold(self.index, segmentation_id, destinations, PUSH_HOLD_S, again=again)
        for push in held:
            self._push_one(row, push)
        return pushes.of(self.index, segmentation_id, [push.id for push in held if push.id is not None])

    def _push_one(self, row: SegmentationRow, push: DicomPush) -> None:
        assert push.id is not None
        # The SR is missing only where it could not be made (logged then): the SEG goes alone.
        kinds = [kind for kind in ("seg", "sr") if kind in row.object_keys]
        what = " and ".join(kind.upper() for kind in kinds)
        try:
            self.pusher.send(push.destination, [self.store.get(row.object_keys[kind]) for kind in kinds])
        except Exception as exc:  # whatever it was, recorded: a push never fails the segmentation
            reason = str(exc) if isinstance(exc, PushFailed) else f"{type(exc).__name__}: {exc}"
            retry_at = pushes.record_failure(self.index, push, reason, self.settings.retry_failed_for_s)
            then = f"trying again at {retry_at:%Y-%m-%d %H:%M:%S} UTC" if retry_at else "no more automatic tries"
            log.warning(
                "segmentation %s: sending its %s to %s failed: %s; %s", row.id, what, push.destination, reason, then
            )
        else:
            pushes.record_done(self.index, push.id)
            log.info("segmentation %s: sent its %s to %s", row.id, what, push.destination)

    def _image_of(self, row: SegmentationRow) -> SourceImage:
        image = self.index.get_image(row.image_id)
        if image is None:
            raise NotFound(f"no image with id {row.image_id}")
        return image

    def _write_sr(self, row: SegmentationRow, data: bytes | None) -> None:
        """The DICOM SR of a DICOM input, written after QC so that it carries the Dice RCA
        (QC may run in another process, long after the SEG). Made from the source's
        header and the stored SEG; a source gone since segmentation leaves no SR."""
        try:
            source = dicom_outputs.source_header(data if data is not None else sources.read(self._image_of(row).uri))
        except FileNotFoundError as exc:
            log.warning("segmentation %s: no DICOM SR, the source is gone: %s", row.id, exc)
            return
        seg = pydicom.dcmread(io.BytesIO(self.store.get(row.object_keys["seg"])), stop_before_pixels=True)
        algorithm = seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
        model = ModelInfo(str(algorithm.AlgorithmName), row.model_version, row.weights_sha256, "")
        try:
            sr = dicom_outputs.build_sr(source, seg, _measurements(row), _quality(row), model, row.image_sha256)
        except DICOM_BUILD_ERRORS as exc:
            log.warning("segmentation %s: no DICOM SR: %s: %s", row.id, type(exc).__name__, exc)
            return
        key = segmentation_keys(row.image_sha256, row.model_version).sr
        self.store.put(key, dicom_outputs.encode(sr), DICOM_MEDIA_TYPE)
        self.index.add_object_keys(row.id, {"sr": key})  # type: ignore[arg-type]


def _measurements(row: SegmentationRow) -> Measurements:
    return Measurements(**{name: getattr(row, name) for name in Measurements.__dataclass_fields__})


def _quality(row: SegmentationRow) -> dicom_outputs.QualityScores:
    """The Dice RCA of a row, by organ code (RL, LL, H) as the SR wants them."""
    return dicom_outputs.QualityScores(
        status=row.qc_status.value,
        mean=row.dice_rca_mean,
        max=row.dice_rca_max,
        mean_by_organ={organ: getattr(row, f"dice_rca_mean_{organ.lower()}") for organ in ORGAN_ROWS},
        max_by_organ={organ: getattr(row, f"dice_rca_max_{organ.lower()}") for organ in ORGAN_ROWS},
    )


def _label(image_id: int, image: SourceImage | None) -> str:
    """``12 (chestx-ray8/00000001_000.png)``: how an outcome line names an image."""
    if image is None:
        return str(image_id)
    return f"{image_id} ({image.dataset}/{image.uri.rsplit('/', 1)[-1]})"


def _log_outcome(label: str, result: Result, seconds: float) -> None:
    """The one INFO line that says what became of an image."""
    if result.status is ImageStatus.DONE:
        if result.reused:
            log.info("image %s reused segmentation %s in %.1f s", label, result.segmentation_id, seconds)
        else:
            qc = "; QC pending" if result.qc_pending else ""
            log.info("image %s segmented in %.1f s (segmentation %s)%s", label, seconds, result.segmentation_id, qc)
    elif result.status is ImageStatus.REFUSED:
        log.info("image %s refused: %s: %s", label, result.code, result.reason)
    else:
        log.warning("image %s failed: %s", label, result.reason)


def _short(value: Any, limit: int = 16) -> str | None:
    """DICOM strings fitted to the index's short columns."""
    return str(value)[:limit] if value else None
