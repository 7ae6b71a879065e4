"""Import a published CheXmask CSV into the index as one model's segmentations.

An imported image has no bytes: it is a ``SourceImage`` with the URI
``chexmask:<dataset>/<image id>`` (``import_uri``), its ``dataset_image_id``
set, status ``done`` and, in place of the content hash, a deterministic
surrogate ``sha256("chexmask-import:<dataset>:<image id>")`` (``import_sha256``):
``Segmentation.image_sha256`` is NOT NULL and unique with the model, and the
surrogate can never equal the hash of real bytes, so imported and segmented
rows of the same image never collide. The image's ``etag_or_version`` holds a
fingerprint of the CSV row (and the model and resolution it was imported as),
so re-importing a file changes nothing and a newer file updates exactly the
rows that differ.

Which frame an imported row holds is recorded in ``Segmentation.pipeline_version``
(``IMPORT_PIPELINE``): published original-resolution files fill the original
columns only, 1024 files the 1024 columns only (the other side is empty, as
the back-projection would need the dataset's padding tables). The export and
``compare`` read the frame a row has.

Rows are read one by one by ``csv_records`` (a file of any size, gzip too),
parsed and checked in batches (``chexmask_csv``; in a child process for large
files, so parsing and writing run on separate cores) and written one transaction
per batch through the database driver: SQLite ``executemany`` of prepared
upserts, PostgreSQL ``COPY`` into temporary staging tables and one
``INSERT ... SELECT ... ON CONFLICT DO UPDATE`` per table. Rows whose
fingerprint is unchanged are not written at all. The landmark text of
original-resolution rows is stored verbatim, so an export of unchanged rows
gives back the published bytes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from operator import itemgetter
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from chexmask.datasets import canonical
from chexmask.status import ImageStatus
from chexmask.storage.chexmask_csv import (
    Frame,
    Imported,
    ImportReport,
    ParsedRow,
    import_etag,
    read_batches,
    read_batches_in_child,
)
from chexmask.storage.index import MaskIndex
from chexmask.storage.models import IMPORT_SCHEME, Segmentation, SourceImage, utcnow
from chexmask.storage.queries import one_of

BATCH_SIZE = 2000
# Above this a child process reads and parses (starting one costs about a second).
CHILD_PARSE_BYTES = 32 << 20
SQLITE_CACHE_KIB = 64 * 1024  # page cache of the importing connection

# The columns an import writes. A newer file replaces all of them but those "kept":
# the image's first sighting, the segmentation's id and creation time (export order).
_IMAGE_COLUMNS = tuple(c.name for c in SourceImage.__table__.columns if c.name != "id")
_IMAGE_KEPT = frozenset({"uri", "first_seen"})
_SEGMENTATION_COLUMNS = tuple(c.name for c in Segmentation.__table__.columns if c.name not in ("id", "image_id"))
_SEGMENTATION_KEPT = frozenset({"image_sha256", "model_version", "created_at"})


def import_uri(dataset: str, image_id: str) -> str:
    return _uri(canonical(dataset), image_id)


def import_sha256(dataset: str, image_id: str) -> str:
    """The surrogate content hash of an imported image (documented in the module doc)."""
    return _surrogate_sha256(canonical(dataset), image_id)


# The two above for a dataset name already canonical: per row of an import.
def _uri(dataset: str, image_id: str) -> str:
    return f"{IMPORT_SCHEME}{dataset}/{image_id}"


def _surrogate_sha256(dataset: str, image_id: str) -> str:
    return hashlib.sha256(f"chexmask-import:{dataset}:{image_id}".encode()).hexdigest()


def is_imported_uri(uri: str) -> bool:
    return uri.startswith(IMPORT_SCHEME)


def import_csv(
    index: MaskIndex,
    path: str | Path,
    *,
    dataset: str,
    model: str,
    weights_sha256: str,
    release: str | None = None,
    frame: Frame = Frame.AUTO,
    batch_size: int = BATCH_SIZE,
    progress: Callable[[int], None] | None = None,
    parse_in_child: bool | None = None,
) -> ImportReport:
    """Import the CheXmask CSV at ``path`` (plain or gzip) as ``model``'s segmentations
    of ``dataset``; idempotent. ``progress`` is called with the records of each batch
    once it is stored.

    Reading and parsing run in a child process (``parse_in_child``; by default for
    files over CHILD_PARSE_BYTES) while this process writes, and one batch is
    written by a second thread while the next is received, so the two cores work
    on reading and writing at once.
    """
    dataset = canonical(dataset)
    report = ImportReport()
    index.register_model(model, weights_sha256, "published CheXmask masks (imported)")
    context = _Context(dataset, release, model, weights_sha256)
    if parse_in_child is None:
        parse_in_child = Path(path).stat().st_size > CHILD_PARSE_BYTES
    read = read_batches_in_child if parse_in_child else read_batches
    imported = Imported(model, _imported_etags(index, dataset))
    with ThreadPoolExecutor(1, thread_name_prefix="chexmask-import") as writer:
        writing: tuple[Future[_Stored], int] | None = None
        for batch in read(path, Frame(frame), batch_size, imported):
            report.frame = batch.frame
            for line, reason in batch.parsed.bad:
                report.skip(line, reason)
            report.mean_above_max += batch.parsed.mean_above_max
            report.unchanged += batch.parsed.unchanged
            if writing:  # one batch in flight at a time: bounded memory, file order kept
                _finish(report, *writing, progress)
            writing = (writer.submit(_store, index, context, batch.parsed.rows), batch.records)
        if writing:
            _finish(report, *writing, progress)
    return report


def _imported_etags(index: MaskIndex, dataset: str) -> dict[str, str]:
    """Each imported image of ``dataset`` in the index: its dataset image id and row etag."""
    dataset, uri = canonical(dataset), SourceImage.__table__.c.uri
    statement = sa.select(SourceImage.dataset_image_id, SourceImage.etag_or_version).where(
        SourceImage.dataset == dataset, uri.startswith(import_uri(dataset, ""), autoescape=True)
    )
    with index.engine.connect() as connection:
        return {image_id: etag for image_id, etag in connection.execute(statement) if image_id and etag}


def _finish(report: ImportReport, written: Future[_Stored], rows: int, progress: Callable[[int], None] | None) -> None:
    stored = written.result()
    report.taken += stored.taken
    report.updated += stored.updated
    report.unchanged += stored.unchanged
    for line, reason in stored.repeated:
        report.skip(line, reason)
    if progress:
        progress(rows)


@dataclass
class _Stored:
    """What storing a batch did (counted in the writer thread, added to the report by the caller)."""

    taken: int = 0
    updated: int = 0
    unchanged: int = 0
    repeated: list[tuple[int, str]] = field(default_factory=list)  # (line, reason): ids seen again


@dataclass(frozen=True)
class _Context:
    dataset: str
    release: str | None
    model: str
    weights_sha256: str

    def etag(self, row: ParsedRow) -> str:
        return import_etag(self.model, row.fingerprint)


def _store(index: MaskIndex, context: _Context, rows: list[ParsedRow]) -> _Stored:
    """One batch in one transaction: rows new to the index inserted, changed ones upserted
    (images on their URI, segmentations on (image_sha256, model_version)), unchanged
    ones not written."""
    stored = _Stored()
    rows = _last_per_id(rows, stored)
    if not rows:
        return stored
    uris = {_uri(context.dataset, r.image_id): r for r in rows}
    try:
        with index.engine.begin() as connection:
            _write(connection, context, uris, stored, insert_new=True)
    except (sa.exc.IntegrityError, index.engine.dialect.loaded_dbapi.IntegrityError):  # the latter: driver-level writes
        # Another import stored some of these rows between the lookup and the write:
        # the batch again, every row an upsert.
        stored = _Stored(repeated=stored.repeated)
        with index.engine.begin() as connection:
            _write(connection, context, uris, stored, insert_new=False)
    return stored


def _write(
    connection: sa.Connection, context: _Context, uris: dict[str, ParsedRow], stored: _Stored, insert_new: bool
) -> None:
    known = _known(connection, list(uris))
    new, changed = [], []
    for uri, row in uris.items():
        etag = context.etag(row)
        if uri not in known:
            new.append((uri, etag, row))
        elif known[uri] != etag:
            changed.append((uri, etag, row))
    stored.taken, stored.updated = len(new), len(changed)
    stored.unchanged = len(uris) - len(new) - len(changed)
    if not new and not changed:
        return
    now = _database_time(connection, utcnow())
    work = [(uri, etag, row, _surrogate_sha256(context.dataset, row.image_id)) for uri, etag, row in new + changed]
    images = [_image_row(context, uri, etag, row, sha256, now) for uri, etag, row, sha256 in work]
    segmentations = [_segmentation_row(context, uri, row, sha256, now) for uri, _, row, sha256 in work]
    # A new image has no segmentation yet (its surrogate hash is its own), so new rows
    # are plainly inserted, much cheaper than upserts; changed ones are upserted.
    fresh = len(new) if insert_new else 0
    write = _write_postgresql if connection.dialect.name == "postgresql" else _write_sqlite
    write(connection.connection.cursor(), images, segmentations, fresh)


def _last_per_id(rows: list[ParsedRow], stored: _Stored) -> list[ParsedRow]:
    kept: dict[str, ParsedRow] = {}
    for row in rows:
        if row.image_id in kept:
            # The later row wins, as a later file would; the earlier one is reported.
            stored.repeated.append((kept[row.image_id].line, f"image id {row.image_id!r} again at line {row.line}"))
        kept[row.image_id] = row
    return list(kept.values())


def _known(connection: sa.Connection, uris: list[str]) -> dict[str, str | None]:
    """The stored row fingerprint (etag) of each of ``uris`` already in the index."""
    if connection.dialect.name == "postgresql":
        # A join with the array, probing the URI index once per element: an IN list of
        # parameters was planned, once the table had grown during an import, as a scan
        # of the whole table per batch (each row against every parameter).
        return {uri: etag for uri, etag in connection.exec_driver_sql(_PG_KNOWN, (uris,))}
    found: dict[str, str | None] = {}
    for start in range(0, len(uris), 500):  # under SQLite's parameter limit
        statement = sa.select(SourceImage.uri, SourceImage.etag_or_version).where(
            SourceImage.uri.in_(uris[start : start + 500])
        )
        found.update((uri, etag) for uri, etag in connection.execute(statement))
    return found


_PG_KNOWN = (
    "SELECT image.uri, image.etag_or_version FROM unnest(%s::text[]) AS wanted(uri) "
    "JOIN source_image AS image ON image.uri = wanted.uri"
)


def _database_time(connection: sa.Connection, now: datetime) -> Any:
    """``now`` as the column type stores it, for the driver-level writes below; on
    SQLite the text sqlite3's own adapter would make of it, once rather than per row."""
    bind = SourceImage.__table__.c.updated_at.type.bind_processor(connection.dialect)
    value = bind(now) if bind else now
    if connection.dialect.name == "sqlite" and isinstance(value, datetime):
        return value.isoformat(" ")
    return value


