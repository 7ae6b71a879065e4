"""Reading and checking the rows of a CheXmask CSV, ready for the index (see
``chexmask_import``, which writes them).

Kept apart from the database code, and light to import, because for a large
file the reading and parsing run in a child process beside the one writing to
the index (``read_batches_in_child``): the two then take a core each, where
threads of one process would share one interpreter lock.

Records are read by ``csv_records`` (the csv module's records, faster; a file of
any size, gzip too). The checks are done on whole texts in C (``translate``,
``split``, ``count``) rather than per number in Python: a row's 240 landmark
numbers and three RLE strings are thousands of characters, and per-number work
was most of the cost of an import.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import multiprocessing
import queue
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import Enum
from functools import lru_cache
from pathlib import Path
from typing import IO, Any, NamedTuple

from chexmask.anatomy import N_LANDMARKS
from chexmask.datasets import ID_COLUMNS
from chexmask.errors import ConfigError
from chexmask.status import QCStatus
from chexmask.storage.csv_records import BLOCK_CHARS, csv_records
from chexmask.storage.layout import VALUE_COLUMNS
from chexmask.storage.models import IMPORT_PIPELINE_1024, IMPORT_PIPELINE_ORIGINAL

# The published data dictionary names the id column "Image ID"; each database's own
# CSV uses its own name. Either is accepted whatever the dataset.
ID_HEADERS = frozenset({*ID_COLUMNS.values(), "Image ID", "image_id"})
MAX_REPORTED = 50  # bad rows kept with their line numbers; all are counted
CHILD_QUEUE_BATCHES = 2  # parsed batches waiting for the writer: bounded memory
CHILD_POLL_S = 1.0  # how often the reader checks that the child is still alive


class Frame(str, Enum):
    AUTO = "auto"
    ORIGINAL = "original"
    R1024 = "1024"


# Segmentation.pipeline_version of imported rows: which frame the row holds.
IMPORT_PIPELINE = {Frame.ORIGINAL: IMPORT_PIPELINE_ORIGINAL, Frame.R1024: IMPORT_PIPELINE_1024}

_MASKS = {"Left Lung": "left_lung", "Right Lung": "right_lung", "Heart": "heart"}
# per frame and mask column: the Segmentation column it fills and the other frame's, left empty
_MASK_KEYS = {
    Frame.ORIGINAL: [(f"rle_{organ}", f"rle_{organ}_1024") for organ in _MASKS.values()],
    Frame.R1024: [(f"rle_{organ}_1024", f"rle_{organ}") for organ in _MASKS.values()],
}
# Landmark texts: numpy's "[[x y]\n [x y] ...]" (original) or "x0,y0,..." (1024).
_LANDMARK_SEPARATORS = str.maketrans("[],", "   ")
# What a landmark text may hold besides separators for the quick path; anything else
# (a sign, a decimal point, a letter) goes through int() and is reported if bad.
_PLAIN_DIGITS = re.compile(r"[0-9 ]*")
_LEADING_ZERO = re.compile(r"(?:^| )0[0-9]")  # "007" is a number but not JSON
_RLE_CHARACTERS = b"0123456789 "


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


class ParsedRow(NamedTuple):  # a tuple: made thousands of times a second
    line: int
    image_id: str
    # Segmentation columns as the database drivers take them: JSON columns as JSON text
    values: dict[str, Any]
    height: int | None  # of the original image, when the row holds that frame
    width: int | None
    fingerprint: str


@dataclass(frozen=True)
class Columns:
    """Where each CheXmask column is in a file's records."""

    count: int  # fields in the header
    image_id: int
    values: tuple[int, ...]  # the value columns the file has, in VALUE_COLUMNS order (fingerprinted)
    mean: int
    max: int
    landmarks: int
    masks: tuple[tuple[int, str], ...]  # (field, column name) in _MASKS order
    size: tuple[int, int] | None  # (Height, Width) fields

    @classmethod
    def of(cls, header: list[str]) -> Columns:
        missing = [c for c in VALUE_COLUMNS if c not in header and c not in ("Height", "Width")]
        if missing:
            raise ConfigError(f"not a CheXmask CSV: no column(s) {', '.join(missing)}")
        has_size = "Height" in header and "Width" in header
        return cls(
            count=len(header),
            image_id=_id_index(header),
            values=tuple(header.index(name) for name in VALUE_COLUMNS if name in header),
            mean=header.index("Dice RCA (Mean)"),
            max=header.index("Dice RCA (Max)"),
            landmarks=header.index("Landmarks"),
            masks=tuple((header.index(column), column) for column in _MASKS),
            size=(header.index("Height"), header.index("Width")) if has_size else None,
        )


