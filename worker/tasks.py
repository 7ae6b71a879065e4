"""Celery tasks: thin wrappers over ``Service`` that add retries and hand-offs.

ingest -> segment -> qc. A task raises ``TransientError`` -> retried with
exponential backoff; any other error -> retried a couple of times, then the
image is marked failed with the reason; ``RefusedInput`` is recorded as
refused inside ``Service.segment`` and never retried.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import asdict
from typing import TypeVar

from celery import Task
from celery.signals import worker_process_init

from chexmask.config import Settings
from chexmask.ingest.arrival import Arrival
from chexmask.worker.celery_app import INGEST_TASK, QC_TASK, SCAN_TASK, SEGMENT_TASK, app
from chexmask.worker.service import RETRY, Service

log = logging.getLogger(__name__)
T = TypeVar("T")

_service: Service | None = None
_service_lock = threading.Lock()


def service() -> Service:
    """This process's Service: one index engine, one store client, one model."""
    global _service
    with _service_lock:
        if _service is None:
            _service = Service(Settings.from_env())
        return _service


@worker_process_init.connect
def _fresh_service_after_fork(**_: object) -> None:
    # Database connections and model threads do not survive a fork; each child builds its own.
    global _service
    _service = None


def _attempt(task: Task, image_id: int | None, work: Callable[[], T]) -> T:
    # The tasks have max_retries=None: RETRY decides, per kind of error.
    try:
        return work()
    except Exception as exc:
        retries = task.request.retries
        if retries < RETRY.retries_for(exc):
            countdown = RETRY.delay(retries)
            log.warning("%s[%s] retry %d in %.0f s: %s", task.name, task.request.id, retries + 1, countdown, exc)
            raise task.retry(exc=exc, countdown=countdown)
        if image_id is not None:
            service().fail(image_id, exc)
        raise


@app.task(name=INGEST_TASK, bind=True, max_retries=None)
def ingest(self: Task, arrival: dict) -> int | None:
    """Read, hash and register one arrival, then queue its segmentation."""
    ingested = _attempt(self, None, lambda: service().ingest(Arrival.from_dict(arrival)))
    if ingested is None:
        return None
    segment.delay(ingested.image_id, {"ingest": ingested.seconds}, time.time())
    return ingested.image_id


@app.task(name=SEGMENT_TASK, bind=True, max_retries=None)
def segment(self: Task, image_id: int, timings: dict[str, float] | None = None,
            queued_at: float | None = None) -> str:
    """Segment one registered image (batched with the others this worker holds)."""
    timings = dict(timings or {})
    if queued_at is not None:
        timings["queue_wait"] = max(0.0, time.time() - queued_at)
    result = _attempt(self, image_id, lambda: service().segment(image_id, timings=timings))
    if result.qc_pending:
        qc.delay(result.segmentation_id)
    return result.status.value


@app.task(name=QC_TASK, bind=True, max_retries=None)
def qc(self: Task, segmentation_id: int) -> str:
    return _attempt(self, None, lambda: service().qc(segmentation_id)).value


@app.task(name=SCAN_TASK, bind=True, max_retries=None)
def scan(self: Task, uri: str, dataset: str | None = None, release: str | None = None) -> dict:
    """A periodic scan of a configured prefix (``CHEXMASK_SCAN_PREFIXES``)."""
    from chexmask.ingest.queue import CeleryQueue, Intake
    from chexmask.ingest.registry import Registry
    from chexmask.ingest.scanner import ReleaseScanner

    s = service()
    intake = Intake(Registry(s.index), CeleryQueue(app))
    scanner = ReleaseScanner(intake, dataset=dataset, release=release,
                             state_dir=s.settings.home / "scans", progress=False)
    return asdict(_attempt(self, None, lambda: scanner.scan(uri)))