def _image_row(context: _Context, uri: str, etag: str, row: ParsedRow, sha256: str, now: Any) -> tuple[Any, ...]:
    return _IMAGE_VALUES(
        {
            **_NO_IMAGE_VALUES,
            "line": row.line,
            "uri": uri,
            "etag_or_version": etag,
            "sha256": sha256,
            "dataset": context.dataset,
            "release": context.release,
            "dataset_image_id": row.image_id,
            "height": row.height,
            "width": row.width,
            "first_seen": now,
            "updated_at": now,
            "status": ImageStatus.DONE.value,
            "attempts": 0,
        }
    )


def _segmentation_row(context: _Context, uri: str, row: ParsedRow, sha256: str, now: Any) -> tuple[Any, ...]:
    return _SEGMENTATION_VALUES(
        {
            **_NO_SEGMENTATION_VALUES,
            **row.values,
            "line": row.line,
            "uri": uri,
            "image_sha256": sha256,
            "dataset": context.dataset,
            "is_current": True,
            "model_version": context.model,
            "weights_sha256": context.weights_sha256,
            "created_at": now,
            "object_keys": "{}",
        }
    )


# What an import does not know is empty (a newer file resets it, e.g. QC flags).
_NO_IMAGE_VALUES = dict.fromkeys(_IMAGE_COLUMNS)
_NO_SEGMENTATION_VALUES = dict.fromkeys(_SEGMENTATION_COLUMNS)
# Rows as the driver-level writes take them: the file line (PostgreSQL's staging keeps
# file order with it), then the columns; for segmentations the image's URI first.
_IMAGE_VALUES = itemgetter("line", *_IMAGE_COLUMNS)
_SEGMENTATION_VALUES = itemgetter("line", "uri", *_SEGMENTATION_COLUMNS)