@dataclass
class ParsedBatch:
    rows: list[ParsedRow]
    bad: list[tuple[int, str]]  # every bad row of the batch, in order
    mean_above_max: int
    unchanged: int = 0  # rows left out as the index already has them (``Imported``)


@dataclass(frozen=True)
class Imported:
    """What the index held of a dataset's imported rows when an import started: each
    image id's row etag (``import_etag``), so that rows imported before, unchanged,
    are told apart before they are parsed and checked (a re-import then costs little
    more than reading the file). The writer still checks every row it gets."""

    model: str
    etags: dict[str, str]  # dataset image id -> etag of its imported row


def import_etag(model: str, fingerprint: str) -> str:
    """An imported image's ``etag_or_version``. The model is part of it: the same file
    imported as another model must still store that model's rows."""
    return f"chexmask-import:{hashlib.sha1(f'{model}:{fingerprint}'.encode()).hexdigest()}"


@dataclass
class ReadBatch:
    """A batch of the file's records, parsed, and the frame its rows hold."""

    frame: Frame | None  # None until a record with the header's field count is seen
    parsed: ParsedBatch
    records: int  # records read (good and bad), for the progress bar


def read_batches(
    path: str | Path, frame: Frame, batch_size: int, imported: Imported | None = None
) -> Iterator[ReadBatch]:
    """The CSV at ``path`` read, parsed and checked ``batch_size`` records at a time,
    leaving out rows ``imported`` has unchanged. ``frame`` AUTO is told by the first
    whole record (``frame_of``)."""
    with open_text(path) as handle:
        columns, records = read_records(handle)
        detected: Frame | None = None
        for chunk in _chunks(records, batch_size):
            if detected is None:
                # until a record has the header's field count, every record is bad whatever the frame
                whole = next((r for _, r in chunk if len(r) == columns.count), None)
                detected = None if whole is None else frame_of(frame, columns, whole)
            yield ReadBatch(detected, parse_batch(columns, detected or Frame.ORIGINAL, chunk, imported), len(chunk))


def read_batches_in_child(
    path: str | Path, frame: Frame, batch_size: int, imported: Imported | None = None
) -> Iterator[ReadBatch]:
    """``read_batches`` run in a child process, its batches handed over through a
    bounded queue; an error there (a header that is not CheXmask's) is raised here.
    The child is spawned, not forked: the caller may hold threads or a model."""
    context = multiprocessing.get_context("spawn")
    batches: multiprocessing.Queue[ReadBatch | BaseException | None] = context.Queue(CHILD_QUEUE_BATCHES)
    child = context.Process(
        target=_read_into, args=(batches, str(path), frame, batch_size, imported), name="chexmask-csv", daemon=True
    )
    child.start()
    try:
        while (item := _next_from(batches, child)) is not None:
            if isinstance(item, BaseException):
                raise item
            yield item
        child.join()
    finally:
        if child.is_alive():  # the caller stopped early or failed: the child's work is not wanted
            child.terminate()
            child.join()


def _read_into(
    batches: multiprocessing.Queue[Any], path: str, frame: Frame, batch_size: int, imported: Imported | None
) -> None:
    try:
        for batch in read_batches(path, frame, batch_size, imported):
            batches.put(batch)
    except Exception as exc:  # handed to the parent, which raises it: nothing dies silently here
        batches.put(exc)
        return
    batches.put(None)


