"""What the index already knows of arriving images: new, changed or seen before.

Watchers, listeners and scanners ask before they queue, so a file seen again
on a rescan, a restart or a duplicate event is not queued twice.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from chexmask.ingest.arrival import Arrival
from chexmask.storage.index import MaskIndex


@dataclass
class Triage:
    new: list[Arrival] = field(default_factory=list)
    changed: list[Arrival] = field(default_factory=list)
    unchanged: list[Arrival] = field(default_factory=list)

    @property
    def to_queue(self) -> list[Arrival]:
        return self.new + self.changed


class Registry:
    def __init__(self, index: MaskIndex):
        self.index = index

    def triage(self, arrivals: Sequence[Arrival]) -> Triage:
        """Sort arrivals by comparing their etag and size with the index."""
        known = self.index.images_by_uri(a.uri for a in arrivals)
        triage = Triage()
        for arrival in arrivals:
            image = known.get(arrival.uri)
            if image is None:
                triage.new.append(arrival)
            elif _differs(arrival.etag, image.etag_or_version) or _differs(arrival.size, image.size):
                triage.changed.append(arrival)
            else:
                triage.unchanged.append(arrival)
        return triage

    def record(self, arrivals: Iterable[Arrival]) -> None:
        """Register arrivals (status queued; a changed one goes back to queued)."""
        for a in arrivals:
            self.index.register_image(uri=a.uri, dataset=a.dataset, dataset_image_id=a.dataset_image_id,
                                      release=a.release, etag_or_version=a.etag, size=a.size)


def _differs(given: object, stored: object) -> bool:
    return given is not None and stored is not None and given != stored