def _update(columns: Iterable[str], kept: frozenset[str]) -> str:
    return ", ".join(f"{c} = excluded.{c}" for c in columns if c not in kept)


def _write_sqlite(cursor: Any, images: list[tuple[Any, ...]], segmentations: list[tuple[Any, ...]], fresh: int) -> None:
    """executemany of prepared statements on the driver's cursor, inside the batch's
    transaction: the first ``fresh`` rows are inserted, the others upserted
    (the leading file line of each row is not a column here)."""
    # Keys such as the surrogate hashes land all over their indexes: with SQLite's 2 MB
    # default page cache, writing 200,000 rows took 106 us of CPU a row, with 64 MB 68 us.
    # (Only memory: the connection keeps the larger cache, filled as pages are read.)
    cursor.execute(f"PRAGMA cache_size = -{SQLITE_CACHE_KIB}")
    cursor.executemany(_SQLITE_NEW_IMAGES, [image[1:] for image in images[:fresh]])
    cursor.executemany(_SQLITE_IMAGES, [image[1:] for image in images[fresh:]])
    cursor.executemany(_SQLITE_NEW_SEGMENTATIONS, [segmentation[1:] for segmentation in segmentations[:fresh]])
    cursor.executemany(_SQLITE_SEGMENTATIONS, [segmentation[1:] for segmentation in segmentations[fresh:]])


