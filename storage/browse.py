"""What the web app reads: keyset pages of segmentations, the neighbours of one,
refused and failed images, per-dataset summaries, and thumbnails.

Pages are keyset pages (``after``/``before`` a segmentation id, whose sort value
is looked up), never OFFSET: the cost of a page does not grow with its depth, so
the thousandth page of a million rows is as quick as the first.

The compare filter (``QueryFilters.compare_to`` and the agreement bounds) joins the
comparison table only when it is set: a page without it is the same statement as
before. With it, the ids statement is an index join (``queries.agreement_on``):
the (other_model, dice_min) index to the segmentations' primary key for a narrow
agreement range (read whole and sorted), the sort's index probing each
segmentation's comparison by the unique (segmentation_id, other_model) index for
a wide one (stopping at a page's worth). SQLite is told which, as for the Dice
ranges (``_wide_agreement``).
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
from chexmask.storage.models import MaskComparison, Segmentation, SourceImage
from chexmask.storage.objectstore import ObjectStore
from chexmask.storage.queries import (
    AGREEMENT,
    AGREEMENT_COLUMNS,
    OTHER_SEGMENTATION,
    SORT_KEYS,
    SUMMARY_COLUMNS,
    QueryFilters,
    agreement_on,
    order_by,
    with_agreement,
)
from chexmask.storage.reviews import reviewed_condition

THUMB_SIZE = 256
THUMB_NAME = "thumb256.jpg"
PROBLEM_STATUSES = (ImageStatus.REFUSED, ImageStatus.FAILED)
ANY_FLAG = "*"
# The Dice range filters by the column they bound.
DICE_RANGES = {"dice_rca_mean": ("min_dice_mean", "max_dice_mean"), "dice_rca_max": ("min_dice_max", "max_dice_max")}
# Entries of a Dice range beyond which SQLite walks the sort's index instead (``_wide_ranges``).
WIDE_RANGE = 1000
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


def _statement(index: MaskIndex, filters: GalleryFilters, sort: str) -> sa.Select:
    """The ids of the filtered segmentations. Pages pick ids first and read the cards of
    only those (``_cards``): the database never carries whole rows through a sort, and
    an index over segmentation columns alone can answer (images are joined only for
    an image filter or the image-id sort)."""
    key = sort.removeprefix("-")
    wide = _wide_ranges(index, filters.base, key)
    base = replace(filters.base, **{bound: None for column in wide for bound in DICE_RANGES[column]})
    walk_sort = _wide_agreement(index, filters.base)
    if walk_sort:
        base = replace(base, compare_to=None, min_agreement_dice=None, max_agreement_dice=None)
    statement = index.select_segmentations(base, Segmentation.id, join_images=key == "dataset_image_id")
    if walk_sort:
        statement = statement.join(AGREEMENT, agreement_on(filters.base, by_model_index=False))
    for column in wide:
        # ``column + 0`` is the same test, but no index can serve it: SQLite then walks
        # the sort's index (which covers the Dice columns) and stops at a page's worth.
        low, high = (getattr(filters.base, bound) for bound in DICE_RANGES[column])
        shifted = SORT_KEYS[column] + 0
        statement = statement.where(
            *([shifted >= low] if low is not None else []), *([shifted <= high] if high is not None else [])
        )
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


def _wide_ranges(index: MaskIndex, filters: QueryFilters, sort_key: str) -> list[str]:
    """The Dice columns whose range filter SQLite should test row by row while it walks
    the sort's index, rather than read the whole range and sort it.

    SQLite keeps no value histograms (Python's build has no STAT4), so offered a
    range on one column and an ORDER BY on another it takes the range's index and
    sorts: as many row reads as the range holds, seconds for a wide range over a
    million rows. A count on the range's own index, stopped at WIDE_RANGE entries
    (index only, about a millisecond), tells wide from narrow: a narrow range is
    read and sorted whole; in a wide one a page's worth turns up within
    limit x rows / WIDE_RANGE entries of the sort's covering index. PostgreSQL has
    histograms and chooses by itself.
    """
    if index.dialect != "sqlite":
        return []
    wide = []
    with index.engine.connect() as connection:
        for column, (low_name, high_name) in DICE_RANGES.items():
            low, high = getattr(filters, low_name), getattr(filters, high_name)
            if column == sort_key or (low is None and high is None):
                continue
            values = SORT_KEYS[column]
            bounds = [*([values >= low] if low is not None else []), *([values <= high] if high is not None else [])]
            bounded = sa.select(values).where(*bounds).limit(WIDE_RANGE).subquery()
            if connection.execute(sa.select(sa.func.count()).select_from(bounded)).scalar_one() >= WIDE_RANGE:
                wide.append(column)
    return wide


def _wide_agreement(index: MaskIndex, filters: QueryFilters) -> bool:
    """Whether SQLite should walk the sort's index and probe each segmentation's
    comparison, rather than read the agreement range from the comparison index and
    sort it: when the range holds WIDE_RANGE comparisons or more (counted on the
    index alone, stopped there). Measured at 200,000 rows, 30% of them in range:
    0.6 s read and sorted against 8 ms walked. PostgreSQL chooses by itself."""
    if index.dialect != "sqlite" or filters.compare_to is None:
        return False
    dice = MaskComparison.dice_min
    low, high = filters.min_agreement_dice, filters.max_agreement_dice
    bounds = [*([dice >= low] if low is not None else []), *([dice <= high] if high is not None else [])]
    bounded = (
        sa.select(dice).where(MaskComparison.other_model == filters.compare_to, *bounds).limit(WIDE_RANGE).subquery()
    )
    with index.engine.connect() as connection:
        return connection.execute(sa.select(sa.func.count()).select_from(bounded)).scalar_one() >= WIDE_RANGE


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


def _ids(index: MaskIndex, statement: sa.Select, parts: list[tuple[Any, list[Any]]], limit: int) -> list[int]:
    ids: list[int] = []
    with index.engine.connect() as connection:
        for condition, order in parts:
            if len(ids) >= limit:
                break
            ids += connection.execute(statement.where(condition).order_by(*order).limit(limit - len(ids))).scalars()
    return ids


def _cards(index: MaskIndex, ids: list[int], compare_to: str | None = None) -> list[dict[str, Any]]:
    """The gallery cards of ``ids``, in that order; with ``compare_to``, with their agreement."""
    if not ids:
        return []
    statement = index.select_segmentations(QueryFilters(compare_to=compare_to), *CARD_COLUMNS)
    if compare_to is not None:
        statement = with_agreement(statement)
    statement = statement.where(Segmentation.id.in_(ids))
    with index.engine.connect() as connection:
        found = {row.id: dict(row._mapping) for row in connection.execute(statement)}
    return [found[i] for i in ids if i in found]


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
    statement = _statement(index, filters, sort)
    if after is None and before is None:
        with index.engine.connect() as connection:
            ids = list(connection.execute(statement.order_by(*order_by(sort)).limit(limit + 1)).scalars())
        rows = _cards(index, ids[:limit], filters.base.compare_to)
        return Page(rows, ids[limit - 1] if len(ids) > limit else None, None)
    cursor = after if after is not None else before
    assert cursor is not None
    value = _sort_value(index, column, cursor)
    forward = after is not None
    # One extra row says whether there is more in that direction, without a COUNT.
    ids = _ids(index, statement, _segments(column, value, cursor, greater=forward != descending), limit + 1)
    more = len(ids) > limit
    ids = ids[:limit]
    if not forward:
        ids.reverse()
    rows = _cards(index, ids, filters.base.compare_to)
    if forward:
        return Page(rows, ids[-1] if more and ids else None, ids[0] if ids else None)
    return Page(rows, ids[-1] if ids else None, ids[0] if more and ids else None)


def neighbours(
    index: MaskIndex, filters: GalleryFilters, sort: str, segmentation_id: int
) -> tuple[int | None, int | None]:
    """The previous and next segmentation of ``filters`` in ``sort`` order (ids)."""
    column, descending = _sort_column(sort)
    value = _sort_value(index, column, segmentation_id)
    statement = _statement(index, filters, sort)
    found = []
    for greater in (descending, not descending):  # previous, then next
        ids = _ids(index, statement, _segments(column, value, segmentation_id, greater), 1)
        found.append(ids[0] if ids else None)
    return found[0], found[1]


# --- comparisons with other models' masks ----------------------------------------------


def compared_models(index: MaskIndex, model: str | None = None) -> list[str]:
    """The models whose masks ``chexmask compare`` paired with ``model``'s (with any
    model's when None): an index seek per model found, never a scan of the comparisons."""
    statement = _COMPARED_WITH_ANY if model is None else _COMPARED_WITH_MODEL.bindparams(model=model)
    with index.engine.connect() as connection:
        return list(connection.execute(statement).scalars())


# Each step seeks the next other_model above the last one found, on
# (other_model, dice_min) or on (model, other_model).
_COMPARED_WITH_ANY = sa.text(
    "WITH RECURSIVE found(name) AS ("
    " SELECT min(other_model) FROM comparison"
    " UNION ALL"
    " SELECT (SELECT min(other_model) FROM comparison WHERE other_model > found.name)"
    " FROM found WHERE found.name IS NOT NULL"
    ") SELECT name FROM found WHERE name IS NOT NULL"
)
_COMPARED_WITH_MODEL = sa.text(
    "WITH RECURSIVE found(name) AS ("
    " SELECT min(other_model) FROM comparison WHERE model = :model"
    " UNION ALL"
    " SELECT (SELECT min(other_model) FROM comparison WHERE model = :model AND other_model > found.name)"
    " FROM found WHERE found.name IS NOT NULL"
    ") SELECT name FROM found WHERE name IS NOT NULL"
)


def agreements(index: MaskIndex, segmentation_id: int) -> list[dict[str, Any]]:
    """The segmentation's comparison with each other model, by model name, with the
    other mask's landmarks (to draw its outline)."""
    other = OTHER_SEGMENTATION
    statement = (
        sa.select(*AGREEMENT_COLUMNS, other.landmarks_1024, other.landmarks_original)
        .select_from(AGREEMENT)
        .join(other, other.id == AGREEMENT.other_segmentation_id)
        .where(AGREEMENT.segmentation_id == segmentation_id)
        .order_by(AGREEMENT.other_model)
    )
    with index.engine.connect() as connection:
        return [dict(row._mapping) for row in connection.execute(statement)]


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
    """The datasets present, by a seek per dataset on the (dataset, release) index.

    A plain SELECT DISTINCT reads the whole index on PostgreSQL (it has no skip
    scan): over 100 ms at a million images, on every page that shows the filters.
    """
    with index.engine.connect() as connection:
        return list(connection.execute(_DISTINCT_DATASETS).scalars())


# Each step seeks the next dataset above the last one found.
_DISTINCT_DATASETS = sa.text(
    "WITH RECURSIVE found(name) AS ("
    " SELECT min(dataset) FROM source_image"
    " UNION ALL"
    " SELECT (SELECT min(dataset) FROM source_image WHERE dataset > found.name) FROM found WHERE found.name IS NOT NULL"
    ") SELECT name FROM found WHERE name IS NOT NULL"
)


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
