"""``chexmask query|export|stats|api|db``: the index's commands, thin click wrappers
over the storage library."""

from __future__ import annotations

import csv
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict
from datetime import datetime
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from chexmask.config import Settings, mask_url
from chexmask.errors import ConfigError
from chexmask.status import ImageStatus
from chexmask.storage.chexmask_import import BATCH_SIZE, Frame
from chexmask.storage.index import MaskIndex
from chexmask.storage.queries import SORT_KEYS, QueryFilters, SegmentationSummary

if TYPE_CHECKING:
    from chexmask.storage.stats import GroupStats

_SORT_CHOICES = [*SORT_KEYS, *(f"-{key}" for key in SORT_KEYS)]

# The table's columns, and those added with --compare-to.
SUMMARY_SHOWN = [
    "id",
    "dataset",
    "release",
    "dataset_image_id",
    "model_version",
    "dice_rca_mean",
    "dice_rca_max",
    "qc_status",
    "status",
]
AGREEMENT_SHOWN = [
    "other_dice_rca_mean",
    "agreement_dice",
    "agreement_dice_rl",
    "agreement_dice_ll",
    "agreement_dice_h",
    "agreement_hausdorff_rl",
    "agreement_hausdorff_ll",
    "agreement_hausdorff_h",
]


def _open_index(upgraded: bool = True) -> MaskIndex:
    index = MaskIndex(Settings.from_env().database_url)
    if upgraded and index.current_revision() is None:
        raise ConfigError("the index has no schema yet; run `chexmask db upgrade` first")
    return index


