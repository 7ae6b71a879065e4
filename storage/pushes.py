"""Where each DICOM input's SEG and SR were sent, and how it went (the ``dicom_push``
table, see ``models.DicomPush``): registered before a push is tried, so a sender
that dies leaves it for a sweep; every outcome recorded, a failure with its reason
and its next try."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlmodel import Session

from chexmask.retry import next_failed_retry
from chexmask.status import PushStatus
from chexmask.storage.index import MaskIndex
from chexmask.storage.models import DicomPush, Segmentation, utcnow
from chexmask.storage.queries import QueryFilters


def hold(
    index: MaskIndex, segmentation_id: int, destinations: Sequence[str], hold_s: float, again: bool = False
) -> list[DicomPush]:
    """Register a push of the segmentation to each destination that has none, and hold
    every one not yet done (``again``: done ones too, to send them once more) for
    ``hold_s`` seconds; those held, to send now."""
    now = utcnow()
    dialect = postgresql if index.dialect == "postgresql" else sqlite
    insert = dialect.insert(DicomPush).on_conflict_do_nothing(index_elements=["segmentation_id", "destination"])
    rows = [
        {
            "segmentation_id": segmentation_id,
            "destination": destination,
            "status": PushStatus.PENDING,
            "attempts": 0,
            "created_at": now,
            "updated_at": now,
            "retry_at": now,
        }
        for destination in destinations
    ]
    pending = [DicomPush.status != PushStatus.DONE] if not again else []
    with index.engine.begin() as connection:
        if rows:
            connection.execute(insert, rows)
        held = connection.execute(
            sa.update(DicomPush)
            .where(
                DicomPush.segmentation_id == segmentation_id,
                DicomPush.destination.in_(destinations),
                *pending,
            )
            .values(retry_at=now + timedelta(seconds=hold_s))
            .returning(DicomPush.id)
        ).scalars()
        ids = list(held)
    return sorted(of(index, segmentation_id, ids), key=lambda push: push.id or 0)


def of(index: MaskIndex, segmentation_id: int, ids: Sequence[int] | None = None) -> list[DicomPush]:
    """The pushes of a segmentation (only ``ids`` of them, when given)."""
    statement = sa.select(DicomPush).where(DicomPush.segmentation_id == segmentation_id)
    if ids is not None:
        statement = statement.where(DicomPush.id.in_(ids))
    with Session(index.engine, expire_on_commit=False) as session:
        return list(session.scalars(statement.order_by(DicomPush.id)))


def dicom_segmentations(index: MaskIndex, filters: QueryFilters) -> list[int]:
    """The segmentations of the filter that have DICOM outputs (those of DICOM inputs)."""
    statement = index.select_segmentations(filters, Segmentation.id, Segmentation.object_keys)
    rows = index.stream(statement.order_by(Segmentation.id))
    return [segmentation_id for segmentation_id, keys in rows if "seg" in keys]


def due(index: MaskIndex, destinations: Sequence[str], limit: int = 10_000) -> list[int]:
    """Segmentations with a push to one of ``destinations`` that is due: failed and its
    retry time come, or pending and its sender's hold run out."""
    statement = (
        sa.select(DicomPush.segmentation_id)
        .where(
            DicomPush.status != PushStatus.DONE,
            DicomPush.retry_at <= utcnow(),
            DicomPush.destination.in_(destinations),
        )
        .group_by(DicomPush.segmentation_id)
        .order_by(sa.func.min(DicomPush.retry_at))
        .limit(limit)
    )
    with index.engine.connect() as connection:
        return list(connection.execute(statement).scalars())


def take(index: MaskIndex, segmentation_id: int, hold_s: float) -> bool:
    """Hold the due pushes of a segmentation for ``hold_s`` (compare-and-set on their
    retry time, so two sweeps never both take them); whether this caller did."""
    now = utcnow()
    with index.engine.begin() as connection:
        taken = connection.execute(
            sa.update(DicomPush)
            .where(
                DicomPush.segmentation_id == segmentation_id,
                DicomPush.status != PushStatus.DONE,
                DicomPush.retry_at <= now,
            )
            .values(retry_at=now + timedelta(seconds=hold_s))
        ).rowcount
    return taken > 0


def record_done(index: MaskIndex, push_id: int) -> None:
    now = utcnow()
    _update(
        index,
        push_id,
        status=PushStatus.DONE,
        reason=None,
        attempts=DicomPush.attempts + 1,
        pushed_at=now,
        retry_at=None,
        failing_since=None,
        updated_at=now,
    )


def record_failure(index: MaskIndex, push: DicomPush, reason: str, retry_for_s: float) -> datetime | None:
    """Record a failed push with its reason; when it is tried again (None: it has been
    failing for ``retry_for_s`` and is left to ``chexmask push``)."""
    now = utcnow()
    failing_since = push.failing_since or now
    retry_at = next_failed_retry(failing_since, now, retry_for_s)
    assert push.id is not None
    _update(
        index,
        push.id,
        status=PushStatus.FAILED,
        reason=reason[:2000],
        attempts=DicomPush.attempts + 1,
        retry_at=retry_at,
        failing_since=failing_since,
        updated_at=now,
    )
    return retry_at


def _update(index: MaskIndex, push_id: int, **values: object) -> None:
    with index.engine.begin() as connection:
        connection.execute(sa.update(DicomPush).where(DicomPush.id == push_id).values(**values))
