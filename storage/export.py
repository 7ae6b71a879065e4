"""Export a dataset's masks in the CheXmask CSV layout (SPEC 9.5), or the same
columns as Parquet.

Rows are streamed from the index and written as they come, so the size of an
export is bounded by disk, not memory. Unlike the official writer, the Dice
RCA mean goes in the "Dice RCA (Mean)" column and the max in "(Max)".
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from enum import Enum
from itertools import islice
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from chexmask.errors import ConfigError
from chexmask.storage.index import MaskIndex
from chexmask.storage.queries import QueryFilters
from chexmask.storage.layout import csv_line, header, landmarks_1024_text
from chexmask.storage.models import Segmentation, SourceImage

FORMATS = ("csv", "parquet")
BATCH_SIZE = 2000


class Resolution(str, Enum):
    ORIGINAL = "original"
    R1024 = "1024"


def _resolve_model(index: MaskIndex, model: str | None) -> str | None:
    if model is not None:
        return model
    names = [m.name for m in index.models()]
    if len(names) > 1:
        raise ConfigError(f"the index holds several models ({', '.join(names)}); choose one with --model")
    return names[0] if names else None


def iter_rows(
    index: MaskIndex,
    *,
    dataset: str,
    release: str | None = None,
    model: str | None = None,
    resolution: Resolution = Resolution.ORIGINAL,
    min_dice_mean: float | None = None,
    batch_size: int = BATCH_SIZE,
) -> Iterator[tuple[Any, ...]]:
    """The export rows, in the order they were segmented, as tuples matching ``header(dataset)``."""
    resolution = Resolution(resolution)
    filters = QueryFilters(
        dataset=dataset,
        release=release,
        model=_resolve_model(index, model),
        min_dice_mean=min_dice_mean,
    )
    if resolution is Resolution.ORIGINAL:
        masks = (Segmentation.rle_left_lung, Segmentation.rle_right_lung, Segmentation.rle_heart)
        landmarks = Segmentation.landmarks_original_str
        size: tuple[Any, ...] = (Segmentation.height, Segmentation.width)
    else:
        masks = (Segmentation.rle_left_lung_1024, Segmentation.rle_right_lung_1024,
                 Segmentation.rle_heart_1024)
        # the JSON text, undecoded: reformatting it is far cheaper than decoding it
        landmarks, size = sa.cast(Segmentation.landmarks_1024, sa.Text), ()
    statement = index.select_segmentations(
        filters,
        SourceImage.dataset_image_id,
        SourceImage.uri,
        Segmentation.dice_rca_mean,
        Segmentation.dice_rca_max,
        landmarks,
        *masks,
        *size,
    ).order_by(Segmentation.id)

    if resolution is Resolution.ORIGINAL:
        for name, uri, mean, max_, text, left, right, heart, height, width in index.stream(
            statement, batch_size
        ):
            yield (name or uri, mean, max_, text, left, right, heart, height, width)
    else:
        for name, uri, mean, max_, points, left, right, heart in index.stream(statement, batch_size):
            text = landmarks_1024_text(points)
            yield (name or uri, mean, max_, text, left, right, heart, 1024, 1024)


def export(
    index: MaskIndex,
    out: str | os.PathLike[str],
    *,
    dataset: str,
    release: str | None = None,
    model: str | None = None,
    resolution: Resolution = Resolution.ORIGINAL,
    min_dice_mean: float | None = None,
    fmt: str | None = None,
) -> int:
    """Write the export to ``out`` (replaced only once complete); returns the row count.

    Rows whose image has no dataset id use its URI as the id. ``fmt`` defaults
    to the file suffix (``.parquet`` -> Parquet, else CSV).
    """
    out = Path(out)
    fmt = fmt or ("parquet" if out.suffix == ".parquet" else "csv")
    if fmt not in FORMATS:
        raise ConfigError(f"unknown export format {fmt!r}; choose from {', '.join(FORMATS)}")
    rows = iter_rows(
        index,
        dataset=dataset,
        release=release,
        model=model,
        resolution=resolution,
        min_dice_mean=min_dice_mean,
    )
    columns = header(dataset)
    with _replace_when_done(out) as tmp:
        return _write_csv(tmp, columns, rows) if fmt == "csv" else _write_parquet(tmp, columns, rows)


@contextmanager
def _replace_when_done(out: Path) -> Iterator[Path]:
    # A half-written export must never look like a finished one.
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, 0o644)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)


def _write_csv(path: Path, columns: list[str], rows: Iterator[tuple[Any, ...]]) -> int:
    count = 0
    with path.open("w", newline="", encoding="utf-8") as f:
        f.write(csv_line(columns))
        while batch := list(islice(rows, BATCH_SIZE)):
            f.write("".join(map(csv_line, batch)))
            count += len(batch)
    return count


def _write_parquet(path: Path, columns: list[str], rows: Iterator[tuple[Any, ...]]) -> int:
    import pyarrow as pa
    import pyarrow.parquet as pq

    types = [pa.string(), pa.float64(), pa.float64(), pa.string(), pa.string(), pa.string(),
             pa.string(), pa.int64(), pa.int64()]
    schema = pa.schema(list(zip(columns, types, strict=True)))
    count = 0
    with pq.ParquetWriter(path, schema) as writer:
        while batch := list(islice(rows, BATCH_SIZE)):
            columns_of_batch = zip(*batch, strict=True)  # rows -> columns
            arrays = [pa.array(v, type=t) for v, t in zip(columns_of_batch, types, strict=True)]
            writer.write_batch(pa.RecordBatch.from_arrays(arrays, schema=schema))
            count += len(batch)
    return count
