"""What the web app reads: keyset pages of segmentations, the neighbours of one,
refused and failed images, per-dataset summaries, and thumbnails.

Pages are keyset pages (``after``/``before`` a segmentation id, whose sort value
is looked up), never OFFSET: the cost of a page does not grow with its depth, so
the thousandth page of a million rows is as quick as the first.
"""

from __future__ import annotations

import io
from collections import Counter
from dataclasses import dataclass, fields, replace
from datetime import datetime
from typing import Any

import numpy as np
import sqlalchemy as sa

from chexmask.errors import NotFound
from chexmask.status import ImageStatus
from chexmask.storage.index import MaskIndex
from chexmask.storage.models import Segmentation, SourceImage
from chexmask.storage.objectstore import ObjectStore
from chexmask.storage.queries import SORT_KEYS, SUMMARY_COLUMNS, QueryFilters, order_by
from chexmask.storage.reviews import reviewed_condition

THUMB_SIZE = 256
THUMB_NAME = "thumb256.jpg"
PROBLEM_STATUSES = (ImageStatus.REFUSED, ImageStatus.FAILED)
ANY_FLAG = "*"
# Shown on the gallery cards and returned with every listed segmentation.
CARD_COLUMNS = SUMMARY_COLUMNS  # the summary carries the QC flags


@dataclass(frozen=True)
class GalleryFilters:
    """The index filters plus what only the web app asks: a QC flag, reviewed or not."""

    base: QueryFilters = QueryFilters()
    flag: str | None = None  # a flag name, or ANY_FLAG for any flag at all
    reviewed: bool | None = None


@dataclass(frozen=True)
class Page:
    items: list[dict[str, Any]]
    next_after: int | None  # cursor of the next page; None on the last
    prev_before: int | None  # cursor of the previous page; None on the first


def _statement(index: MaskIndex, filters: GalleryFilters) -> sa.Select:
    statement = index.select_segmentations(filters.base, *CARD_COLUMNS)
    if filters.flag == ANY_FLAG:
        # Compact JSON text (engine.json_dumps): a list with a flag in it starts '["';
        # an empty list, JSON null and SQL NULL do not.
        statement = statement.where(sa.cast(Segmentation.qc_flags, sa.Text).like('["%'))
    elif filters.flag:
        # The flags are stored as compact JSON text; a quoted name matches one whole flag.
        escaped = filters.flag.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        statement = statement.where(sa.cast(Segmentation.qc_flags, sa.Text).like(f'%"{escaped}"%', escape="\\"))
    if filters.reviewed is not None:
        condition = reviewed_condition()
        statement = statement.where(condition if filters.reviewed else ~condition)
    return statement


def _sort_column(sort: str) -> tuple[Any | None, bool]:
    key = sort.removeprefix("-")
    if key not in SORT_KEYS:
        raise ValueError(f"cannot sort by {key!r}; choose from {', '.join(SORT_KEYS)}")
    return (None if key == "id" else SORT_KEYS[key]), sort.startswith("-")


def _segments(column: Any | None, value: Any, cursor: int, greater: bool) -> list[tuple[Any, list[Any]]]:
    """(condition, order) pairs whose results, concatenated, are the rows after ``cursor``
    in the order (value NULLS FIRST, id) (``greater``) or before it, walking backwards.

    Split where NULLs meet values so that each part is one index range: an OR of
    both would make the database scan from the start of the index. The NULL order
    is spelled out to match the Dice indexes (NULLS FIRST), or PostgreSQL sorts.
    """
    sid = Segmentation.id
    if column is None:
        return [(sid > cursor, [sid.asc()])] if greater else [(sid < cursor, [sid.desc()])]
    if greater:
        if value is None:
            return [
                (sa.and_(column.is_(None), sid > cursor), [sid.asc()]),
                (column.is_not(None), [column.asc().nulls_first(), sid.asc()]),
            ]
        return [
            (sa.and_(column >= value, sa.or_(column > value, sid > cursor)), [column.asc().nulls_first(), sid.asc()])
        ]
    if value is None:
        return [(sa.and_(column.is_(None), sid < cursor), [sid.desc()])]
    return [
        (sa.and_(column <= value, sa.or_(column < value, sid < cursor)), [column.desc().nulls_last(), sid.desc()]),
        (column.is_(None), [sid.desc()]),
    ]


