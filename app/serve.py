"""``chexmask serve``: the whole pipeline in one process, with no server to run.

A folder watcher feeds a pool of threads; each thread admits, segments and
QCs one image at a time, the model running in the thread itself (``Service``).
Results go to the index (SQLite by default) and the store (a folder).

There is no broker: the index is the queue. An image registered but not
finished when the process stopped is taken up again at the next start, and the
watcher's first scan offers whatever arrived in between. While it runs, a sweep
every half lease (``worker/leases.py``) takes up what nobody alive holds
(images and QCs of a crashed process, failed images whose retry is due) and
images put back to ``queued`` by ``chexmask retry`` or ``reprocess``, and DICOM
outputs whose sending to a configured destination failed and is due again.

Stopping is bounded: queued work is dropped (it stays ``queued`` or
``processing`` in the index and is taken up at the next start), retry waits
end at once, and images being worked on get ``STOP_GRACE_S`` to finish.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar
from urllib.parse import unquote

import numpy as np

from chexmask.config import Settings
from chexmask.ingest.dicom_listener import DicomListener
from chexmask.ingest.queue import Intake
from chexmask.ingest.registry import Registry
from chexmask.ingest.watcher import DEFAULT_RECONCILE_S, DEFAULT_SETTLE_S, FolderWatcher
from chexmask.logs import image_context
from chexmask.messages import Arrival
from chexmask.retry import RETRY
from chexmask.status import ImageStatus
from chexmask.storage.queries import QueryFilters
from chexmask.worker.leases import Sweeper
from chexmask.worker.service import Result, Service
from chexmask.worker.weights import ModelInfo

log = logging.getLogger(__name__)
T = TypeVar("T")

STOP_GRACE_S = 5.0


class Stopping(Exception):
    """The server is stopping: the work in hand is left for the next start."""


@dataclass(frozen=True)
class Done:
    """One image finished, for the progress display."""

    label: str
    status: str  # segmented, reused, refused, failed, gone
    detail: str = ""
    seconds: float = 0.0

    def line(self) -> str:
        return f"{self.status:<9} {self.label}  {self.detail}".rstrip() + (
            f"  ({self.seconds:.1f} s)" if self.status in ("segmented", "reused") else ""
        )


@dataclass
class Tally:
    counts: dict[str, int] = field(default_factory=dict)
    unchanged: int = 0
    started: float = field(default_factory=time.monotonic)

    def summary(self) -> str:
        seconds = time.monotonic() - self.started
        done = self.counts.get("segmented", 0) + self.counts.get("reused", 0)
        parts = [f"{n} {status}" for status, n in sorted(self.counts.items())] or ["nothing to do"]
        if self.unchanged:
            parts.append(f"{self.unchanged} unchanged")
        rate = f", {done / seconds:.2f} images/s" if done and seconds > 0 else ""
        return f"{', '.join(parts)} in {seconds:.1f} s{rate}"


class Server:
    def __init__(
        self,
        settings: Settings,
        inbox: Path,
        *,
        dataset: str | None = None,
        release: str | None = None,
        polling: bool = False,
        threads: int | None = None,
        settle: float = DEFAULT_SETTLE_S,
        reconcile_every: float = DEFAULT_RECONCILE_S,
        on_done: Callable[[Done], None] = lambda done: None,
        dicom_port: int | None = None,
        dicom_ae_title: str | None = None,
    ):
        self.service = Service(settings)
        self.dataset, self.release = dataset, release
        self.on_done = on_done
        self.tally = Tally()
        # Twice the batch size: one batch can fill while the previous one is inferred.
        self._pool = ThreadPoolExecutor(threads or 2 * settings.batch_size, thread_name_prefix="chexmask-serve")
        self._futures: set[Future] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._in_flight_ids: set[int] = set()
        self._in_flight_uris: set[str] = set()
        self._version = ""
        self.sweeper = Sweeper(
            self.service.index,
            self._resegment,
            self._requalify,
            settings.lease_s,
            repush=self._repush,
            push_to=settings.push_destinations,
        )
        self._sweep_every = max(0.5, settings.lease_s / 2)
        self._sweep_thread = threading.Thread(target=self._sweep_loop, name="chexmask-sweep", daemon=True)
        self.registry = Registry(self.service.index)
        self.intake = Intake(self.registry, self)
        self.watcher = FolderWatcher(inbox, self.offer, polling=polling, settle=settle, reconcile_every=reconcile_every)
        # DICOM pushed by a PACS or modality: stored, then offered to the same intake.
        self.dicom = (
            DicomListener(
                self.intake,
                self.service.store,
                port=dicom_port,
                ae_title=dicom_ae_title or settings.dicom_ae_title,
                dataset=dataset,
                release=release,
            )
            if dicom_port is not None
            else None
        )

    def start(self) -> ModelInfo:
        """Migrate the index, load the model, and take up unfinished images."""
        self.service.index.upgrade()
        info = self.service.model
        self._version = info.version
        self._recover()
        return info

    def start_sweeping(self) -> None:
        """Take up abandoned, due and re-queued work every half lease, in a thread."""
        self._sweep_thread.start()

    def run_once(self) -> None:
        """Process what is in the inbox now (and anything unfinished), then return."""
        self.offer(self.watcher.once())
        self.wait()

    def wait(self) -> None:
        while True:
            with self._lock:
                pending = list(self._futures)
            if not pending:
                return
            for future in pending:
                future.result()

    def stop(self, grace: float = STOP_GRACE_S) -> bool:
        """Stop taking work, drop what waits, give running images ``grace`` seconds;
        whether everything running finished (if not, its threads are abandoned: the
        index still says where each image stands)."""
        self._stop.set()
        self._pool.shutdown(wait=False, cancel_futures=True)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            with self._lock:
                if not any(f.running() for f in self._futures):
                    return True
            time.sleep(0.05)
        return False

    def close(self) -> None:
        self._stop.set()
        self._pool.shutdown(wait=not self._stopped_hard(), cancel_futures=True)
        self.service.close()

    def _stopped_hard(self) -> bool:
        with self._lock:
            return any(f.running() for f in self._futures)

    # --- feeding ------------------------------------------------------------------------

    def offer(self, paths: list[Path]) -> None:
        arrivals = []
        for path in paths:
            try:
                arrivals.append(Arrival.for_file(path, self.dataset, self.release))
            except FileNotFoundError:
                continue
        offered = self.intake.offer(arrivals)
        with self._lock:
            self.tally.unchanged += offered.skipped

    def put(self, arrivals: Sequence[Arrival]) -> None:
        """``IngestQueue``: the server's threads are its queue."""
        for arrival in arrivals:
            self._submit(self._process_arrival, arrival)

    def _recover(self) -> None:
        """Take up what nobody alive holds, and images waiting in ``queued``."""
        swept = self.sweeper.sweep()
        queued = self._pick_up_queued()
        if swept.total or queued:
            log.warning(
                "taking up %d unfinished image(s) and %d pending QC(s) from the index",
                swept.resegment + swept.retried + queued,
                swept.requalify,
            )

    def _pick_up_queued(self) -> int:
        """Images in ``queued`` that this server is not already on (the index is the queue)."""
        waiting = self.service.index.images_missing_model(self._version, QueryFilters(status=ImageStatus.QUEUED))
        taken = 0
        for image in waiting:
            with self._lock:
                if image.id is None or image.id in self._in_flight_ids or image.uri in self._in_flight_uris:
                    continue
                self._in_flight_ids.add(image.id)
            self._submit(self._process_image, image.id, _label(image.uri), None, {})
            taken += 1
        return taken

    def _resegment(self, image_id: int) -> None:
        image = self.service.index.get_image(image_id)
        with self._lock:
            if image is None or image_id in self._in_flight_ids:
                return
            self._in_flight_ids.add(image_id)
        self._submit(self._process_image, image_id, _label(image.uri), None, {})

    def _requalify(self, segmentation_id: int) -> None:
        self._submit(self._process_qc, segmentation_id, f"segmentation {segmentation_id}")

    def _repush(self, segmentation_id: int) -> None:
        self._submit(self._process_push, segmentation_id)

    def _process_push(self, segmentation_id: int) -> None:
        self.service.push(segmentation_id)

    def _sweep_loop(self) -> None:
        while not self._stop.wait(self._sweep_every):
            try:
                self._recover()
            except Exception:  # the index is away: the next sweep tries again
                log.exception("sweep failed")

    def _submit(self, fn: Callable[..., None], *args: object) -> None:
        if self._stop.is_set():
            return
        try:
            future = self._pool.submit(self._guard, fn, *args)
        except RuntimeError:  # shut down meanwhile: the index keeps the work for the next start
            return
        with self._lock:
            self._futures.add(future)
        future.add_done_callback(self._discard)

    def _discard(self, future: Future) -> None:
        with self._lock:
            self._futures.discard(future)

    @staticmethod
    def _guard(fn: Callable[..., None], *args: object) -> None:
        try:
            fn(*args)
        except Stopping:
            pass
        except Exception:  # already recorded in the index; keep the thread pool going
            log.exception("processing failed")

    # --- one image ------------------------------------------------------------------------

    def _process_arrival(self, arrival: Arrival) -> None:
        started = time.monotonic()
        with self._lock:
            self._in_flight_uris.add(arrival.uri)
        try:
            with image_context(dataset=arrival.dataset):
                admitted = self._retrying(None, arrival.name, lambda: self.registry.admit(arrival, keep_bytes=True))
            if admitted is None:
                self._done(Done(arrival.name, "gone", "already handled, not a regular file, or no longer there"))
                return
            with self._lock:
                if admitted.image_id in self._in_flight_ids:
                    return  # a sweep got to it first
                self._in_flight_ids.add(admitted.image_id)
            self._process_image(admitted.image_id, arrival.name, admitted.data, {"ingest": admitted.seconds}, started)
        finally:
            with self._lock:
                self._in_flight_uris.discard(arrival.uri)

    def _process_image(
        self, image_id: int, label: str, data: bytes | None, timings: dict[str, float], started: float | None = None
    ) -> None:
        """Segment and QC one image; the caller has put it in ``_in_flight_ids``.
        Service.segment logs the image's outcome line (Service.fail when it fails for good)."""
        started = started or time.monotonic()
        try:
            with image_context(image_id=image_id):
                result = self._retrying(image_id, label, lambda: self.service.segment(image_id, data, timings))
                if result is None:
                    return
                if result.qc_pending and result.segmentation_id is not None:
                    image = result.prepared.image if result.prepared else None
                    self._qc(result.segmentation_id, label, image)
                self._done(_done(label, result, time.monotonic() - started))
        finally:
            with self._lock:
                self._in_flight_ids.discard(image_id)

    def _process_qc(self, segmentation_id: int, label: str) -> None:
        with image_context(segmentation_id=segmentation_id):
            self._qc(segmentation_id, label, None)

    def _qc(self, segmentation_id: int, label: str, image: np.ndarray | None) -> None:
        if self._retrying(None, label, lambda: self.service.qc(segmentation_id, image)) is None:
            # Failed for good here: let it go, so a sweep tries again in an hour.
            self.service.index.take_qc(segmentation_id, None, 3600)

    def _retrying(self, image_id: int | None, label: str, work: Callable[[], T]) -> T | None:
        """``work()`` retried in this thread as ``RETRY`` says; a failure for good is
        recorded (and the image failed) and answers None."""
        if self._stop.is_set():
            raise Stopping()
        try:
            return RETRY.run(
                work,
                on_retry=lambda exc, delay: log.warning("%s: %s; retrying in %.0f s", label, exc, delay),
                sleep=self._sleep,
            )
        except Stopping:
            raise
        except Exception as exc:
            if image_id is not None:
                self.service.fail(image_id, exc)  # logs the image's outcome line, traceback included
            else:
                log.exception("%s failed", label)
            self._done(Done(label, "failed", f"{type(exc).__name__}: {exc}"))
            return None

    def _sleep(self, seconds: float) -> None:
        """A retry's wait, cut short (and the work abandoned) when the server stops."""
        if self._stop.wait(seconds):
            raise Stopping()

    def _done(self, done: Done) -> None:
        with self._lock:
            self.tally.counts[done.status] = self.tally.counts.get(done.status, 0) + 1
        self.on_done(done)


def _label(uri: str) -> str:
    return unquote(uri.rsplit("/", 1)[-1])


def _done(label: str, result: Result, seconds: float) -> Done:
    if result.status is ImageStatus.DONE:
        return Done(
            label, "reused" if result.reused else "segmented", f"segmentation {result.segmentation_id}", seconds
        )
    if result.status is ImageStatus.REFUSED:
        return Done(label, "refused", f"{result.code}: {result.reason}")
    return Done(label, "failed", result.reason or "")