def _filter_options(command: Callable[..., Any]) -> Callable[..., Any]:
    options = [
        click.option("--dataset", help="Dataset name or alias (nih, mimic, vindr, ...)."),
        click.option("--release"),
        click.option("--model", help="Model version."),
        click.option("--status", type=click.Choice([s.value for s in ImageStatus])),
        click.option("--min-dice-mean", type=float),
        click.option("--max-dice-mean", type=float),
        click.option("--min-dice-max", type=float),
        click.option("--max-dice-max", type=float),
        click.option("--created-after", type=click.DateTime(), help="UTC, inclusive."),
        click.option("--created-before", type=click.DateTime(), help="UTC, exclusive."),
        click.option("--id", "id_pattern", help="Dataset image id: exact, glob (* ?) or LIKE (%)."),
        click.option("--min-ctr", type=float, help="Cardiothoracic ratio at least this (README: Measurements)."),
        click.option("--max-ctr", type=float, help="Cardiothoracic ratio at most this."),
        click.option(
            "--compare-to", help="Only masks `chexmask compare` paired with this model's mask of the same image."
        ),
        click.option("--min-agreement-dice", type=float, help="With --compare-to: lowest organ Dice >= this."),
        click.option("--max-agreement-dice", type=float, help="With --compare-to: lowest organ Dice <= this."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


@click.command("query")
@_filter_options
@click.option(
    "--sort",
    type=click.Choice(_SORT_CHOICES),
    default="id",
    show_default=True,
    help="Sort key; a leading - sorts descending.",
)
@click.option("--limit", type=click.IntRange(min=1, max=2**62), default=100, show_default=True)
@click.option("--offset", type=click.IntRange(min=0, max=2**62), default=0, show_default=True)
@click.option("--format", "fmt", type=click.Choice(["table", "json", "csv"]), default="table", show_default=True)
def query_command(sort: str, limit: int, offset: int, fmt: str, **filters: Any) -> None:
    """List segmentations matching the filters.

    With --status refused or failed (and only image filters), list those images
    instead, with their reason codes and sentences (the web app's /problems fields).
    """
    status = filters.pop("status")
    if status in PROBLEM_STATUSES:
        _print_problems(filters, ImageStatus(status), limit, offset, fmt)
        return
    try:
        query = QueryFilters(status=ImageStatus(status) if status else None, **filters)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    rows = _open_index().query(query, sort=sort, limit=limit, offset=offset)
    # JSON and CSV always carry every field (the agreement ones empty without --compare-to)
    shown = [*SUMMARY_SHOWN, *(AGREEMENT_SHOWN if query.compare_to else [])]
    _print_rows([{k: _plain(v) for k, v in asdict(row).items()} for row in rows], fmt, shown=shown)


PROBLEM_STATUSES = (ImageStatus.REFUSED.value, ImageStatus.FAILED.value)
_IMAGE_FILTERS = {"dataset", "release", "id_pattern"}


def _print_problems(filters: dict[str, Any], status: ImageStatus, limit: int, offset: int, fmt: str) -> None:
    from chexmask.storage.browse import PROBLEM_FIELDS

    extra = sorted(k for k, v in filters.items() if v is not None and k not in _IMAGE_FILTERS)
    if extra:
        raise click.UsageError(
            f"--status {status.value} lists images; it takes only --dataset, --release, "
            f"--id (not {', '.join('--' + e.replace('_', '-') for e in extra)})"
        )
    images = _open_index().images(
        QueryFilters(status=status, **{k: filters[k] for k in _IMAGE_FILTERS}), limit=limit, offset=offset
    )
    rows = [{name: _plain(getattr(image, name)) for name in PROBLEM_FIELDS} for image in images]
    _print_rows(
        rows,
        fmt,
        columns=list(PROBLEM_FIELDS),
        shown=["id", "dataset", "dataset_image_id", "status", "refusal_code", "attempts", "reason"],
    )


def _plain(value: Any) -> Any:
    """JSON/CSV-friendly values: enums as their value, datetimes in ISO 8601."""
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, datetime):
        return value.isoformat()
    return value


def _print_rows(
    rows: list[dict[str, Any]], fmt: str, columns: list[str] | None = None, shown: list[str] | None = None
) -> None:
    columns = columns or list(SegmentationSummary.__dataclass_fields__)
    if fmt == "json":
        click.echo(json.dumps(rows, indent=2))
    elif fmt == "csv":
        writer = csv.DictWriter(sys.stdout, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        # lists (QC flags) as one cell, "a;b"
        writer.writerows({k: ";".join(v) if isinstance(v, list) else v for k, v in row.items()} for row in rows)
    else:
        shown = shown or SUMMARY_SHOWN
        click.echo(_table(shown, [[_cell(row[c]) for c in shown] for row in rows]))


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def _table(columns: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max([len(c), *(len(r[i]) for r in rows)]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in rows]
    return "\n".join(line.rstrip() for line in lines)


@click.command("export")
@click.option("--dataset", required=True, help="Dataset name or alias.")
@click.option("--release")
@click.option(
    "--model",
    help="Model version (needed when the index holds several); "
    "a,b: one row per image, from the first model that has it.",
)
@click.option("--resolution", type=click.Choice(["original", "1024"]), default="original", show_default=True)
@click.option("--min-dice-mean", type=float)
@click.option("--out", type=click.Path(writable=True), required=True, help="A file; a folder for dicom-seg.")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["csv", "parquet", "dicom-seg"]),
    help="Default: from the --out suffix (.parquet or CSV); dicom-seg: the DICOM SEG and SR files "
    "of the dataset's DICOM sources into the folder --out.",
)
@click.option(
    "--measurements", is_flag=True, help="Add the measurement columns (CTR, areas) after the CheXmask columns."
)
@click.option(
    "--uncertainty",
    is_flag=True,
    help="Add the landmark uncertainty after the CheXmask columns: mean std per organ and the 120 "
    "stds (pixels, 1024 frame); empty for segmentations made without it.",
)
def export_command(
    dataset: str,
    release: str | None,
    model: str | None,
    resolution: str,
    min_dice_mean: float | None,
    out: str,
    fmt: str | None,
    measurements: bool,
    uncertainty: bool,
) -> None:
    """Write a dataset's masks in the CheXmask CSV layout (or Parquet, or DICOM SEG and SR files)."""
    from chexmask.storage.export import Resolution, export

    if fmt == "dicom-seg":
        _export_dicom(dataset, release, model, min_dice_mean, out)
        return
    count = export(
        _open_index(),
        out,
        dataset=dataset,
        release=release,
        model=model,
        resolution=Resolution(resolution),
        min_dice_mean=min_dice_mean,
        fmt=fmt,
        measurements=measurements,
        uncertainty=uncertainty,
    )
    click.echo(f"wrote {count} rows to {out}", err=True)


def _export_dicom(dataset: str, release: str | None, model: str | None, min_dice_mean: float | None, out: str) -> None:
    from chexmask.storage.export import export_dicom
    from chexmask.storage.objectstore import open_store

    settings = Settings.from_env()
    store = open_store(settings.store_url, settings.s3_endpoint_url)
    filters = QueryFilters(dataset=dataset, release=release, model=model, min_dice_mean=min_dice_mean)
    segmentations, files = export_dicom(_open_index(), store, out, filters)
    click.echo(f"wrote {files} DICOM files of {segmentations} segmentations to {out}", err=True)


@click.command("stats")
@click.option("--dataset")
@click.option("--release")
@click.option("--model", help="Dice of this model version only (default: all models).")
@click.option(
    "--plot",
    type=click.Path(dir_okay=False, writable=True),
    help="Also draw Dice RCA (Mean) histograms per dataset to this PNG.",
)
@click.option(
    "--report",
    type=click.Path(dir_okay=False, writable=True),
    help="Also write the quality report (HTML: counts, Dice RCA histograms overall and per organ, flags, "
    "refusals, the worst masks) and its histograms as a PNG beside it.",
)
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True)
def stats_command(
    dataset: str | None, release: str | None, model: str | None, plot: str | None, report: str | None, fmt: str
) -> None:
    """Counts by status and Dice RCA summaries per dataset and release."""
    from chexmask.storage.stats import compute_stats, plot_dice_histograms

    index = _open_index()
    groups = compute_stats(index, dataset=dataset, release=release, model=model)
    if fmt == "json":
        click.echo(json.dumps([g.as_dict() for g in groups], indent=2))
    else:
        click.echo(_stats_table(groups))
    if plot:
        plot_dice_histograms(groups, plot)
        click.echo(f"histograms written to {plot}", err=True)
    if report:
        from chexmask.storage.objectstore import open_store
        from chexmask.storage.report import write_report

        settings = Settings.from_env()
        covered = write_report(index, open_store(settings.store_url, settings.s3_endpoint_url), report, dataset)
        figure = Path(report).with_suffix(".png")
        plot_dice_histograms(groups, figure)
        click.echo(f"quality report of {covered} dataset(s) written to {report}, histograms to {figure}", err=True)