def _rows(
    index: MaskIndex, statement: sa.Select, parts: list[tuple[Any, list[Any]]], limit: int
) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    with index.engine.connect() as connection:
        for condition, order in parts:
            if len(rows) >= limit:
                break
            query = statement.where(condition).order_by(*order).limit(limit - len(rows))
            rows += [dict(row._mapping) for row in connection.execute(query)]
    return rows


def _sort_value(index: MaskIndex, column: Any | None, segmentation_id: int) -> Any:
    if column is None:
        return None
    statement = (
        sa.select(column)
        .select_from(Segmentation)
        .join(SourceImage, Segmentation.image_id == SourceImage.id)
        .where(Segmentation.id == segmentation_id)
    )
    with index.engine.connect() as connection:
        row = connection.execute(statement).first()
    if row is None:
        raise NotFound(f"no segmentation with id {segmentation_id}")
    return row[0]


def page(
    index: MaskIndex,
    filters: GalleryFilters,
    sort: str = "dice_rca_mean",
    limit: int = 48,
    after: int | None = None,
    before: int | None = None,
) -> Page:
    """``limit`` rows after the segmentation ``after`` (or before ``before``; or the first)."""
    column, descending = _sort_column(sort)
    statement = _statement(index, filters)
    if after is None and before is None:
        with index.engine.connect() as connection:
            query = statement.order_by(*order_by(sort)).limit(limit + 1)
            rows = [dict(row._mapping) for row in connection.execute(query)]
        return Page(rows[:limit], rows[limit - 1]["id"] if len(rows) > limit else None, None)
    cursor = after if after is not None else before
    assert cursor is not None
    value = _sort_value(index, column, cursor)
    forward = after is not None
    # One extra row says whether there is more in that direction, without a COUNT.
    rows = _rows(index, statement, _segments(column, value, cursor, greater=forward != descending), limit + 1)
    more = len(rows) > limit
    rows = rows[:limit]
    if forward:
        return Page(rows, rows[-1]["id"] if more and rows else None, rows[0]["id"] if rows else None)
    rows.reverse()
    return Page(rows, rows[-1]["id"] if rows else None, rows[0]["id"] if more and rows else None)


def neighbours(
    index: MaskIndex, filters: GalleryFilters, sort: str, segmentation_id: int
) -> tuple[int | None, int | None]:
    """The previous and next segmentation of ``filters`` in ``sort`` order (ids)."""
    column, descending = _sort_column(sort)
    value = _sort_value(index, column, segmentation_id)
    statement = _statement(index, filters).with_only_columns(Segmentation.id)
    found = []
    for greater in (descending, not descending):  # previous, then next
        rows = _rows(index, statement, _segments(column, value, segmentation_id, greater), 1)
        found.append(rows[0]["id"] if rows else None)
    return found[0], found[1]


# --- refused and failed images --------------------------------------------------------

PROBLEM_COLUMNS = (
    SourceImage.id,
    SourceImage.uri,
    SourceImage.dataset,
    SourceImage.release,
    SourceImage.dataset_image_id,
    SourceImage.status,
    SourceImage.refusal_code,
    SourceImage.reason,
    SourceImage.attempts,
    SourceImage.updated_at,
)
PROBLEM_FIELDS = tuple(c.key for c in PROBLEM_COLUMNS)


def problems(
    index: MaskIndex,
    status: ImageStatus,
    dataset: str | None = None,
    code: str | None = None,
    limit: int = 100,
    after: int | None = None,
) -> list[dict[str, Any]]:
    """Refused or failed images in id order, with their reason codes and sentences."""
    if status not in PROBLEM_STATUSES:
        raise ValueError("only refused and failed images are listed here")
    from chexmask.storage.queries import image_conditions

    statement = sa.select(*PROBLEM_COLUMNS).where(*image_conditions(QueryFilters(dataset=dataset, status=status)))
    if code:
        statement = statement.where(SourceImage.refusal_code == code)
    if after is not None:
        statement = statement.where(SourceImage.id > after)
    statement = statement.order_by(SourceImage.id).limit(limit)
    with index.engine.connect() as connection:
        return [dict(row._mapping) for row in connection.execute(statement)]


