"""Benchmark the CheXmask import and the scan that follows it, on SQLite and PostgreSQL.

    python -m benchmarks.bench_import --rows 200000 --published-rows 20000 --objects 1000000

1. Import, of two CSVs in the exporter's original-resolution layout:
   - small rows: ``--rows`` synthetic rows of about 4.2 kB (numpy landmark text,
     RLE of ``--rle-runs`` runs per organ); the issue's 20,000 rows/s is for these;
   - published rows: ``--published-rows`` rows whose landmarks, masks and size
     are the reference's original-resolution rows (../shared/reference: MIMIC-CXR
     and VinDr-CXR images through the official scripts, 20-185 kB a row, as the
     published set's rows are) under new ids. From their rate, the time the
     whole published set (657,566 rows) would take; target under an hour.
   Each file is imported, then imported again (every row unchanged). The
   baseline, measured in the same run, is the csv module reading the same file
   and nothing else: each import is also given as a multiple of that time, and
   ``csv_records`` (the import's reader) as a speed-up over it.
2. Scan: a listing of ``--objects`` files of which 1% are new since the import.
   A folder of a million files takes too long to make, so the listing is an
   in-memory list fed through ``ReleaseScanner``'s own paging, triage and
   registration; the index holds the other 99% as imported images. The check
   is that exactly the new ones are queued.

Each backend gets a fresh database for each part, removed afterwards.
"""

from __future__ import annotations

import argparse
import csv
import os
import random
import resource
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from benchmarks.bench_storage import postgres_index, sqlite_index
from chexmask.ingest.queue import Intake
from chexmask.ingest.registry import Registry
from chexmask.ingest.scanner import ReleaseScanner
from chexmask.messages import Arrival
from chexmask.status import ImageStatus
from chexmask.storage.chexmask_csv import open_text
from chexmask.storage.chexmask_import import import_csv, import_sha256, import_uri
from chexmask.storage.csv_records import csv_records
from chexmask.storage.index import MaskIndex
from chexmask.storage.layout import VALUE_COLUMNS, csv_line, numpy_text
from chexmask.storage.models import SourceImage, utcnow

DATASET = "chestx-ray8"
TARGET = 20_000.0  # rows/s, of the small rows
PUBLISHED_ROWS = 657_566  # the published CheXmask set
PUBLISHED_TARGET_S = 3600.0
REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference" / "postprocessing"
REFERENCE_FILES = ("mimic_original_resolution_verbatim.csv", "vindr_original_resolution.csv")


def image_id(i: int) -> str:
    return f"{i // 1000:08d}_{i % 1000:03d}.png"  # the ChestX-ray8 naming


def write_csv(path: Path, rows: int, runs: int, seed: int = 0) -> None:
    """``rows`` rows in the original-resolution layout; texts from small pools, so
    making the file costs little next to importing it."""
    rng = random.Random(seed)
    height, width = 2048, 2500
    pool_rle = [_rle(rng, runs, height * width) for _ in range(16)]
    pool_points = [numpy_text([[rng.randrange(width), rng.randrange(height)] for _ in range(120)]) for _ in range(16)]
    with path.open("w", encoding="utf-8", newline="") as f:
        f.write(csv_line(["Image Index", *VALUE_COLUMNS]))
        for i in range(rows):
            mean = round(rng.uniform(0.5, 0.95), 6)
            f.write(
                csv_line(
                    [
                        image_id(i),
                        mean,
                        round(mean + 0.02, 6),
                        pool_points[i % 16],
                        pool_rle[i % 16],
                        pool_rle[(i + 5) % 16],
                        pool_rle[(i + 9) % 16],
                        height,
                        width,
                    ]
                )
            )


def _rle(rng: random.Random, runs: int, pixels: int) -> str:
    step = pixels // (runs + 1)
    starts = sorted(rng.sample(range(1, pixels - step, step), runs))
    return " ".join(f"{s} {rng.randrange(1, step // 2)}" for s in starts)


def reference_rows(folder: Path = REFERENCE) -> list[list[str]]:
    """The Landmarks, Left Lung, Right Lung, Heart, Height and Width texts of the
    reference's original-resolution rows (empty when ../shared is absent)."""
    csv.field_size_limit(sys.maxsize)
    rows = []
    for name in REFERENCE_FILES:
        if (folder / name).is_file():
            with (folder / name).open(encoding="utf-8", newline="") as f:
                rows += [record[3:9] for record in list(csv.reader(f))[1:]]
    return rows


