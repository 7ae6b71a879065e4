"""Registering what producers offer, on SQLite and PostgreSQL."""

from __future__ import annotations

from chexmask.ingest.registry import Registry
from chexmask.messages import Arrival
from chexmask.status import ImageStatus


def arrival(i: int, etag: str = "e1", size: int = 10) -> Arrival:
    return Arrival(f"s3://release/{i}.png", "nih", f"{i}.png", "2024", etag, size)


def test_new_arrivals_are_registered_together_and_one_registered_meanwhile_takes_the_new_content(index):
    registry = Registry(index)
    arrivals = [arrival(i) for i in range(4)]
    triage = registry.triage(arrivals)
    assert triage.new == arrivals
    # another producer registers one of them, with other content, before this one records
    index.register_image(uri=arrivals[1].uri, dataset="nih", etag_or_version="e0", size=9)
    registry.record(triage)
    images = index.images_by_uri(a.uri for a in arrivals)
    assert {uri: (i.status, i.etag_or_version, i.size, i.release) for uri, i in images.items()} == {
        a.uri: (ImageStatus.QUEUED, "e1", 10, "2024") for a in arrivals
    }
    assert registry.triage(arrivals).unchanged == arrivals


def test_register_new_adds_only_unknown_uris_and_says_which(index):
    index.register_image(uri=arrival(0).uri, dataset="nih", etag_or_version="old")
    given = [{"uri": a.uri, "dataset": "NIH", "dataset_image_id": a.dataset_image_id} for a in map(arrival, range(3))]
    assert index.register_new(given, ImageStatus.DONE) == {arrival(1).uri, arrival(2).uri}
    images = index.images_by_uri(a.uri for a in map(arrival, range(3)))
    assert [(images[arrival(i).uri].status, images[arrival(i).uri].etag_or_version) for i in range(3)] == [
        (ImageStatus.QUEUED, "old"),
        (ImageStatus.DONE, None),
        (ImageStatus.DONE, None),
    ]
    assert {i.dataset for i in images.values()} == {"chestx-ray8"}  # dataset names made canonical
    assert index.register_new([]) == set()
