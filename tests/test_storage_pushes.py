"""The record of where DICOM outputs were sent (storage/pushes.py), on SQLite and
PostgreSQL: registered once per destination, held, taken by one sweep, outcomes."""

from __future__ import annotations

from datetime import timedelta

from chexmask.status import PushStatus
from chexmask.storage import pushes
from chexmask.storage.models import utcnow
from chexmask.storage.queries import QueryFilters

PACS, ARCHIVE = "dicom:PACS@pacs:104", "stow:http://archive/dicom-web/studies"


def test_pushes_are_registered_once_held_taken_and_recorded(index, sample):
    _, seg = sample("a.dcm")
    held = pushes.hold(index, seg.id, [PACS, ARCHIVE], 0)
    assert [(p.destination, p.status, p.attempts) for p in held] == [
        (PACS, PushStatus.PENDING, 0),
        (ARCHIVE, PushStatus.PENDING, 0),
    ]
    assert [p.id for p in pushes.hold(index, seg.id, [PACS, ARCHIVE], 0)] == [p.id for p in held]  # registered once
    assert pushes.due(index, [PACS]) == [seg.id]  # a sender that held it for 0 s is gone
    assert pushes.due(index, ["dicom:OTHER@x:104"]) == []  # only configured destinations
    assert pushes.take(index, seg.id, 300) and not pushes.take(index, seg.id, 300)  # one sweep wins
    assert pushes.due(index, [PACS, ARCHIVE]) == []

    pushes.record_done(index, held[0].id)
    retry_at = pushes.record_failure(index, held[1], "archive answered 503", retry_for_s=86_400)
    done, failed = pushes.of(index, seg.id)
    assert (done.status, done.attempts, done.reason, done.retry_at) == (PushStatus.DONE, 1, None, None)
    assert done.pushed_at is not None
    assert (failed.status, failed.attempts, failed.reason) == (PushStatus.FAILED, 1, "archive answered 503")
    assert failed.retry_at == retry_at and retry_at - utcnow() > timedelta(seconds=50)

    assert [p.destination for p in pushes.hold(index, seg.id, [PACS, ARCHIVE], 60)] == [ARCHIVE]
    assert [p.destination for p in pushes.hold(index, seg.id, [PACS, ARCHIVE], 60, again=True)] == [PACS, ARCHIVE]


def test_a_failure_past_the_retry_window_is_left_to_the_command(index, sample):
    _, seg = sample("a.dcm")
    [push] = pushes.hold(index, seg.id, [PACS], 0)
    assert pushes.record_failure(index, push, "refused", retry_for_s=0) is None
    [failed] = pushes.of(index, seg.id)
    assert failed.status is PushStatus.FAILED and failed.retry_at is None
    assert pushes.due(index, [PACS]) == []


def test_dicom_segmentations_are_those_with_a_seg(index, sample):
    _, dicom = sample("a.dcm", object_keys={"seg": "segmentations/x/seg.dcm"})
    sample("b.png", object_keys={"record": "segmentations/y/record.json"})
    assert pushes.dicom_segmentations(index, QueryFilters()) == [dicom.id]