def write_published_csv(path: Path, rows: int, pool: list[list[str]], seed: int = 0) -> None:
    """``rows`` rows cycling through ``pool``'s real masks, each under its own id."""
    rng = random.Random(seed)
    with path.open("w", encoding="utf-8", newline="") as f:
        f.write(csv_line(["Image Index", *VALUE_COLUMNS]))
        for i in range(rows):
            mean = round(rng.uniform(0.5, 0.95), 6)
            f.write(csv_line([image_id(i), mean, round(mean + 0.02, 6), *pool[i % len(pool)]]))


def read_seconds(path: Path) -> tuple[float, float]:
    """The baseline: seconds for the csv module to read every record of ``path``;
    and the same for ``csv_records``, the import's reader."""
    timings = []
    for records in (lambda handle: csv.reader(handle), csv_records):
        start = time.perf_counter()
        with open_text(path) as handle:
            for _ in records(handle):
                pass
        timings.append(time.perf_counter() - start)
    return timings[0], timings[1]


class ImportCase:
    """A CSV to import and its baseline: the csv module's time to read it alone."""

    def __init__(self, label: str, path: Path, rows: int, published: bool) -> None:
        self.label, self.path, self.rows, self.published = label, path, rows, published
        self.csv_module_s, self.csv_records_s = read_seconds(path)

    def describe(self) -> str:
        size = self.path.stat().st_size
        return (
            f"{self.label}: {self.rows:,} rows of {size / self.rows / 1000:,.1f} kB; baseline, the csv module reading "
            f"it alone: {self.csv_module_s:.1f} s ({size / self.csv_module_s / 1e6:.0f} MB/s); csv_records, the "
            f"import's reader: {self.csv_module_s / self.csv_records_s:.1f}x as fast"
        )

    def verdict(self, rate: float) -> str:
        if not self.published:
            return f"target {TARGET:,.0f} rows/s: {'ok' if rate >= TARGET else 'MISSED'}"
        whole = PUBLISHED_ROWS / rate
        met = "ok" if whole <= PUBLISHED_TARGET_S else "MISSED"
        return f"the published set's {PUBLISHED_ROWS:,} rows in {whole / 60:.1f} min (target 60): {met}"


def bench_import(index: MaskIndex, case: ImportCase) -> list[str]:
    lines, rows = [], case.rows
    for label in ("first import", "re-import (unchanged)"):
        start, cpu, child_cpu = time.perf_counter(), time.process_time(), _children_cpu()
        report = import_csv(index, case.path, dataset=DATASET, model="hybridgnet-official", weights_sha256="b7" * 32)
        wall, cpu, child_cpu = time.perf_counter() - start, time.process_time() - cpu, _children_cpu() - child_cpu
        megabytes = case.path.stat().st_size / wall / 1e6
        lines.append(
            f"  {label}: {rows:,} rows in {wall:.1f} s = {rows / wall:,.0f} rows/s, {megabytes:.0f} MB/s, "
            f"{wall / case.csv_module_s:.2f}x the baseline's time; {case.verdict(rows / wall)}\n"
            f"    CPU per row: {cpu / rows * 1e6:.0f} us writing (this process), {child_cpu / rows * 1e6:.0f} us "
            f"reading and parsing (child process); taken {report.taken:,}, unchanged {report.unchanged:,}, "
            f"skipped {report.skipped}"
        )
    return lines


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)  # children that have ended
    return usage.ru_utime + usage.ru_stime


class ListQueue:
    def __init__(self) -> None:
        self.arrivals: list[Arrival] = []

    def put(self, arrivals: list[Arrival]) -> None:
        self.arrivals += arrivals


class ListingScanner(ReleaseScanner):
    """The scanner with its listing replaced by an in-memory one (same paging)."""

    def __init__(self, intake: Intake, objects: int, **kwargs):
        super().__init__(intake, **kwargs)
        self.objects = objects

    def _list(self, uri: str, start_after: str | None) -> Iterator[tuple[str, Arrival]]:
        for i in range(self.objects):
            key = f"images_{i // 10_000:03d}/{image_id(i)}"
            yield key, Arrival(f"s3://release/{key}", DATASET, image_id(i), None, f"etag{i}", 1000 + i)


