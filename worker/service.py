"""The stages of the pipeline, whatever schedules them: ingest, segment, QC.

Celery tasks (``worker/tasks.py``) and the embedded server
(``ingest/serve.py``) both call a ``Service``; they differ only in how work
reaches it and how retries are timed. Every stage is idempotent through the
index: a stage run twice for the same image never makes a second result.

Segmentation calls from many threads meet in one ``BatchRunner``: the model
runs in its own threads (``Segmenter.workers`` of them) on batches of whatever
images are waiting, while the callers read, decode and write in parallel.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import queue
import random
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from chexmask.config import Settings, resolve_device
from chexmask.errors import RefusedInput, TransientError, WeightsError
from chexmask.ingest import fetch
from chexmask.ingest.arrival import Arrival
from chexmask.status import ImageStatus
from chexmask.storage.index import MaskIndex
from chexmask.storage.models import QCStatus
from chexmask.storage.models import Segmentation as SegmentationRow
from chexmask.storage.objectstore import open_store, segmentation_keys
from chexmask.worker import bank as qc_bank
from chexmask.worker.bank import ReferenceBank
from chexmask.worker.pipeline import MASK_FILES, Prepared, Segmentation, Segmenter, prepare
from chexmask.worker.qc import assess

log = logging.getLogger(__name__)

# The QCResult fields that MaskIndex.set_qc stores (same names).
QC_FIELDS = (
    "dice_rca_mean", "dice_rca_max", "dice_rca_mean_rl", "dice_rca_mean_ll", "dice_rca_mean_h",
    "dice_rca_max_rl", "dice_rca_max_ll", "dice_rca_max_h", "shape_outlier_score", "flags",
)


@dataclass(frozen=True)
class RetryPolicy:
    """How often a stage is retried, and after how long."""

    transient_retries: int = 5   # TransientError: a storage or network hiccup
    unexpected_retries: int = 2  # any other error but a refusal (never retried)
    backoff_s: float = 5.0
    backoff_max_s: float = 600.0  # stays under the broker's visibility timeout
    # Attempts that may end with no outcome at all (the worker process died, e.g. an
    # image that crashes a decoder) before the image is failed instead of redelivered.
    max_attempts: int = 10

    def retries_for(self, exc: BaseException) -> int:
        if isinstance(exc, RefusedInput):
            return 0
        return self.transient_retries if isinstance(exc, TransientError) else self.unexpected_retries

    def delay(self, retry: int) -> float:
        """Exponential backoff with jitter, so retries of a burst spread out."""
        return min(self.backoff_max_s, self.backoff_s * 2 ** retry) * random.uniform(0.5, 1.0)


RETRY = RetryPolicy()


@dataclass(frozen=True)
class Ingested:
    image_id: int
    seconds: float
    data: bytes | None = None  # kept for callers in the same process


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


class BatchRunner:
    """One model in ``segmenter.workers`` threads; concurrent callers' images share
    its forward passes.

    A thread's batch closes when it holds ``segmenter.thread_batch`` images or
    ``wait_s`` after its first image arrived, whichever comes first.
    """

    def __init__(self, segmenter: Segmenter, wait_s: float):
        self.segmenter = segmenter
        self.wait_s = wait_s
        self._requests: queue.Queue[tuple[Prepared, Future] | None] = queue.Queue()
        self._threads = [threading.Thread(target=self._loop, name=f"chexmask-model-{i}", daemon=True)
                         for i in range(segmenter.workers)]
        for thread in self._threads:
            thread.start()

    @property
    def info(self):
        return self.segmenter.info

    def segment(self, prepared: Prepared) -> Segmentation:
        future: Future[Segmentation] = Future()
        self._requests.put((prepared, future))
        return future.result()

    def close(self) -> None:
        for _ in self._threads:
            self._requests.put(None)
        for thread in self._threads:
            thread.join()

    def _loop(self) -> None:
        torch.set_num_threads(self.segmenter.torch_threads)  # this thread's own setting
        while (first := self._requests.get()) is not None:
            batch = [first]
            deadline = time.monotonic() + self.wait_s
            while len(batch) < self.segmenter.thread_batch:
                try:
                    item = self._requests.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if item is None:
                    self._requests.put(None)  # finish this batch, then stop
                    break
                batch.append(item)
            self._run(batch)

    def _run(self, batch: list[tuple[Prepared, Future]]) -> None:
        try:
            results = self.segmenter.segment([prepared for prepared, _ in batch])
        except Exception as exc:
            if len(batch) > 1:  # find the image at fault; the others still get results
                for item in batch:
                    self._run([item])
                return
            batch[0][1].set_exception(exc)
            return
        for (_, future), result in zip(batch, results):
            future.set_result(result)


class Service:
    """Ingest, segment and QC over one index, one store and (loaded on first use) one model."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.index = MaskIndex(settings.database_url)
        self.store = open_store(settings.store_url)
        # An image holds one of these slots from decoding through the model to encoding, so
        # at most one image per core is in CPU work, as in ``chexmask segment``: more would
        # only make decoding and the model compete for the cores and their caches.
        self._cpu = threading.BoundedSemaphore(os.cpu_count() or 1)
        self._model_lock = threading.Lock()
        self._runner: BatchRunner | None = None
        # The QC bank is read now: a bank that cannot be read is a ConfigError at start,
        # not a failure of every image. ``qc_state`` says in one line what QC will do.
        self._bank, self.qc_state = qc_bank.resolve(settings.qc_bank, self._weights_sha256())
        log.info("%s", self.qc_state)

    def close(self) -> None:
        if self._runner is not None:
            self._runner.close()
        self.index.close()

    @property
    def runner(self) -> BatchRunner:
        """The model, loaded once per process on first use."""
        with self._model_lock:
            if self._runner is None:
                from chexmask.worker.weights import load

                model, info = load(None, self.settings, resolve_device(self.settings.device))
                segmenter = Segmenter(model, info, self.settings.batch_size, self.settings.model_threads)
                self._runner = BatchRunner(segmenter, self.settings.batch_wait_ms / 1000)
                log.info("model %s loaded", info.version)
            return self._runner

    # --- ingest -------------------------------------------------------------------

    def ingest(self, arrival: Arrival, keep_bytes: bool = False) -> Ingested | None:
        """Read and hash the source and register it; ``None`` when there is nothing to do
        (the source is gone, or this content is already being or was handled)."""
        started = time.perf_counter()
        try:
            data = fetch.read(arrival.uri)
        except FileNotFoundError:
            log.warning("gone before it could be read: %s", arrival.uri)
            return None
        registration = self.index.register_image(
            uri=arrival.uri, dataset=arrival.dataset, dataset_image_id=arrival.dataset_image_id,
            release=arrival.release, etag_or_version=arrival.etag,
            sha256=hashlib.sha256(data).hexdigest(), size=len(data),
        )
        # A known image still queued was registered by a producer, or by an ingest
        # that died before handing it on: either way it still needs segmenting.
        if not (registration.needs_processing or registration.image.status is ImageStatus.QUEUED):
            log.info("already %s: %s", registration.image.status.value, arrival.uri)
            return None
        return Ingested(registration.image.id, time.perf_counter() - started, data if keep_bytes else None)

    # --- segment ------------------------------------------------------------------

    def segment(self, image_id: int, data: bytes | None = None, timings: dict[str, float] | None = None) -> Result:
        """Segment one image and write its results; refusals are recorded, not raised.

        Raises ``TransientError`` (retry) or any unexpected error (retry, then ``fail``).
        """
        image = self.index.get_image(image_id)
        if image is None:
            log.warning("image %d is not in the index", image_id)
            return Result(image_id, ImageStatus.FAILED, reason="not in the index")
        if image.status is ImageStatus.REFUSED:
            return Result(image_id, ImageStatus.REFUSED, code=image.refusal_code, reason=image.reason)
        version = self.runner.info.version
        if image.sha256 and (done := self._reuse(image_id, image.sha256, version)):
            return done
        if image.status is ImageStatus.PROCESSING and image.attempts >= RETRY.max_attempts:
            reason = f"gave up after {image.attempts} attempts that ended without a result (the worker died each time)"
            self.index.mark(image_id, ImageStatus.FAILED, reason=reason)
            return Result(image_id, ImageStatus.FAILED, reason=reason)
        self.index.mark(image_id, ImageStatus.PROCESSING)
        started = time.perf_counter()
        try:
            data = fetch.read(image.uri) if data is None else data
        except FileNotFoundError:
            reason = f"source not found: {image.uri}"
            self.index.mark(image_id, ImageStatus.FAILED, reason=reason)
            return Result(image_id, ImageStatus.FAILED, reason=reason)
        fetched = time.perf_counter() - started
        with self._cpu:  # decoding, the model and encoding; writing (fsync) waits on the disk
            try:
                prepared = prepare(data, image.uri.rsplit("/", 1)[-1])
            except RefusedInput as exc:
                self.index.mark(image_id, ImageStatus.REFUSED, exc.code, exc.message)
                return Result(image_id, ImageStatus.REFUSED, code=exc.code, reason=exc.message)
            if prepared.sha256 != image.sha256:
                # The source changed after it was registered: record what was read.
                self.index.update_image(image_id, sha256=prepared.sha256, size=prepared.size)
                if done := self._reuse(image_id, prepared.sha256, version):
                    return done
            prepared.seconds["fetch"] = fetched
            segmentation = self.runner.segment(prepared)
            started = time.perf_counter()
            artefacts = self._artefacts(segmentation)
            prepared.seconds["encode"] = time.perf_counter() - started
        row = self._write(image_id, segmentation, artefacts, timings or {})
        self.index.update_image(
            image_id, height=prepared.padding.height, width=prepared.padding.width,
            modality=_short(prepared.source.get("modality")), view_position=_short(prepared.source.get("view_position")),
        )
        self.index.mark(image_id, ImageStatus.DONE)
        return Result(image_id, ImageStatus.DONE, row.id, row.qc_status is QCStatus.PENDING, prepared=prepared)

    def fail(self, image_id: int, exc: BaseException) -> None:
        """Record that an image failed for good (retries spent)."""
        self.index.mark(image_id, ImageStatus.FAILED, reason=f"{type(exc).__name__}: {exc}"[:2000])

    def _reuse(self, image_id: int, sha256: str, version: str) -> Result | None:
        """The existing segmentation of this content by this model, if any (marks the image done)."""
        row = self.existing_segmentation(sha256, version)
        if row is None:
            return None
        self.index.mark(image_id, ImageStatus.DONE)
        return Result(image_id, ImageStatus.DONE, row.id, row.qc_status is QCStatus.PENDING, reused=True)

    def existing_segmentation(self, sha256: str, version: str) -> SegmentationRow | None:
        # A read by the unique (sha256, model) pair; MaskIndex only answers has_segmentation.
        from sqlmodel import Session, select

        with Session(self.index.engine) as session:
            return session.exec(select(SegmentationRow).where(
                SegmentationRow.image_sha256 == sha256, SegmentationRow.model_version == version)).first()

    def _artefacts(self, segmentation: Segmentation) -> dict[str, tuple[bytes, str]]:
        """The stored objects by key attribute: record, masks (RLE), mask PNGs and overlay."""
        padding = segmentation.prepared.padding
        rle, rle_1024 = _named_rle(segmentation)
        masks = {"height": padding.height, "width": padding.width, "rle": rle, "rle_1024": rle_1024}
        artefacts = {"record": (json.dumps(segmentation.record()).encode(), "application/json"),
                     "masks": (json.dumps(masks).encode(), "application/json")}
        for filename, data in segmentation.pictures().items():
            name, suffix = filename.rsplit(".", 1)
            artefacts[name] = (data, "image/png" if suffix == "png" else "image/jpeg")
        return artefacts

    def _write(self, image_id: int, segmentation: Segmentation, artefacts: dict[str, tuple[bytes, str]],
               timings: dict[str, float]) -> SegmentationRow:
        """Artefacts to the store first, then the index row, so a row never points at
        missing objects. Keys are content-addressed: a rerun rewrites the same objects."""
        started = time.perf_counter()
        prepared, info = segmentation.prepared, segmentation.model
        keys = segmentation_keys(prepared.sha256, info.version)
        for name, (data, content_type) in artefacts.items():
            self.store.put(getattr(keys, name), data, content_type)
        rle, rle_1024 = _named_rle(segmentation)
        seconds = {**timings, **prepared.seconds, "store": time.perf_counter() - started}
        row, _ = self.index.add_segmentation(
            image_id=image_id, image_sha256=prepared.sha256, model_version=info.version,
            weights_sha256=info.weights_sha256, landmarks_1024=segmentation.landmarks_1024.tolist(),
            landmarks_original=segmentation.landmarks_original.tolist(),
            height=prepared.padding.height, width=prepared.padding.width, rle=rle, rle_1024=rle_1024,
            latent=segmentation.latent.tolist(), object_keys=keys.as_dict(), timings=seconds,
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
        row = self.index.get_segmentation(segmentation_id)
        if row is None:
            raise KeyError(f"no segmentation with id {segmentation_id}")
        if image1024 is None:
            image = self.index.get_image(row.image_id)
            image1024 = prepare(fetch.read(image.uri), image.uri.rsplit("/", 1)[-1]).image
        latent = None if row.latent is None else np.asarray(row.latent, dtype=np.float32)
        with self._cpu:  # QC takes a core slot like a segmentation, so the two share the cores
            result = assess(image1024, np.asarray(row.landmarks_1024, dtype=np.float64), latent, self.bank)
        status = QCStatus.DONE if result.status == "done" else QCStatus.SKIPPED
        reason = result.reason if self.bank is not None else self.qc_state
        self.index.set_qc(segmentation_id, status=status, reason=reason,
                          **{name: getattr(result, name) for name in QC_FIELDS})
        return status


def _named_rle(segmentation: Segmentation) -> tuple[dict[str, str], dict[str, str]]:
    """RLE by mask file name, at original resolution and at 1024."""
    return ({MASK_FILES[k]: v for k, v in segmentation.rle.items()},
            {MASK_FILES[k]: v for k, v in segmentation.rle_1024.items()})


def _short(value: Any, limit: int = 16) -> str | None:
    """DICOM strings fitted to the index's short columns."""
    return str(value)[:limit] if value else None