_SQLITE_NEW_IMAGES = (
    f"INSERT INTO source_image ({', '.join(_IMAGE_COLUMNS)}) VALUES ({', '.join('?' * len(_IMAGE_COLUMNS))})"
)
_SQLITE_IMAGES = f"{_SQLITE_NEW_IMAGES} ON CONFLICT (uri) DO UPDATE SET {_update(_IMAGE_COLUMNS, _IMAGE_KEPT)}"
# the image's id looked up by its URI (unique index) inside the statement
_SQLITE_NEW_SEGMENTATIONS = (
    f"INSERT INTO segmentation (image_id, {', '.join(_SEGMENTATION_COLUMNS)}) "
    f"VALUES ((SELECT id FROM source_image WHERE uri = ?), {', '.join('?' * len(_SEGMENTATION_COLUMNS))})"
)
_SQLITE_SEGMENTATIONS = (
    f"{_SQLITE_NEW_SEGMENTATIONS} ON CONFLICT (image_sha256, model_version) DO UPDATE SET "
    f"image_id = excluded.image_id, {_update(_SEGMENTATION_COLUMNS, _SEGMENTATION_KEPT)}"
)


def _write_postgresql(
    cursor: Any, images: list[tuple[Any, ...]], segmentations: list[tuple[Any, ...]], fresh: int
) -> None:
    """The first ``fresh`` rows are new: their image ids are taken from the sequence and
    both tables filled by COPY. The others go through temporary staging tables (dropped
    at commit) and one INSERT ... SELECT ... ON CONFLICT DO UPDATE per table. File
    order is kept (ids ascend with it)."""
    if fresh:
        cursor.execute(_PG_NEW_IDS, (fresh,))
        ids = sorted(image_id for (image_id,) in cursor.fetchall())
        pairs = list(zip(ids, images[:fresh], segmentations[:fresh], strict=True))
        _copy(cursor, "source_image", ("id", *_IMAGE_COLUMNS), [(i, *image[1:]) for i, image, _ in pairs])
        _copy(cursor, "segmentation", ("image_id", *_SEGMENTATION_COLUMNS), [(i, *seg[2:]) for i, _, seg in pairs])
    if len(images) > fresh:
        for statement in _PG_STAGING:
            cursor.execute(statement)
        _copy(cursor, "import_image", ("line", *_IMAGE_COLUMNS), images[fresh:])
        _copy(cursor, "import_segmentation", ("line", "uri", *_SEGMENTATION_COLUMNS), segmentations[fresh:])
        for statement in _PG_UPSERTS:
            cursor.execute(statement)


