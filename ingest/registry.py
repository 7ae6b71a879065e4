"""What the index knows of arriving images, and registering them.

Watchers, listeners and scanners ask before they queue (``triage``), so a file
seen again on a rescan, a restart or a duplicate event is not queued twice.
The consumer of the queue reads and hashes the source and registers what it
read (``admit``), which hands only new or changed content on to segmentation.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from chexmask.errors import NotARegularFile
from chexmask.messages import Arrival
from chexmask.status import ImageStatus
from chexmask.storage import sources
from chexmask.storage.chexmask_import import imported_ids
from chexmask.storage.index import MaskIndex

log = logging.getLogger(__name__)


@dataclass
class Triage:
    new: list[Arrival] = field(default_factory=list)
    changed: list[Arrival] = field(default_factory=list)
    unchanged: list[Arrival] = field(default_factory=list)
    # new files whose dataset image id an imported (published) segmentation covers
    covered: list[Arrival] = field(default_factory=list)

    @property
    def to_queue(self) -> list[Arrival]:
        return self.new + self.changed


@dataclass(frozen=True)
class Admitted:
    """An arrival read and registered, ready to segment."""

    image_id: int
    seconds: float
    data: bytes | None = None  # kept for a segmenter in the same process


class Registry:
    def __init__(self, index: MaskIndex):
        self.index = index

    def triage(self, arrivals: Sequence[Arrival]) -> Triage:
        """Sort arrivals by comparing their etag and size with the index.

        A new URI whose dataset image id has an imported segmentation is *covered*,
        not new: the published set already has it, so it is not queued (no bytes
        are read). ``record_covered`` registers it, linked to the import by its
        dataset and dataset image id, so a later ``reprocess`` can find its bytes.
        """
        known = self.index.images_by_uri(a.uri for a in arrivals)
        unknown = [a for a in arrivals if a.uri not in known]
        imported = self._imported(unknown)
        triage = Triage()
        for arrival in arrivals:
            image = known.get(arrival.uri)
            if image is None and (arrival.dataset, arrival.dataset_image_id) in imported:
                triage.covered.append(arrival)
            elif image is None:
                triage.new.append(arrival)
            elif _differs(arrival.etag, image.etag_or_version) or _differs(arrival.size, image.size):
                triage.changed.append(arrival)
            else:
                triage.unchanged.append(arrival)
        return triage

    def _imported(self, arrivals: Sequence[Arrival]) -> set[tuple[str, str]]:
        by_dataset: dict[str, list[str]] = {}
        for a in arrivals:
            by_dataset.setdefault(a.dataset, []).append(a.dataset_image_id)
        return {
            (dataset, image_id)
            for dataset, ids in by_dataset.items()
            for image_id in imported_ids(self.index, dataset, ids)
        }

    def record_covered(self, arrivals: Sequence[Arrival]) -> None:
        """Register covered arrivals as done, in one statement (see ``triage``)."""
        self.index.register_linked([_described(a) for a in arrivals])

    def record(self, triage: Triage) -> None:
        """Register what ``triage`` found to queue, as queued: the new arrivals in one
        statement, changed ones (and new ones registered meanwhile by another producer)
        one by one, as their stored content is replaced."""
        added = self.index.register_new([_described(a) for a in triage.new])
        for a in [a for a in triage.new if a.uri not in added] + triage.changed:
            self.index.register_image(**_described(a))

    def admit(self, arrival: Arrival, keep_bytes: bool = False) -> Admitted | None:
        """Read and hash the source and register it; ``None`` when there is nothing to do
        (the source is gone, or this content is already being or was handled)."""
        started = time.perf_counter()
        try:
            data = sources.read(arrival.uri)
        except FileNotFoundError:
            log.warning("gone before it could be read: %s", arrival.uri)
            return None
        except NotARegularFile as exc:  # a FIFO or device put in place of the file
            log.warning("%s", exc)
            return None
        registration = self.index.register_image(
            uri=arrival.uri,
            dataset=arrival.dataset,
            dataset_image_id=arrival.dataset_image_id,
            release=arrival.release,
            etag_or_version=arrival.etag,
            sha256=hashlib.sha256(data).hexdigest(),
            size=len(data),
        )
        # A known image still queued was registered by a producer, or by an admission
        # that died before handing it on: either way it still needs segmenting.
        if not (registration.needs_processing or registration.image.status is ImageStatus.QUEUED):
            log.info("already %s: %s", registration.image.status.value, arrival.uri)
            return None
        image_id = registration.image.id
        assert image_id is not None  # a stored row always has its id
        return Admitted(image_id, time.perf_counter() - started, data if keep_bytes else None)


def _described(arrival: Arrival) -> dict[str, Any]:
    """What an arrival tells of its image, as ``MaskIndex.register_*`` take it."""
    return {
        "uri": arrival.uri,
        "dataset": arrival.dataset,
        "dataset_image_id": arrival.dataset_image_id,
        "release": arrival.release,
        "etag_or_version": arrival.etag,
        "size": arrival.size,
    }


def _differs(given: object, stored: object) -> bool:
    return given is not None and stored is not None and given != stored
