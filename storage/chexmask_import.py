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

Rows are read with the csv module one by one (a file of any size, gzip too) and
written in batches with multi-row INSERT/UPSERT statements, one transaction per
batch. The landmark text of original-resolution rows is stored verbatim, so an
export of unchanged rows gives back the published bytes.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import re
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import IO, Any

import sqlalchemy as sa

from chexmask.anatomy import N_LANDMARKS
from chexmask.datasets import ID_COLUMNS, canonical
from chexmask.errors import ConfigError
from chexmask.status import ImageStatus, QCStatus
from chexmask.storage.index import MaskIndex
from chexmask.storage.layout import VALUE_COLUMNS
from chexmask.storage.models import (
    IMPORT_PIPELINE_1024,
    IMPORT_PIPELINE_ORIGINAL,
    IMPORT_SCHEME,
    Segmentation,
    SourceImage,
    utcnow,
)

# The published data dictionary names the id column "Image ID"; each database's own
# CSV uses its own name. Either is accepted whatever the dataset.
ID_HEADERS = frozenset({*ID_COLUMNS.values(), "Image ID", "image_id"})
BATCH_SIZE = 2000
MAX_REPORTED = 50  # bad rows kept with their line numbers; all are counted


class Frame(str, Enum):
    AUTO = "auto"
    ORIGINAL = "original"
    R1024 = "1024"


# Segmentation.pipeline_version of imported rows: which frame the row holds.
IMPORT_PIPELINE = {Frame.ORIGINAL: IMPORT_PIPELINE_ORIGINAL, Frame.R1024: IMPORT_PIPELINE_1024}

_RLE = re.compile(r"(?:\d+ \d+(?: \d+ \d+)*)?")
_INT = re.compile(r"-?\d+")
_MASKS = {"Left Lung": "left_lung", "Right Lung": "right_lung", "Heart": "heart"}


def import_uri(dataset: str, image_id: str) -> str:
    return f"{IMPORT_SCHEME}{canonical(dataset)}/{image_id}"


def import_sha256(dataset: str, image_id: str) -> str:
    """The surrogate content hash of an imported image (documented in the module doc)."""
    return hashlib.sha256(f"chexmask-import:{canonical(dataset)}:{image_id}".encode()).hexdigest()


def is_imported_uri(uri: str) -> bool:
    return uri.startswith(IMPORT_SCHEME)


class BadRow(ValueError):
    """A row that cannot be imported; the message says why."""


@dataclass
class ImportReport:
    taken: int = 0  # new rows
    updated: int = 0  # rows whose published values changed
    unchanged: int = 0
    skipped: int = 0  # bad rows
    bad: list[tuple[int, str]] = field(default_factory=list)  # (first line, reason), the first MAX_REPORTED
    frame: Frame | None = None
    mean_above_max: int = 0  # rows whose Dice "Mean" exceeds "Max" (SPEC 9.5: swapped columns)

    def skip(self, line: int, reason: str) -> None:
        self.skipped += 1
        if len(self.bad) < MAX_REPORTED:
            self.bad.append((line, reason))


@dataclass(frozen=True)
class ParsedRow:
    line: int
    image_id: str
    values: dict[str, Any]  # Segmentation columns
    height: int | None  # of the original image, when the row holds that frame
    width: int | None
    fingerprint: str


def open_text(path: str | Path) -> IO[str]:
    """The CSV as text; gzip recognised by its magic bytes, whatever the name."""
    path = Path(path)
    with path.open("rb") as probe:
        gzipped = probe.read(2) == b"\x1f\x8b"
    if gzipped:
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", newline="")
    return path.open(encoding="utf-8", newline="")


def read_rows(handle: IO[str], frame: Frame, report: ImportReport) -> Iterator[ParsedRow]:
    """Parsed rows of a CheXmask CSV; bad ones go to ``report`` with their first line number."""
    csv.field_size_limit(sys.maxsize)  # original-resolution RLE fields run to megabytes
    reader = csv.reader(handle)
    header = [name.strip() for name in next(reader, [])]
    id_index = _id_index(header)
    missing = [c for c in VALUE_COLUMNS if c not in header and c not in ("Height", "Width")]
    if missing:
        raise ConfigError(f"not a CheXmask CSV: no column(s) {', '.join(missing)}")
    columns = {name: header.index(name) for name in VALUE_COLUMNS if name in header}
    has_size = "Height" in columns and "Width" in columns
    line = reader.line_num + 1
    for record in reader:
        first, line = line, reader.line_num + 1  # a quoted landmark text spans many lines
        if not record:
            continue
        try:
            if len(record) != len(header):
                raise BadRow(f"{len(record)} fields, the header has {len(header)}")
            fields = {name: record[i] for name, i in columns.items()}
            if report.frame is None:
                report.frame = _frame_of(frame, fields["Landmarks"], has_size)
            yield _parse(first, record[id_index].strip(), fields, report.frame, report)
        except BadRow as exc:
            report.skip(first, str(exc))


