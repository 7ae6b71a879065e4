"""Export a dataset's masks in the CheXmask CSV layout (SPEC 9.5), or the same
columns as Parquet.

Rows are streamed from the index and written as they come, so the size of an
export is bounded by disk, not memory. Unlike the official writer, the Dice
RCA mean goes in the "Dice RCA (Mean)" column and the max in "(Max)".
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from enum import Enum
from itertools import islice
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import aliased

from chexmask.anatomy import LANDMARK_STD_COLUMN, UNCERTAINTY_COLUMNS
from chexmask.datasets import canonical
from chexmask.errors import ConfigError
from chexmask.storage.chexmask_csv import IMPORT_PIPELINE, Frame
from chexmask.storage.index import MaskIndex
from chexmask.storage.layout import csv_line, header, landmarks_1024_text
from chexmask.storage.models import IMPORT_PIPELINES, Segmentation, SourceImage
from chexmask.storage.objectstore import ObjectStore
from chexmask.storage.queries import MEASUREMENT_COLUMNS, QueryFilters

FORMATS = ("csv", "parquet")
BATCH_SIZE = 2000
# Added after the CheXmask columns by ``--measurements`` (worker/measure.py), index column names.
MEASUREMENT_HEADER = [column.key for column in MEASUREMENT_COLUMNS]


class Resolution(str, Enum):
    ORIGINAL = "original"
    R1024 = "1024"


def _resolve_models(index: MaskIndex, model: str | Sequence[str] | None) -> list[str | None]:
    """The models to export, in precedence order (``a,b`` or a list); by default the only one."""
    if model is not None:
        names = [m.strip() for m in ([model] if isinstance(model, str) else model) for m in m.split(",")]
        return [m for m in names if m]
    names = [m.name for m in index.models()]
    if len(names) > 1:
        raise ConfigError(
            f"the index holds several models ({', '.join(names)}); choose one with --model, "
            "or several in order of precedence (--model a,b)"
        )
    return names[:1] or [None]


def _in_frame(segmentation: Any, resolution: Resolution) -> Any:
    """Rows that hold ``resolution``: an import holds one frame only (chexmask_import)."""
    other = IMPORT_PIPELINE[Frame.R1024 if resolution is Resolution.ORIGINAL else Frame.ORIGINAL]
    return segmentation.pipeline_version != other


def _source(segmentation: Any, model: str | None, imported: bool) -> list[Any]:
    """One source of rows: a model's imported (published) rows, or its own segmentations."""
    kind = segmentation.pipeline_version.in_(IMPORT_PIPELINES)
    return [*([] if model is None else [segmentation.model_version == model]), kind if imported else ~kind]


def _sources(index: MaskIndex, dataset: str, models: list[str | None]) -> list[tuple[str | None, bool]]:
    """(model, imported) in precedence order: each model's published rows before its own.
    Without imports in the dataset there is one source per model (and no dedup cost)."""
    any_import = sa.exists().where(
        Segmentation.dataset == canonical(dataset), Segmentation.pipeline_version.in_(IMPORT_PIPELINES)
    )
    with index.engine.connect() as connection:
        has_imports = connection.execute(sa.select(any_import)).scalar()
    if not has_imports:
        return [(model, False) for model in models]
    return [(model, imported) for model in models for imported in (True, False)]


def iter_rows(
    index: MaskIndex,
    *,
    dataset: str,
    release: str | None = None,
    model: str | Sequence[str] | None = None,
    resolution: Resolution = Resolution.ORIGINAL,
    min_dice_mean: float | None = None,
    batch_size: int = BATCH_SIZE,
    measurements: bool = False,
    uncertainty: bool = False,
) -> Iterator[tuple[Any, ...]]:
    """The export rows as tuples matching ``header(dataset)``: one per dataset image id,
    from the first source that has it (see ``_sources``), each source in the order
    its rows were stored. Published rows imported unchanged come out byte for byte.
    With ``measurements`` each row goes on with ``MEASUREMENT_HEADER``, then with
    ``uncertainty`` with ``UNCERTAINTY_HEADER`` (empty where none)."""
    resolution = Resolution(resolution)
    sources = _sources(index, dataset, _resolve_models(index, model))
    extra = MEASUREMENT_COLUMNS if measurements else ()
    sources_before: list[tuple[str | None, bool | None, list[tuple[str | None, bool]]]]
    if len(sources) == 1:  # the common case: one model, nothing imported, no dedup
        sources_before = [(sources[0][0], None, [])]
    else:
        sources_before = [(name, imported, sources[:position]) for position, (name, imported) in enumerate(sources)]
    for name, imported, earlier in sources_before:
        yield from _rows_of(
            index, dataset, release, name, imported, earlier, resolution, min_dice_mean, batch_size, extra, uncertainty
        )


