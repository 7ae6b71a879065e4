"""``chexmask serve``: the whole pipeline in one process, with no server to run.

A folder watcher feeds a pool of threads; each thread admits, segments and
QCs one image at a time, the model running in the thread itself (``Service``).
Results go to the index (SQLite by default) and the store (a folder).

There is no broker: the index is the queue. An image registered but not
finished when the process stopped is taken up again at the next start, and the
watcher's first scan offers whatever arrived in between.
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

from chexmask.config import Settings
from chexmask.ingest.queue import Intake
from chexmask.ingest.registry import Registry
from chexmask.ingest.watcher import DEFAULT_RECONCILE_S, DEFAULT_SETTLE_S, FolderWatcher
from chexmask.logs import image_context
from chexmask.messages import Arrival
from chexmask.retry import RETRY
from chexmask.status import ImageStatus
from chexmask.storage.queries import QueryFilters
from chexmask.worker.service import Result, Service
from chexmask.worker.weights import ModelInfo

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class Done:
    """One image finished, for the progress display."""

    label: str
    status: str  # segmented, reused, refused, failed, gone
    detail: str = ""
    seconds: float = 0.0

    def line(self) -> str:
        return f"{self.status:<9} {self.label}  {self.detail}".rstrip() + (
            f"  ({self.seconds:.1f} s)" if self.status in ("segmented", "reused") else "")


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
    def __init__(self, settings: Settings, inbox: Path, *, dataset: str | None = None,
                 release: str | None = None, polling: bool = False, threads: int | None = None,
                 settle: float = DEFAULT_SETTLE_S, reconcile_every: float = DEFAULT_RECONCILE_S,
                 on_done: Callable[[Done], None] = lambda done: None):
        self.service = Service(settings)
        self.dataset, self.release = dataset, release
        self.on_done = on_done
        self.tally = Tally()
        # Twice the batch size: one batch can fill while the previous one is inferred.
        self._pool = ThreadPoolExecutor(threads or 2 * settings.batch_size, thread_name_prefix="chexmask-serve")
        self._futures: set[Future] = set()
        self._lock = threading.Lock()
        self.registry = Registry(self.service.index)
        self.intake = Intake(self.registry, self)
        self.watcher = FolderWatcher(inbox, self.offer, polling=polling, settle=settle,
                                     reconcile_every=reconcile_every)

    def start(self) -> ModelInfo:
        """Migrate the index, load the model, and take up unfinished images."""
        self.service.index.upgrade()
        info = self.service.model
        self._recover(info.version)
        return info

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

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self.service.close()

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

    def _recover(self, version: str) -> None:
        unfinished = [
            image for status in (ImageStatus.QUEUED, ImageStatus.PROCESSING)
            for image in self.service.index.images_missing_model(version, QueryFilters(status=status))
        ]
        if unfinished:
            log.warning("taking up %d unfinished image(s) from the index", len(unfinished))
        for image in unfinished:
            self._submit(self._process_image, image.id, image.uri.rsplit("/", 1)[-1], None, {})

    def _submit(self, fn: Callable[..., None], *args: object) -> None:
        future = self._pool.submit(self._guard, fn, *args)
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
        except Exception:  # already recorded in the index; keep the thread pool going
            log.exception("processing failed")

    # --- one image ------------------------------------------------------------------------

    def _process_arrival(self, arrival: Arrival) -> None:
        with image_context(dataset=arrival.dataset):
            started = time.monotonic()
            admitted = self._retrying(None, arrival.name, lambda: self.registry.admit(arrival, keep_bytes=True))
            if admitted is None:
                self._done(Done(arrival.name, "gone", "already handled or no longer there"))
                return
            self._process_image(admitted.image_id, arrival.name, admitted.data, {"ingest": admitted.seconds}, started)

    def _process_image(self, image_id: int, label: str, data: bytes | None, timings: dict[str, float],
                       started: float | None = None) -> None:
        # Service.segment logs the image's outcome line (Service.fail when it fails for good).
        with image_context(image_id=image_id):
            started = started or time.monotonic()
            result = self._retrying(image_id, label, lambda: self.service.segment(image_id, data, timings))
            if result is None:
                return
            if result.qc_pending and (segmentation_id := result.segmentation_id) is not None:
                image = result.prepared.image if result.prepared else None
                self._retrying(None, label, lambda: self.service.qc(segmentation_id, image))
            self._done(_done(label, result, time.monotonic() - started))

    def _retrying(self, image_id: int | None, label: str, work: Callable[[], T]) -> T | None:
        """``work()`` retried in this thread as ``RETRY`` says; a failure for good is
        recorded (and the image failed) and answers None."""
        try:
            return RETRY.run(work, on_retry=lambda exc, delay: log.warning(
                "%s: %s; retrying in %.0f s", label, exc, delay))
        except Exception as exc:
            if image_id is not None:
                self.service.fail(image_id, exc)  # logs the image's outcome line, traceback included
            else:
                log.exception("%s failed", label)
            self._done(Done(label, "failed", f"{type(exc).__name__}: {exc}"))
            return None

    def _done(self, done: Done) -> None:
        with self._lock:
            self.tally.counts[done.status] = self.tally.counts.get(done.status, 0) + 1
        self.on_done(done)


def _done(label: str, result: Result, seconds: float) -> Done:
    if result.status is ImageStatus.DONE:
        return Done(label, "reused" if result.reused else "segmented", f"segmentation {result.segmentation_id}", seconds)
    if result.status is ImageStatus.REFUSED:
        return Done(label, "refused", f"{result.code}: {result.reason}")
    return Done(label, "failed", result.reason or "")