def _id_index(header: list[str]) -> int:
    for i, name in enumerate(header):
        if name in ID_HEADERS:
            return i
    raise ConfigError(f"no image id column in the header (one of {', '.join(sorted(ID_HEADERS))})")


def _frame_of(frame: Frame, landmarks: str, has_size: bool) -> Frame:
    # The landmark text tells the frames apart (SPEC 9.5): numpy's "[[x y] ...]" at the
    # original resolution, "x0,y0,..." at 1024; without Height/Width only 1024 is possible.
    if frame is not Frame.AUTO:
        return frame
    if not has_size:
        return Frame.R1024
    return Frame.ORIGINAL if landmarks.lstrip().startswith("[") else Frame.R1024


def _parse(line: int, image_id: str, fields: dict[str, str], frame: Frame, report: ImportReport) -> ParsedRow:
    if not image_id:
        raise BadRow("empty image id")
    height, width = _size(fields, frame)
    numbers = _INT.findall(fields["Landmarks"])
    if len(numbers) != 2 * N_LANDMARKS:
        raise BadRow(f"{len(numbers)} landmark coordinates, expected {N_LANDMARKS}x2")
    values_ = list(map(int, numbers))
    points = [list(point) for point in zip(values_[0::2], values_[1::2], strict=True)]
    rle = {organ: _rle(fields[column], height * width, column) for column, organ in _MASKS.items()}
    mean, max_ = _dice(fields["Dice RCA (Mean)"]), _dice(fields["Dice RCA (Max)"])
    if mean is not None and max_ is not None and mean > max_:
        report.mean_above_max += 1
    values: dict[str, Any] = {
        "dice_rca_mean": mean,
        "dice_rca_max": max_,
        "qc_status": QCStatus.SKIPPED if mean is None and max_ is None else QCStatus.DONE,
        "pipeline_version": IMPORT_PIPELINE[frame],
        "height": height,
        "width": width,
    }
    suffix = "" if frame is Frame.ORIGINAL else "_1024"
    other = "_1024" if frame is Frame.ORIGINAL else ""
    values.update({f"rle_{organ}{suffix}": text for organ, text in rle.items()})
    values.update({f"rle_{organ}{other}": "" for organ in rle})
    if frame is Frame.ORIGINAL:
        # Verbatim: the export writes this text back byte for byte.
        values.update(landmarks_original=points, landmarks_original_str=fields["Landmarks"], landmarks_1024=[])
    else:
        values.update(landmarks_1024=points, landmarks_original=[], landmarks_original_str="")
    digest = hashlib.sha1("\x1f".join([image_id, frame.value, *fields.values()]).encode()).hexdigest()
    known = (height, width) if frame is Frame.ORIGINAL else (None, None)
    return ParsedRow(line, image_id, values, height=known[0], width=known[1], fingerprint=digest)


def _size(fields: dict[str, str], frame: Frame) -> tuple[int, int]:
    if "Height" not in fields or "Width" not in fields:
        return 1024, 1024
    try:
        height, width = int(fields["Height"]), int(fields["Width"])
    except ValueError:
        raise BadRow(f"Height/Width not whole numbers: {fields['Height']!r} x {fields['Width']!r}") from None
    if height <= 0 or width <= 0:
        raise BadRow(f"Height/Width must be positive: {height} x {width}")
    if frame is Frame.R1024 and (height, width) != (1024, 1024):
        raise BadRow(f"a 1024-frame row with Height/Width {height} x {width}")
    return height, width


def _rle(text: str, pixels: int, column: str) -> str:
    # A regex over the whole text and the last run only: the encoder writes runs in
    # order, so the last one reaches furthest (out-of-order runs are not checked).
    if not _RLE.fullmatch(text):
        raise BadRow(f"{column}: unparsable RLE (expected 'start length' pairs)")
    if text:
        # rsplit, not a "$"-anchored regex: that search rescans the whole text
        start, length = map(int, text.rsplit(" ", 2)[-2:])
        if start < 1 or start - 1 + length > pixels:
            raise BadRow(f"{column}: run {start} {length} ends past Height x Width = {pixels}")
    return text


def _dice(text: str) -> float | None:
    if not text.strip():
        return None
    try:
        return float(text)
    except ValueError:
        raise BadRow(f"Dice RCA not a number: {text!r}") from None


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
) -> ImportReport:
    """Import the CheXmask CSV at ``path`` (plain or gzip) as ``model``'s segmentations
    of ``dataset``; idempotent. ``progress`` is called with the rows of each batch."""
    dataset = canonical(dataset)
    report = ImportReport()
    index.register_model(model, weights_sha256, "published CheXmask masks (imported)")
    context = _Context(dataset, release, model, weights_sha256)
    with open_text(path) as handle:
        batch: list[ParsedRow] = []
        for row in read_rows(handle, Frame(frame), report):
            batch.append(row)
            if len(batch) >= batch_size:
                _store(index, context, batch, report)
                if progress:
                    progress(len(batch))
                batch = []
        if batch:
            _store(index, context, batch, report)
            if progress:
                progress(len(batch))
    return report