def _copy(cursor: Any, table: str, columns: tuple[str, ...], rows: list[tuple[Any, ...]]) -> None:
    with cursor.copy(f"COPY {table} ({', '.join(columns)}) FROM STDIN") as copy:
        for row in rows:
            copy.write_row(row)


_PG_NEW_IDS = "SELECT nextval(pg_get_serial_sequence('source_image', 'id')) FROM generate_series(1, %s)"
_PG_STAGING = (
    "CREATE TEMPORARY TABLE import_image ON COMMIT DROP AS "
    f"SELECT 0 AS line, {', '.join(_IMAGE_COLUMNS)} FROM source_image WITH NO DATA",
    "CREATE TEMPORARY TABLE import_segmentation ON COMMIT DROP AS "
    f"SELECT 0 AS line, i.uri, {', '.join('s.' + c for c in _SEGMENTATION_COLUMNS)} "
    "FROM segmentation s CROSS JOIN source_image i WITH NO DATA",
)
_PG_UPSERTS = (
    f"INSERT INTO source_image ({', '.join(_IMAGE_COLUMNS)}) "
    f"SELECT {', '.join(_IMAGE_COLUMNS)} FROM import_image ORDER BY line "
    f"ON CONFLICT (uri) DO UPDATE SET {_update(_IMAGE_COLUMNS, _IMAGE_KEPT)}",
    f"INSERT INTO segmentation (image_id, {', '.join(_SEGMENTATION_COLUMNS)}) "
    f"SELECT i.id, {', '.join('s.' + c for c in _SEGMENTATION_COLUMNS)} "
    "FROM import_segmentation s JOIN source_image i ON i.uri = s.uri ORDER BY s.line "
    "ON CONFLICT (image_sha256, model_version) DO UPDATE SET "
    f"image_id = excluded.image_id, {_update(_SEGMENTATION_COLUMNS, _SEGMENTATION_KEPT)}",
)


def imported_ids(index: MaskIndex, dataset: str, image_ids: Iterable[str]) -> set[str]:
    """The dataset image ids among ``image_ids`` that an import covers (one query per 500)."""
    wanted = list(dict.fromkeys(image_ids))
    found: set[str] = set()
    with index.engine.connect() as connection:
        for start in range(0, len(wanted), 500):
            chunk = wanted[start : start + 500]
            statement = sa.select(SourceImage.dataset_image_id, SourceImage.uri).where(
                one_of(SourceImage.dataset_image_id, chunk, index.engine.dialect.name),
                SourceImage.dataset == canonical(dataset),
            )
            found.update(i for i, uri in connection.execute(statement) if is_imported_uri(uri))
    return found