def _next_from(batches: multiprocessing.Queue[Any], child: multiprocessing.process.BaseProcess) -> Any:
    while True:
        try:
            return batches.get(timeout=CHILD_POLL_S)
        except queue.Empty:
            if not child.is_alive() and batches.empty():
                raise RuntimeError(f"the CSV reader process ended with exit code {child.exitcode}") from None


def _chunks(records: Iterator[tuple[int, list[str]]], size: int) -> Iterator[list[tuple[int, list[str]]]]:
    chunk: list[tuple[int, list[str]]] = []
    for record in records:
        chunk.append(record)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def open_text(path: str | Path) -> IO[str]:
    """The CSV as text; gzip recognised by its magic bytes, whatever the name."""
    path = Path(path)
    with path.open("rb") as probe:
        gzipped = probe.read(2) == b"\x1f\x8b"
    if gzipped:
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8-sig", newline="")
    # a buffer as large as csv_records' blocks: one read and one decode per block
    return path.open(encoding="utf-8-sig", newline="", buffering=BLOCK_CHARS)


def read_records(handle: IO[str]) -> tuple[Columns, Iterator[tuple[int, list[str]]]]:
    """The file's columns, and its records with the line each starts on (blank lines left out)."""
    records = csv_records(handle)
    _, header = next(records, (1, []))
    return Columns.of([name.strip() for name in header]), records


def frame_of(frame: Frame, columns: Columns, record: list[str]) -> Frame:
    # The landmark text tells the frames apart (SPEC 9.5): numpy's "[[x y] ...]" at the
    # original resolution, "x0,y0,..." at 1024; without Height/Width only 1024 is possible.
    if frame is not Frame.AUTO:
        return frame
    if columns.size is None:
        return Frame.R1024
    return Frame.ORIGINAL if record[columns.landmarks].lstrip().startswith("[") else Frame.R1024


def parse_batch(
    columns: Columns, frame: Frame, records: list[tuple[int, list[str]]], imported: Imported | None = None
) -> ParsedBatch:
    """Parse and check ``records`` (line, fields), leaving out rows ``imported`` has
    unchanged (counted)."""
    batch = ParsedBatch([], [], 0)
    # An id twice in a batch is left to the writer, which reports the repeat.
    once = _ids_once(columns, records) if imported and imported.etags else set()
    for line, record in records:
        try:
            if len(record) != columns.count:
                raise BadRow(f"{len(record)} fields, the header has {columns.count}")
            if imported and _unchanged(record, columns, frame, imported, once):
                batch.unchanged += 1
                batch.mean_above_max += _mean_above_max(record, columns)
                continue
            row, mean_above_max = _parse(line, record, columns, frame)
        except BadRow as exc:
            batch.bad.append((line, str(exc)))
            continue
        batch.rows.append(row)
        batch.mean_above_max += mean_above_max
    return batch


def _ids_once(columns: Columns, records: list[tuple[int, list[str]]]) -> set[str]:
    counts = Counter(r[columns.image_id].strip() for _, r in records if len(r) == columns.count)
    return {image_id for image_id, count in counts.items() if count == 1}


def _unchanged(record: list[str], columns: Columns, frame: Frame, imported: Imported, once: set[str]) -> bool:
    image_id = record[columns.image_id].strip()
    etag = imported.etags.get(image_id) if image_id in once else None
    return etag is not None and etag == import_etag(imported.model, _fingerprint(image_id, frame, record, columns))


def _fingerprint(image_id: str, frame: Frame, record: list[str], columns: Columns) -> str:
    fingerprinted = [image_id, frame.value, *(record[i] for i in columns.values)]
    return hashlib.sha1("\x1f".join(fingerprinted).encode()).hexdigest()


def _mean_above_max(record: list[str], columns: Columns) -> bool:
    # of a row imported before, so both values parsed then
    mean, max_ = _dice(record[columns.mean]), _dice(record[columns.max])
    return mean is not None and max_ is not None and mean > max_


def _id_index(header: list[str]) -> int:
    for i, name in enumerate(header):
        if name in ID_HEADERS:
            return i
    raise ConfigError(f"no image id column in the header (one of {', '.join(sorted(ID_HEADERS))})")