@dataclass(frozen=True)
class _Context:
    dataset: str
    release: str | None
    model: str
    weights_sha256: str

    def etag(self, row: ParsedRow) -> str:
        # The model is part of the fingerprint: the same file imported as another
        # model must still store that model's rows.
        return f"chexmask-import:{hashlib.sha1(f'{self.model}:{row.fingerprint}'.encode()).hexdigest()}"


def _store(index: MaskIndex, context: _Context, rows: list[ParsedRow], report: ImportReport) -> None:
    """One batch in one transaction: new images inserted, changed ones updated,
    their segmentations upserted on (image_sha256, model_version)."""
    rows = _last_per_id(rows, report)
    uris = {import_uri(context.dataset, r.image_id): r for r in rows}
    now = utcnow()
    with index.engine.begin() as connection:
        known = _known(connection, list(uris))
        new = [(uri, r) for uri, r in uris.items() if uri not in known]
        changed = [(uri, r) for uri, r in uris.items() if uri in known and known[uri][1] != context.etag(r)]
        report.taken += len(new)
        report.updated += len(changed)
        report.unchanged += len(rows) - len(new) - len(changed)
        ids = {uri: image_id for uri, (image_id, _) in known.items()}
        if new:
            inserted = connection.execute(
                sa.insert(SourceImage).returning(SourceImage.id, SourceImage.uri, sort_by_parameter_order=True),
                [_image_values(context, uri, r, now) | {"first_seen": now} for uri, r in new],
            )
            ids.update((uri, image_id) for image_id, uri in inserted)
        if changed:
            connection.execute(
                sa.update(SourceImage).where(SourceImage.id == sa.bindparam("image_pk")),
                [_image_values(context, uri, r, now) | {"image_pk": ids[uri]} for uri, r in changed],
            )
        work = new + changed
        if work:
            connection.execute(_upsert(index), [_segmentation_values(context, ids[uri], r, now) for uri, r in work])


def _last_per_id(rows: list[ParsedRow], report: ImportReport) -> list[ParsedRow]:
    kept: dict[str, ParsedRow] = {}
    for row in rows:
        if row.image_id in kept:
            # The later row wins, as a later file would; the earlier one is reported.
            report.skip(kept[row.image_id].line, f"image id {row.image_id!r} again at line {row.line}")
        kept[row.image_id] = row
    return list(kept.values())


def _known(connection: sa.Connection, uris: list[str]) -> dict[str, tuple[int, str | None]]:
    found: dict[str, tuple[int, str | None]] = {}
    for start in range(0, len(uris), 500):  # under every backend's parameter limit
        statement = sa.select(SourceImage.uri, SourceImage.id, SourceImage.etag_or_version).where(
            SourceImage.uri.in_(uris[start : start + 500])
        )
        found.update((uri, (image_id, etag)) for uri, image_id, etag in connection.execute(statement))
    return found


def _image_values(context: _Context, uri: str, row: ParsedRow, now: Any) -> dict[str, Any]:
    return {
        "uri": uri,
        "etag_or_version": context.etag(row),
        "sha256": import_sha256(context.dataset, row.image_id),
        "size": None,
        "dataset": context.dataset,
        "release": context.release,
        "dataset_image_id": row.image_id,
        "height": row.height,
        "width": row.width,
        "updated_at": now,
        "status": ImageStatus.DONE,
        "refusal_code": None,
        "reason": None,
        "attempts": 0,
    }


def _segmentation_values(context: _Context, image_id: int, row: ParsedRow, now: Any) -> dict[str, Any]:
    return {
        **row.values,
        "image_id": image_id,
        "image_sha256": import_sha256(context.dataset, row.image_id),
        "dataset": context.dataset,
        "is_current": True,
        "model_version": context.model,
        "weights_sha256": context.weights_sha256,
        "created_at": now,
        "object_keys": {},
    }


def _upsert(index: MaskIndex) -> Any:
    from sqlalchemy.dialects import postgresql, sqlite

    insert = (postgresql if index.dialect == "postgresql" else sqlite).insert(Segmentation)
    # Everything the file decides is replaced; id and created_at stay, so the export keeps its order.
    replaced = [
        c.name
        for c in Segmentation.__table__.columns
        if c.name not in ("id", "image_sha256", "model_version", "created_at")
    ]
    return insert.on_conflict_do_update(
        index_elements=["image_sha256", "model_version"],
        set_={name: insert.excluded[name] for name in replaced},
    )


def imported_ids(index: MaskIndex, dataset: str, image_ids: Iterable[str]) -> set[str]:
    """The dataset image ids among ``image_ids`` that an import covers (one query per 500)."""
    wanted = list(dict.fromkeys(image_ids))
    found: set[str] = set()
    with index.engine.connect() as connection:
        for start in range(0, len(wanted), 500):
            statement = sa.select(SourceImage.dataset_image_id, SourceImage.uri).where(
                SourceImage.dataset_image_id.in_(wanted[start : start + 500]),
                SourceImage.dataset == canonical(dataset),
            )
            found.update(i for i, uri in connection.execute(statement) if is_imported_uri(uri))
    return found
