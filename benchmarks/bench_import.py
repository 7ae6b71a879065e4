"""Benchmark the CheXmask import and the scan that follows it, on SQLite and PostgreSQL.

    python -m benchmarks.bench_import --rows 200000 --objects 1000000

1. Import: a synthetic original-resolution CheXmask CSV of ``--rows`` rows, written
   with the exporter's layout (numpy landmark text, RLE of ``--rle-runs`` runs per
   organ), imported through ``import_csv`` (parse and check, batched driver-level
   writes in a second thread); then
   imported again (every row unchanged). Target: 20,000 rows/s.
2. Scan: a listing of ``--objects`` files of which 1% are new since the import.
   A folder of a million files takes too long to make, so the listing is an
   in-memory list fed through ``ReleaseScanner``'s own paging, triage and
   registration; the index holds the other 99% as imported images. The check
   is that exactly the new ones are queued.

Each backend gets a fresh database, removed afterwards.
"""

from __future__ import annotations

import argparse
import os
import random
import resource
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
from chexmask.storage.chexmask_import import import_csv, import_sha256, import_uri
from chexmask.storage.index import MaskIndex
from chexmask.storage.layout import VALUE_COLUMNS, csv_line, numpy_text
from chexmask.storage.models import SourceImage, utcnow

DATASET = "chestx-ray8"
TARGET = 20_000.0


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


def bench_import(index: MaskIndex, csv_path: Path, rows: int) -> list[str]:
    lines = []
    for label in ("first import", "re-import (unchanged)"):
        start, cpu, child_cpu = time.perf_counter(), time.process_time(), _children_cpu()
        report = import_csv(index, csv_path, dataset=DATASET, model="hybridgnet-official", weights_sha256="b7" * 32)
        wall, cpu, child_cpu = time.perf_counter() - start, time.process_time() - cpu, _children_cpu() - child_cpu
        verdict = "ok" if rows / wall >= TARGET else "MISSED"
        lines.append(
            f"  {label}: {rows:,} rows in {wall:.1f} s = {rows / wall:,.0f} rows/s  {verdict}\n"
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
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--objects", type=int, default=1_000_000)
    parser.add_argument(
        "--rle-runs", type=int, default=64, help="runs per synthetic RLE string (real lungs at 2048 px: ~1500)"
    )
    parser.add_argument("--backends", default="sqlite,postgresql")
    parser.add_argument("--pg-url", default="postgresql+psycopg://postgres@127.0.0.1:5432/test")
    parser.add_argument("--workdir", type=Path)
    args = parser.parse_args(argv)

    load_before = os.getloadavg()[0]
    lines = []
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        csv_path = Path(tmp) / "chexmask.csv"
        write_csv(csv_path, args.rows, args.rle_runs)
        lines.append(f"CSV: {args.rows:,} rows, {csv_path.stat().st_size / args.rows:,.0f} bytes/row")
        for backend in (b.strip() for b in args.backends.split(",")):
            for part in ("import", "scan"):  # a fresh database for each
                workdir = Path(tmp) / f"{backend}-{part}"
                workdir.mkdir()
                opened = sqlite_index(workdir) if backend == "sqlite" else postgres_index(args.pg_url)
                with opened as index:
                    index.upgrade()
                    result = (
                        bench_import(index, csv_path, args.rows)
                        if part == "import"
                        else bench_scan(index, args.objects)
                    )
                lines += [f"{backend} {part}:", *result]
                print("\n".join(lines[-len(result) - 1 :]), flush=True)
    print(
        f"machine: {os.cpu_count()} CPUs, 1-min load average {load_before:.1f} at start, "
        f"{os.getloadavg()[0]:.1f} at end"
    )
    print("\n".join(lines))


if __name__ == "__main__":
    main()