def bench_scan(index: MaskIndex, objects: int) -> list[str]:
    """Objects whose number is not a multiple of 100 are in the published set: 1% are new."""
    published = [i for i in range(objects) if i % 100]
    now = utcnow()
    rows = (
        {
            "uri": import_uri(DATASET, image_id(i)),
            "sha256": import_sha256(DATASET, image_id(i)),
            "dataset": DATASET,
            "dataset_image_id": image_id(i),
            "status": ImageStatus.DONE,
            "attempts": 0,
            "first_seen": now,
            "updated_at": now,
        }
        for i in published
    )
    start = time.perf_counter()
    with index.engine.begin() as connection:
        batch: list[dict] = []
        for row in rows:
            batch.append(row)
            if len(batch) == 10_000:
                connection.execute(SourceImage.__table__.insert(), batch)
                batch = []
        if batch:
            connection.execute(SourceImage.__table__.insert(), batch)
    with index.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
        # Planner statistics, as autovacuum would have them for a table loaded long before
        # (fresh from a bulk load, PostgreSQL guesses an empty table and scans it whole).
        connection.exec_driver_sql("ANALYZE")
    setup = time.perf_counter() - start
    queue = ListQueue()
    scanner = ListingScanner(Intake(Registry(index), queue), objects, dataset=DATASET, progress=False)
    start = time.perf_counter()
    counts = scanner.scan("s3://release/")
    wall = time.perf_counter() - start
    expected = {image_id(i) for i in range(0, objects, 100)}
    queued = {a.dataset_image_id for a in queue.arrivals}
    verdict = "exactly the new ones" if queued == expected and len(queue.arrivals) == len(expected) else "WRONG"
    return [
        f"  scan of {objects:,} listed objects ({len(published):,} imported beforehand in {setup:.1f} s): "
        f"{wall:.1f} s = {objects / wall:,.0f} objects/s; new {counts.new:,}, covered "
        f"{counts.covered:,}; queued {len(queue.arrivals):,}: {verdict}"
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200_000, help="small synthetic rows (0: none)")
    parser.add_argument(
        "--published-rows", type=int, default=20_000, help="rows made of the reference's real masks (0: none)"
    )
    parser.add_argument("--objects", type=int, default=1_000_000, help="listed objects to scan (0: no scan)")
    parser.add_argument("--rle-runs", type=int, default=64, help="runs per RLE string of the small rows")
    parser.add_argument("--backends", default="sqlite,postgresql")
    parser.add_argument("--pg-url", default="postgresql+psycopg://postgres@127.0.0.1:5432/test")
    parser.add_argument("--workdir", type=Path)
    args = parser.parse_args(argv)

    csv.field_size_limit(sys.maxsize)  # the published rows' RLE fields run to 100 kB
    load_before = os.getloadavg()[0]
    lines = []
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        cases = []
        if args.rows:
            write_csv(Path(tmp) / "small.csv", args.rows, args.rle_runs)
            cases.append(ImportCase("small rows", Path(tmp) / "small.csv", args.rows, published=False))
        pool = reference_rows() if args.published_rows else []
        if pool:
            write_published_csv(Path(tmp) / "published.csv", args.published_rows, pool)
            cases.append(ImportCase("published rows", Path(tmp) / "published.csv", args.published_rows, True))
        elif args.published_rows:
            lines.append(f"published rows: skipped, no reference CSVs in {REFERENCE}")
        lines += [case.describe() for case in cases]
        print("\n".join(lines), flush=True)
        for backend in (b.strip() for b in args.backends.split(",")):
            parts = [(f"import, {case.label}", case) for case in cases] + [("scan", None)] * bool(args.objects)
            for part, case in parts:  # a fresh database for each
                workdir = Path(tmp) / f"{backend}-{len(lines)}"
                workdir.mkdir()
                opened = sqlite_index(workdir) if backend == "sqlite" else postgres_index(args.pg_url)
                with opened as index:
                    index.upgrade()
                    result = bench_import(index, case) if case else bench_scan(index, args.objects)
                lines += [f"{backend} {part}:", *result]
                print("\n".join(lines[-len(result) - 1 :]), flush=True)
    print(
        f"machine: {os.cpu_count()} CPUs, 1-min load average {load_before:.1f} at start, "
        f"{os.getloadavg()[0]:.1f} at end"
    )
    print("\n".join(lines))


if __name__ == "__main__":
    main()
