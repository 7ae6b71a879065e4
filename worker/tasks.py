"""Celery tasks of the worker: segment, QC and push, thin wrappers over ``Service``.

segment -> qc (which sends the DICOM outputs on); push sends them again when a
sweep finds a push due. A task that raises is retried as ``chexmask.retry`` says (a
refusal is recorded inside ``Service.segment`` and never retried); once the
retries are spent the image is marked failed with the reason.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TypeVar

from celery import Task
from celery.signals import worker_process_init

from chexmask.config import Settings
from chexmask.logs import image_context
from chexmask.queues import PUSH_TASK, QC_TASK, SEGMENT_TASK
from chexmask.retry import RETRY
from chexmask.worker.celery_app import app
from chexmask.worker.service import Service

log = logging.getLogger(__name__)
T = TypeVar("T")

_service: Service | None = None
_service_lock = threading.Lock()


def service() -> Service:
    """This process's Service: one index engine, one store client, one model."""
    global _service
    with _service_lock:
        if _service is None:
            settings = Settings.from_env()
            # QC goes to the qc queue: the broker redelivers it within the visibility timeout.
            _service = Service(settings, qc_handoff_s=settings.visibility_timeout_s)
        return _service


@worker_process_init.connect
def _fresh_service_after_fork(**_: object) -> None:
    # Database connections do not survive a fork; each child builds its own.
    global _service
    _service = None


def attempt(task: Task, work: Callable[[], T], on_give_up: Callable[[Exception], None] = lambda exc: None) -> T:
    """``work()``, retried through Celery as ``RETRY`` says (the tasks have
    max_retries=None: the policy decides, per kind of error)."""
    try:
        return work()
    except Exception as exc:
        delay = RETRY.next_delay(exc, task.request.retries)
        if delay is not None:
            log.warning(
                "%s[%s] retry %d in %.0f s: %s", task.name, task.request.id, task.request.retries + 1, delay, exc
            )
            raise task.retry(exc=exc, countdown=delay) from exc
        on_give_up(exc)
        raise


@app.task(name=SEGMENT_TASK, bind=True, max_retries=None)
def segment(self: Task, image_id: int, timings: dict[str, float] | None = None, queued_at: float | None = None) -> str:
    """Segment one registered image, then queue its QC."""
    with image_context(image_id=image_id, task_id=self.request.id):
        timings = dict(timings or {})
        if queued_at is not None:
            timings["queue_wait"] = max(0.0, time.time() - queued_at)
        result = attempt(
            self, lambda: service().segment(image_id, timings=timings), lambda exc: service().fail(image_id, exc)
        )
        if result.qc_pending:
            qc.delay(result.segmentation_id)
        return result.status.value


@app.task(name=QC_TASK, bind=True, max_retries=None)
def qc(self: Task, segmentation_id: int) -> str:
    with image_context(segmentation_id=segmentation_id, task_id=self.request.id):
        return attempt(self, lambda: service().qc(segmentation_id)).value


@app.task(name=PUSH_TASK, bind=True, max_retries=None)
def push(self: Task, segmentation_id: int) -> list[str]:
    """Send a segmentation's DICOM outputs to the destinations that have not taken them;
    a destination's failure is recorded (and tried again by the sweep), not raised."""
    with image_context(segmentation_id=segmentation_id, task_id=self.request.id):
        pushed = attempt(self, lambda: service().push(segmentation_id))
        return [f"{p.destination}: {p.status.value}" for p in pushed]