def _parse(line: int, record: list[str], columns: Columns, frame: Frame) -> tuple[ParsedRow, bool]:
    image_id = record[columns.image_id].strip()
    if not image_id:
        raise BadRow("empty image id")
    height, width = _size(record, columns, frame)
    landmarks = record[columns.landmarks]
    points = landmarks_json(landmarks)
    pixels = height * width
    mean, max_ = _dice(record[columns.mean]), _dice(record[columns.max])
    values: dict[str, Any] = {
        "dice_rca_mean": mean,
        "dice_rca_max": max_,
        "qc_status": (QCStatus.SKIPPED if mean is None and max_ is None else QCStatus.DONE).value,
        "pipeline_version": IMPORT_PIPELINE[frame],
        "height": height,
        "width": width,
    }
    for (index, column), (key, empty) in zip(columns.masks, _MASK_KEYS[frame], strict=True):
        values[key] = _rle(record[index], pixels, column)
        values[empty] = ""
    if frame is Frame.ORIGINAL:
        # Verbatim: the export writes this text back byte for byte.
        values.update(landmarks_original=points, landmarks_original_str=landmarks, landmarks_1024="[]")
    else:
        values.update(landmarks_1024=points, landmarks_original="[]", landmarks_original_str="")
    known = (height, width) if frame is Frame.ORIGINAL else (None, None)
    fingerprint = _fingerprint(image_id, frame, record, columns)
    row = ParsedRow(line, image_id, values, height=known[0], width=known[1], fingerprint=fingerprint)
    return row, mean is not None and max_ is not None and mean > max_


def landmarks_json(text: str) -> str:
    """The compact JSON ``[[x0,y0],...]`` (as the index writes it) of a landmark text in
    either frame's form; BadRow unless it holds exactly N_LANDMARKS x 2 integers."""
    numbers = text.translate(_LANDMARK_SEPARATORS).split()
    if len(numbers) != 2 * N_LANDMARKS:
        raise BadRow(f"{len(numbers)} landmark coordinates, expected {N_LANDMARKS}x2")
    spaced = " ".join(numbers)
    # the regex only where a number starts with 0 at all (rare), as it is the slower test
    if not _PLAIN_DIGITS.fullmatch(spaced) or (" 0" in f" {spaced}" and _LEADING_ZERO.search(spaced)):
        # signs, leading zeros or worse: int() decides, and writes the JSON form
        try:
            numbers = [str(int(n)) for n in numbers]
        except ValueError:
            raise BadRow("landmark coordinates are not all integers") from None
    return _points_template(N_LANDMARKS) % tuple(numbers)


@lru_cache(maxsize=4)
def _points_template(points: int) -> str:
    return "[" + ",".join(["[%s,%s]"] * points) + "]"


def _size(record: list[str], columns: Columns, frame: Frame) -> tuple[int, int]:
    if columns.size is None:
        return 1024, 1024
    raw_height, raw_width = record[columns.size[0]], record[columns.size[1]]
    try:
        height, width = int(raw_height), int(raw_width)
    except ValueError:
        raise BadRow(f"Height/Width not whole numbers: {raw_height!r} x {raw_width!r}") from None
    if height <= 0 or width <= 0:
        raise BadRow(f"Height/Width must be positive: {height} x {width}")
    if frame is Frame.R1024 and (height, width) != (1024, 1024):
        raise BadRow(f"a 1024-frame row with Height/Width {height} x {width}")
    return height, width


def _rle(text: str, pixels: int, column: str) -> str:
    # "start length" pairs separated by single spaces, checked on the whole text at once;
    # of the runs only the last is bounds-checked: the encoder writes runs in order, so
    # it reaches furthest (out-of-order runs are not checked).
    if not text:
        return text
    if (
        not text.isascii()  # then bytes' translate, 4x a regex's speed, strips digits and spaces
        or text.encode("ascii").translate(None, _RLE_CHARACTERS)
        or text[0] == " "
        or text[-1] == " "
        or "  " in text
        or text.count(" ") % 2 == 0
    ):
        raise BadRow(f"{column}: unparsable RLE (expected 'start length' pairs)")
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