def _stats_table(groups: list[GroupStats]) -> str:
    statuses = [s.value for s in ImageStatus]
    columns = [
        "dataset",
        "release",
        *statuses,
        "segs",
        "metric",
        "n",
        "mean",
        "q05",
        "q25",
        "q50",
        "q75",
        "q95",
        ">=0.7",
    ]
    rows = []
    for g in groups:
        record = g.as_dict()
        base = [g.dataset, g.release or "-", *(str(record["status_counts"][s]) for s in statuses), str(g.segmentations)]
        for metric, summary in (("mean", g.dice_mean), ("max", g.dice_max)):
            numbers = (
                ["-"] * 8
                if summary is None
                else [
                    str(summary.n),
                    *(
                        f"{v:.3f}"
                        for v in (summary.mean, summary.q05, summary.q25, summary.q50, summary.q75, summary.q95)
                    ),
                    f"{summary.frac_good:.1%}",
                ]
            )
            rows.append([*base, metric, *numbers])
    return _table(columns, rows)


@click.command("api")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=int, default=8000, show_default=True)
@click.option(
    "--stow/--no-stow",
    default=True,
    show_default=True,
    help="Also take DICOM over HTTP (STOW-RS, POST /dicomweb/studies): stored and queued like C-STORE.",
)
@click.option("--dataset", help="Dataset of the images posted by STOW-RS (default: generic).")
@click.option("--release", help="Release tag recorded with every image posted by STOW-RS.")
def api_command(host: str, port: int, stow: bool, dataset: str | None, release: str | None) -> None:
    """Serve the HTTP API (OpenAPI docs at /docs) and the web app (at /), and take
    DICOM instances posted by STOW-RS (POST /dicomweb/studies) unless --no-stow.

    With CHEXMASK_API_TOKEN set, every route but /health and the docs needs it:
    programs send "Authorization: Bearer TOKEN"; a browser opens any page once
    with ?token=TOKEN and keeps it in an HttpOnly cookie.
    """
    import uvicorn

    from chexmask.app.api import create_api
    from chexmask.app.pipeline_cli import open_intake

    settings = Settings.from_env()
    if not settings.api_token and not _loopback(host):
        click.echo(
            f"warning: serving on {host} without CHEXMASK_API_TOKEN: anyone who can reach "
            f"port {port} can read every segmentation" + (" and post images" if stow else ""),
            err=True,
        )
    intake = open_intake(settings) if stow else None
    uvicorn.run(create_api(settings, intake, dataset=dataset, release=release), host=host, port=port)


def _loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@click.group("reviews")
def reviews_command() -> None:
    """Expert grades of the masks (made in the web app)."""