def _rows_of(
    index: MaskIndex,
    dataset: str,
    release: str | None,
    model: str | None,
    imported: bool | None,
    earlier: list[tuple[str | None, bool]],
    resolution: Resolution,
    min_dice_mean: float | None,
    batch_size: int,
    extra: Sequence[Any] = (),
    uncertainty: bool = False,
) -> Iterator[tuple[Any, ...]]:
    filters = QueryFilters(dataset=dataset, release=release, model=model, min_dice_mean=min_dice_mean)
    if resolution is Resolution.ORIGINAL:
        masks = (Segmentation.rle_left_lung, Segmentation.rle_right_lung, Segmentation.rle_heart)
        landmarks = Segmentation.landmarks_original_str
        size: tuple[Any, ...] = (Segmentation.height, Segmentation.width)
    else:
        masks = (Segmentation.rle_left_lung_1024, Segmentation.rle_right_lung_1024, Segmentation.rle_heart_1024)
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
        *extra,
        *(UNCERTAINTY_SELECT if uncertainty else ()),
    )
    statement = statement.where(_in_frame(Segmentation, resolution))
    if imported is not None:
        statement = statement.where(*_source(Segmentation, None, imported))
    if earlier:
        statement = statement.where(~_covered_by(dataset, earlier, resolution))
    statement = statement.order_by(Segmentation.id)

    # The measurements (``extra``), then the uncertainty, ride after the CheXmask columns.
    tail = len(extra) + (len(UNCERTAINTY_SELECT) if uncertainty else 0)
    for row in index.stream(statement, batch_size):
        values, measured = tuple(row[: len(row) - tail]), tuple(row[len(row) - tail :][: len(extra)])
        more = tuple(row[len(row) - tail + len(extra) :])
        if resolution is Resolution.ORIGINAL:
            name, uri, mean, max_, text, left, right, heart, height, width = values
            line = (name or uri, mean, max_, text, left, right, heart, height, width)
        else:
            name, uri, mean, max_, points, left, right, heart = values
            line = (name or uri, mean, max_, landmarks_1024_text(points), left, right, heart, 1024, 1024)
        yield line + measured + (_uncertainty_values(*more) if uncertainty else ())


# The uncertainty columns of an export that asks for them, after the CheXmask ones.
UNCERTAINTY_HEADER = [*UNCERTAINTY_COLUMNS, LANDMARK_STD_COLUMN]
UNCERTAINTY_SELECT = (
    Segmentation.uncertainty_rl,
    Segmentation.uncertainty_ll,
    Segmentation.uncertainty_h,
    Segmentation.landmark_std,
)


def _uncertainty_values(rl: Any, ll: Any, h: Any, std: list[float] | None) -> tuple[Any, ...]:
    """Organ means rounded as ``chexmask segment`` writes them; the 120 stds as x,y,... text."""
    means = tuple(None if v is None else round(v, 4) for v in (rl, ll, h))
    return (*means, None if std is None else ",".join(f"{v:.3f}" for v in std))


