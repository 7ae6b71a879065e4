"""Celery tasks of the intake: admit an arrival, and scan a configured release.

``ingest`` reads, hashes and registers one arrival, then queues its
segmentation by name; ``scan`` is the periodic release scan of a prefix named
in ``CHEXMASK_SCAN_PREFIXES`` (run by beat). ``chexmask worker`` loads these
beside the worker's own tasks.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict

from celery import Task

from chexmask.ingest.queue import CeleryQueue, Intake
from chexmask.ingest.registry import Registry
from chexmask.ingest.scanner import ReleaseScanner
from chexmask.logs import bind, image_context
from chexmask.messages import Arrival
from chexmask.queues import INGEST_TASK, SCAN_TASK, SEGMENT_QUEUE, SEGMENT_TASK
from chexmask.worker.celery_app import app
from chexmask.worker.tasks import attempt, service

log = logging.getLogger(__name__)


@app.task(name=INGEST_TASK, bind=True, max_retries=None)
def ingest(self: Task, arrival: dict) -> int | None:
    """Read, hash and register one arrival, then queue its segmentation."""
    arrival_ = Arrival.from_dict(arrival)
    with image_context(dataset=arrival_.dataset, task_id=self.request.id):
        registry = Registry(service().index)
        admitted = attempt(self, lambda: registry.admit(arrival_))
        if admitted is None:
            log.debug("%s: already handled or no longer there", arrival_.name)
            return None
        bind(image_id=admitted.image_id)
        app.send_task(
            SEGMENT_TASK, args=[admitted.image_id, {"ingest": admitted.seconds}, time.time()], queue=SEGMENT_QUEUE
        )
        log.debug("%s registered; segmentation queued", arrival_.name)
        return admitted.image_id


@app.task(name=SCAN_TASK, bind=True, max_retries=None)
def scan(self: Task, uri: str, dataset: str | None = None, release: str | None = None) -> dict:
    """A periodic scan of a configured prefix (``CHEXMASK_SCAN_PREFIXES``)."""
    with image_context(dataset=dataset, task_id=self.request.id):
        s = service()
        intake = Intake(Registry(s.index), CeleryQueue(app))
        scanner = ReleaseScanner(
            intake, dataset=dataset, release=release, state_dir=s.settings.home / "scans", progress=False
        )
        return asdict(attempt(self, lambda: scanner.scan(uri)))