def problem_codes(index: MaskIndex, status: ImageStatus) -> dict[str, int]:
    """How many images of ``status`` carry each code (no code: "")."""
    statement = (
        sa.select(SourceImage.refusal_code, sa.func.count())
        .where(SourceImage.status == status)
        .group_by(SourceImage.refusal_code)
    )
    with index.engine.connect() as connection:
        return {code or "": n for code, n in connection.execute(statement)}


# --- a dataset's summary --------------------------------------------------------------

ORGAN_DICE_COLUMNS = {
    "overall": Segmentation.dice_rca_mean,
    "right lung": Segmentation.dice_rca_mean_rl,
    "left lung": Segmentation.dice_rca_mean_ll,
    "heart": Segmentation.dice_rca_mean_h,
}


def dice_values(index: MaskIndex, dataset: str) -> dict[str, np.ndarray]:
    """Dice RCA (Mean) of every current segmentation of the dataset, overall and per organ."""
    statement = index.select_segmentations(QueryFilters(dataset=dataset), *ORGAN_DICE_COLUMNS.values())
    values: list[list[float]] = [[] for _ in ORGAN_DICE_COLUMNS]
    for row in index.stream(statement, batch_size=20_000):
        for series, value in zip(values, row, strict=True):
            series.append(np.nan if value is None else value)
    return {name: np.array(series, dtype=float) for name, series in zip(ORGAN_DICE_COLUMNS, values, strict=True)}


def flag_counts(index: MaskIndex, dataset: str) -> Counter[str]:
    statement = index.select_segmentations(QueryFilters(dataset=dataset), Segmentation.qc_flags).where(
        Segmentation.qc_flags.is_not(None)
    )
    counts: Counter[str] = Counter()
    for (flags,) in index.stream(statement):
        counts.update(flags or [])
    return counts


def throughput(index: MaskIndex, dataset: str, buckets: int = 60) -> tuple[list[tuple[datetime, int]], str]:
    """Segmentations made per minute, hour or day (whichever gives at most ``buckets`` bars)."""
    statement = index.select_segmentations(QueryFilters(dataset=dataset), Segmentation.created_at)
    times = np.array([row[0].timestamp() for row in index.stream(statement, batch_size=20_000)], dtype=float)
    if times.size == 0:
        return [], "hour"
    span = times.max() - times.min()
    unit, seconds = next(((u, s) for u, s in (("minute", 60), ("hour", 3600)) if span / s <= buckets), ("day", 86400))
    slots = np.floor(times / seconds).astype(np.int64)
    found, counts = np.unique(slots, return_counts=True)
    from datetime import timezone

    return [
        (datetime.fromtimestamp(int(s) * seconds, timezone.utc), int(n)) for s, n in zip(found, counts, strict=True)
    ], unit


def datasets(index: MaskIndex) -> list[str]:
    statement = sa.select(SourceImage.dataset).distinct().order_by(SourceImage.dataset)
    with index.engine.connect() as connection:
        return list(connection.execute(statement).scalars())


# --- thumbnails -----------------------------------------------------------------------


def thumbnail_key(overlay_key: str) -> str:
    """Beside the overlay, under the same segmentation prefix."""
    return overlay_key.rsplit("/", 1)[0] + "/" + THUMB_NAME


def thumbnail(store: ObjectStore, overlay_key: str) -> bytes:
    """The 256 px JPEG of the stored overlay, made on first request and stored back."""
    key = thumbnail_key(overlay_key)
    try:
        return store.get(key)
    except NotFound:
        pass
    from PIL import Image

    with Image.open(io.BytesIO(store.get(overlay_key))) as image:
        image = image.convert("RGB")
        image.thumbnail((THUMB_SIZE, THUMB_SIZE))
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=82, optimize=True)
    data = buffer.getvalue()
    store.put(key, data, "image/jpeg")
    return data


def filters_from(values: dict[str, Any]) -> GalleryFilters:
    """GalleryFilters from a flat mapping of query parameters (unknown keys ignored)."""
    names = {f.name for f in fields(QueryFilters)}
    base = QueryFilters(**{k: v for k, v in values.items() if k in names and v not in (None, "")})
    if base.status is not None:
        base = replace(base, status=ImageStatus(base.status))
    return GalleryFilters(base, values.get("flag") or None, values.get("reviewed"))