def _covered_by(dataset: str, earlier: list[tuple[str | None, bool]], resolution: Resolution) -> Any:
    """Whether the row's dataset image id has a row in one of the ``earlier`` sources."""
    other_seg, other_image = aliased(Segmentation), aliased(SourceImage)
    return sa.exists().where(
        other_image.dataset_image_id == SourceImage.dataset_image_id,
        other_seg.image_id == other_image.id,
        other_seg.dataset == canonical(dataset),
        other_seg.is_current.is_(True),
        _in_frame(other_seg, resolution),
        sa.or_(*(sa.and_(*_source(other_seg, m, imported)) for m, imported in earlier)),
    )


def export(
    index: MaskIndex,
    out: str | os.PathLike[str],
    *,
    dataset: str,
    release: str | None = None,
    model: str | Sequence[str] | None = None,
    resolution: Resolution = Resolution.ORIGINAL,
    min_dice_mean: float | None = None,
    fmt: str | None = None,
    measurements: bool = False,
    uncertainty: bool = False,
) -> int:
    """Write the export to ``out`` (replaced only once complete); returns the row count.

    Rows whose image has no dataset id use its URI as the id. ``fmt`` defaults
    to the file suffix (``.parquet`` -> Parquet, else CSV). ``measurements`` adds the
    measurement columns after the CheXmask ones (empty where not measured).
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
        measurements=measurements,
        uncertainty=uncertainty,
    )
    columns = (
        header(dataset) + (MEASUREMENT_HEADER if measurements else []) + (UNCERTAINTY_HEADER if uncertainty else [])
    )
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

    types = [
        pa.string(),
        pa.float64(),
        pa.float64(),
        pa.string(),
        pa.string(),
        pa.string(),
        pa.string(),
        pa.int64(),
        pa.int64(),
    ]
    types += [_arrow_type(pa, name) for name in columns[len(types) :]]  # --measurements, --uncertainty
    schema = pa.schema(list(zip(columns, types, strict=True)))
    count = 0
    with pq.ParquetWriter(path, schema) as writer:
        while batch := list(islice(rows, BATCH_SIZE)):
            columns_of_batch = zip(*batch, strict=True)  # rows -> columns
            arrays = [pa.array(v, type=t) for v, t in zip(columns_of_batch, types, strict=True)]
            writer.write_batch(pa.RecordBatch.from_arrays(arrays, schema=schema))
            count += len(batch)
    return count


def _arrow_type(pa: Any, name: str) -> Any:
    """The Arrow type of an extra column: the uncertainty's, or a measurement's type in the index."""
    if name in UNCERTAINTY_HEADER:
        return pa.string() if name == LANDMARK_STD_COLUMN else pa.float64()
    python_type = Segmentation.__table__.c[name].type.python_type
    return {int: pa.int64(), float: pa.float64(), str: pa.string()}[python_type]


# The DICOM artefacts of a segmentation (object_keys names) and their file suffixes.
DICOM_ARTEFACTS = {"seg": ".seg.dcm", "sr": ".sr.dcm"}


def export_dicom(
    index: MaskIndex, store: ObjectStore, out: str | os.PathLike[str], filters: QueryFilters
) -> tuple[int, int]:
    """Copy the DICOM SEG and SR objects of the matching segmentations (those of DICOM
    sources) to ``out/<model>/<image id>.seg.dcm`` and ``.sr.dcm``; returns
    (segmentations, files). Image ids with ``/`` are flattened with ``__``."""
    statement = index.select_segmentations(
        filters, Segmentation.model_version, SourceImage.dataset_image_id, SourceImage.uri, Segmentation.object_keys
    ).order_by(Segmentation.id)
    segmentations = files = 0
    for model, name, uri, keys in index.stream(statement):
        wanted = {kind: keys[kind] for kind in DICOM_ARTEFACTS if kind in keys}
        if not wanted:
            continue  # not a DICOM source
        stem = (name or uri.rsplit("/", 1)[-1]).replace("/", "__")
        folder = Path(out) / model
        folder.mkdir(parents=True, exist_ok=True)
        for kind, key in wanted.items():
            with _replace_when_done(folder / f"{stem}{DICOM_ARTEFACTS[kind]}") as tmp, tmp.open("wb") as f:
                for chunk in store.stream(key):
                    f.write(chunk)
            files += 1
        segmentations += 1
    return segmentations, files
