"""Where arrivals go: a Celery queue, or the embedded server's own threads.

``Intake`` is the one door for every producer (watcher, listeners, scanner):
it drops what the index already knows unchanged, queues the rest, and only
then registers it, so a crash between the two re-queues (harmless: stages are
idempotent) rather than loses an image.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from celery import Celery

from chexmask.ingest.registry import Registry
from chexmask.logs import image_context
from chexmask.messages import Arrival
from chexmask.queues import INGEST_QUEUE, INGEST_TASK

log = logging.getLogger(__name__)


class IngestQueue(Protocol):
    def put(self, arrivals: Sequence[Arrival]) -> None:
        """Hand arrivals on; returns once they are safely queued."""


class CeleryQueue:
    """Ingest tasks on the broker, sent by name: producers never import the task code."""

    def __init__(self, app: Celery):
        self.app = app

    def put(self, arrivals: Sequence[Arrival]) -> None:
        with self.app.producer_or_acquire() as producer:
            for arrival in arrivals:
                self.app.send_task(INGEST_TASK, args=[arrival.to_dict()], queue=INGEST_QUEUE, producer=producer)


@dataclass
class Offered:
    new: int = 0
    changed: int = 0
    skipped: int = 0
    covered: int = 0  # new files an imported segmentation already covers (registered, not queued)


class Intake:
    def __init__(self, registry: Registry, queue: IngestQueue):
        self.registry = registry
        self.queue = queue

    def offer(self, arrivals: Sequence[Arrival]) -> Offered:
        """Queue the new and changed arrivals; returns once they are safely queued."""
        triage = self.registry.triage(_latest(arrivals))
        if triage.to_queue:
            self.queue.put(triage.to_queue)
            self.registry.record(triage)
            for arrival in triage.to_queue:
                with image_context(dataset=arrival.dataset):  # no image id before it is admitted
                    log.info("queued %s", arrival.uri)
        self.registry.record_covered(triage.covered)
        return Offered(len(triage.new), len(triage.changed), len(triage.unchanged), len(triage.covered))


def _latest(arrivals: Sequence[Arrival]) -> list[Arrival]:
    """One arrival per URI (the last), as a batch may announce a file twice."""
    return list({a.uri: a for a in arrivals}.values())