@reviews_command.command("export")
@click.option("--out", type=click.Path(dir_okay=False, writable=True), required=True)
@click.option("--dataset", help="Only masks of this dataset.")
def reviews_export(out: str, dataset: str | None) -> None:
    """Write every grade, with its mask's identity and Dice RCA, to a CSV file."""
    from chexmask.storage.reviews import EXPORT_COLUMNS, export_rows

    count = 0
    with open(out, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=EXPORT_COLUMNS, lineterminator="\n")
        writer.writeheader()
        for row in export_rows(_open_index(), dataset):
            writer.writerow(row)
            count += 1
    click.echo(f"wrote {count} reviews to {out}", err=True)


@click.group("db")
def db_command() -> None:
    """Manage the index database schema."""


@db_command.command("upgrade")
@click.option("--revision", default="head", show_default=True)
def db_upgrade(revision: str) -> None:
    """Create or migrate the schema (safe to rerun; never drops data)."""
    index = _open_index(upgraded=False)
    before = index.current_revision()
    index.upgrade(revision)
    click.echo(f"index {mask_url(Settings.from_env().database_url)}")
    click.echo(f"index schema: {before or 'empty'} -> {index.current_revision()}")


@db_command.command("current")
def db_current() -> None:
    """Show the schema revision of the index and the newest one known."""
    index = _open_index(upgraded=False)
    click.echo(f"index {mask_url(Settings.from_env().database_url)}")
    click.echo(f"current: {index.current_revision() or 'empty'}  head: {index.head_revision()}")


@click.command("import-chexmask")
@click.argument("csv_file", type=click.Path(exists=True, dir_okay=False))
@click.option("--dataset", required=True, help="Dataset name or alias the rows belong to.")
@click.option("--release", help="Release tag recorded with every imported image.")
@click.option(
    "--model",
    default="hybridgnet-official",
    show_default=True,
    help="Model version the published masks are stored under.",
)
@click.option(
    "--resolution",
    type=click.Choice([f.value for f in Frame]),
    default="auto",
    show_default=True,
    help="Frame of the masks: auto tells it from the landmark text and Height/Width.",
)
@click.option("--batch-size", type=click.IntRange(min=1), default=BATCH_SIZE, show_default=True)
def import_chexmask_command(
    csv_file: str, dataset: str, release: str | None, model: str, resolution: str, batch_size: int
) -> None:
    """Import a published CheXmask CSV (gzip too) as a model's segmentations.

    Rows are keyed by the dataset's own image id; importing the same file again
    changes nothing, a newer file updates the rows that differ. Bad rows are
    reported with their line numbers and skipped.
    """
    from tqdm import tqdm

    from chexmask.storage.chexmask_import import import_csv

    index = _open_index(upgraded=False)
    index.upgrade()
    with tqdm(desc=f"import {csv_file}", unit=" row", dynamic_ncols=True) as bar:
        report = import_csv(
            index,
            csv_file,
            dataset=dataset,
            release=release,
            model=model,
            weights_sha256=_import_weights(index, model),
            frame=Frame(resolution),
            batch_size=batch_size,
            progress=bar.update,
        )
    for line, reason in report.bad:
        click.echo(f"line {line}: {reason}", err=True)
    if report.skipped > len(report.bad):
        click.echo(f"... and {report.skipped - len(report.bad)} more bad rows", err=True)
    if report.mean_above_max:
        click.echo(
            f"note: {report.mean_above_max} rows have Dice RCA (Mean) > (Max); the official writer "
            "swapped the two columns (SPEC 9.5), they were stored as named",
            err=True,
        )
    frame = report.frame.value if report.frame else "-"
    click.echo(
        f"{report.taken} taken, {report.updated} updated, {report.unchanged} unchanged, "
        f"{report.skipped} skipped (frame {frame}, model {model})"
    )


def _import_weights(index: MaskIndex, model: str) -> str:
    """The weights checksum to register the imported model with: the known one when
    the index has the model or it is the official checkpoint, else a surrogate."""
    import hashlib

    from chexmask.official import OFFICIAL_MODEL, OFFICIAL_WEIGHTS_SHA256

    for known in index.models():
        if known.name == model:
            return known.weights_sha256
    if model == OFFICIAL_MODEL:
        return OFFICIAL_WEIGHTS_SHA256
    return hashlib.sha256(f"chexmask-import:{model}".encode()).hexdigest()
