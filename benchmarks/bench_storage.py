"""Benchmark the index: bulk-load synthetic segmentations, time the common queries
and the export, on SQLite and PostgreSQL.

    python -m benchmarks.bench_storage --rows 1000000

Targets: p95 <= 50 ms per query page, export >= 20,000 rows/s. Queries go
through the public ``MaskIndex``/``export`` API, so the numbers include the ORM
and row-building cost a caller pays. Each backend gets a fresh database
(a temp SQLite file, a new PostgreSQL database) that is removed afterwards.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from chexmask.status import ImageStatus
from chexmask.storage.engine import engine_url, json_dumps
from chexmask.storage.export import export
from chexmask.storage.index import MaskIndex
from chexmask.storage.layout import numpy_text
from chexmask.storage.models import Segmentation, SourceImage
from chexmask.storage.queries import QueryFilters

DATASETS = ("chestx-ray8", "chexpert", "mimic-cxr-jpg", "padchest", "vindr-cxr")
MODEL = "hybridgnet-bench"
WEIGHTS = "0" * 64
CHUNK = 5000
P95_TARGET_MS = 50.0
EXPORT_TARGET = 20_000.0
# Images without a segmentation, in the other states, as a fraction of --rows.
OTHER_STATUSES = (ImageStatus.QUEUED, ImageStatus.PROCESSING, ImageStatus.REFUSED, ImageStatus.FAILED)
EXTRA_IMAGES = 0.05


@dataclass
class Result:
    backend: str
    rows: int
    load_s: float
    latencies_ms: dict[str, list[float]]
    exports: dict[str, tuple[int, float, float]]  # resolution -> rows, wall s, CPU s
    bytes_per_row: float


# --- synthetic data -------------------------------------------------------------------


class Synth:
    """Deterministic fake rows. Landmark and RLE texts come from small pools so that
    generating a million rows costs little next to inserting them."""

    def __init__(self, rle_runs: int, seed: int = 0):
        rng = random.Random(seed)
        self.rng = rng
        points = [[[rng.randrange(2048), rng.randrange(2048)] for _ in range(120)] for _ in range(500)]
        self.landmarks = [json_dumps(p) for p in points]
        self.landmarks_text = [numpy_text(p) for p in points]
        self.rles = [_rle(rng, rle_runs) for _ in range(200)]
        self.now = datetime.now(timezone.utc)

    def dice(self) -> tuple[float, float]:
        mean = min(1.0, max(0.0, self.rng.betavariate(12, 2)))  # ~90% >= 0.7, like CheXmask
        return mean, min(1.0, mean + self.rng.random() * 0.05)

    def image(self, i: int, status: ImageStatus) -> dict[str, Any]:
        dataset = DATASETS[i % len(DATASETS)]
        seen = self.now - timedelta(seconds=i)
        return {
            "id": i + 1,
            "uri": f"s3://bench/{dataset}/{i:08d}.png",
            "etag_or_version": f"e{i}",
            "sha256": _sha(i),
            "size": 500_000 + i % 1000,
            "dataset": dataset,
            "release": f"r{i % 3}",
            "dataset_image_id": f"{dataset}_{i:08d}.png",
            "height": 2048,
            "width": 2048,
            "modality": "CR",
            "view_position": "PA",
            "first_seen": seen,
            "updated_at": seen,
            "status": status.value,
            "refusal_code": "wrong_modality" if status is ImageStatus.REFUSED else None,
            "reason": None,
            "attempts": 1,
            "lease_owner": None,
            "lease_expires_at": None,
            "retry_at": None,
            "failing_since": None,
        }

    def segmentation(self, i: int) -> dict[str, Any]:
        mean, max_ = self.dice()
        rle = self.rles
        return {
            "id": i + 1,
            "image_id": i + 1,
            "image_sha256": _sha(i),
            "dataset": DATASETS[i % len(DATASETS)],
            "is_current": True,
            "model_version": MODEL,
            "weights_sha256": WEIGHTS,
            "pipeline_version": "1",
            "landmarks_1024": self.landmarks[i % 500],
            "landmarks_original": self.landmarks[(i + 7) % 500],
            "landmarks_original_str": self.landmarks_text[(i + 7) % 500],
            "latent": None,
            "height": 2048,
            "width": 2048,
            "rle_right_lung": rle[i % 200],
            "rle_left_lung": rle[(i + 1) % 200],
            "rle_heart": rle[(i + 2) % 200],
            "rle_right_lung_1024": rle[(i + 3) % 200],
            "rle_left_lung_1024": rle[(i + 4) % 200],
            "rle_heart_1024": rle[(i + 5) % 200],
            "dice_rca_max": max_,
            "dice_rca_mean": mean,
            "dice_rca_max_rl": max_,
            "dice_rca_max_ll": max_,
            "dice_rca_max_h": max_,
            "dice_rca_mean_rl": mean,
            "dice_rca_mean_ll": mean,
            "dice_rca_mean_h": mean,
            "qc_status": "done",
            "qc_flags": None,
            "qc_reason": None,
            "shape_outlier_score": None,
            "qc_lease_owner": None,
            "qc_lease_expires_at": None,
            "object_keys": "{}",
            "timings": None,
            "created_at": self.now - timedelta(seconds=i),
        }


def _sha(i: int) -> str:
    return hashlib.sha256(i.to_bytes(8, "little")).hexdigest()


def _rle(rng: random.Random, runs: int) -> str:
    start, pairs = rng.randrange(1, 5000), []
    for _ in range(runs):
        length = rng.randrange(50, 400)
        pairs.append(f"{start} {length}")
        start += length + rng.randrange(600, 1000)
    return " ".join(pairs)


# --- loading --------------------------------------------------------------------------


def load(index: MaskIndex, synth: Synth, rows: int) -> None:
    """Bulk-insert ``rows`` segmented images plus some images in other states."""
    index.register_model(MODEL, WEIGHTS, "synthetic rows for the benchmark")
    extra = int(rows * EXTRA_IMAGES)
    images = (synth.image(i, ImageStatus.DONE if i < rows else OTHER_STATUSES[i % 4]) for i in range(rows + extra))
    segmentations = (synth.segmentation(i) for i in range(rows))
    insert = _copy_rows if index.dialect == "postgresql" else _executemany_rows
    insert(index, SourceImage.__table__, images)
    insert(index, Segmentation.__table__, segmentations)
    with index.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
        if index.dialect == "postgresql":
            for table in ("source_image", "segmentation"):  # ids were given, not drawn
                connection.exec_driver_sql(f"SELECT setval('{table}_id_seq', (SELECT max(id) FROM {table}))")
            connection.exec_driver_sql("VACUUM ANALYZE")
        else:
            connection.exec_driver_sql("ANALYZE")


def _chunks(rows: Iterator[dict[str, Any]]) -> Iterator[list[dict[str, Any]]]:
    chunk: list[dict[str, Any]] = []
    for row in rows:
        chunk.append(row)
        if len(chunk) == CHUNK:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _copy_rows(index: MaskIndex, table: sa.Table, rows: Iterator[dict[str, Any]]) -> None:
    """PostgreSQL COPY: the fastest bulk path (JSON columns take their text as is).
    Columns a synthetic row leaves out (measurements, uncertainty) are NULL."""
    columns = [c.name for c in table.columns]
    raw = index.engine.raw_connection()
    try:
        with raw.cursor() as cursor, cursor.copy(f"COPY {table.name} ({', '.join(columns)}) FROM STDIN") as copy:
            for row in rows:
                copy.write_row([row.get(c) for c in columns])
        raw.commit()
    finally:
        raw.close()


def _executemany_rows(index: MaskIndex, table: sa.Table, rows: Iterator[dict[str, Any]]) -> None:
    """SQLite: one prepared INSERT, executemany per chunk, one transaction."""
    columns = [c.name for c in table.columns]
    sql = f"INSERT INTO {table.name} ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})"
    raw = index.engine.raw_connection()
    try:
        cursor = raw.cursor()
        for chunk in _chunks(rows):
            cursor.executemany(sql, [[_sqlite_value(row.get(c)) for c in columns] for row in chunk])
        raw.commit()
    finally:
        raw.close()


def _sqlite_value(value: Any) -> Any:
    # The stored form of UTCDateTime on SQLite (see models.UTCDateTime).
    return value.strftime("%Y-%m-%d %H:%M:%S.%f") if isinstance(value, datetime) else value


# --- measuring ------------------------------------------------------------------------


def queries(rows: int, rng: random.Random) -> dict[str, Callable[[MaskIndex], Any]]:
    """The common queries, each drawing fresh parameters per call."""
    pages = [100 * k for k in range(10)]

    def dataset_dice(index: MaskIndex) -> Any:
        filters = QueryFilters(dataset=rng.choice(DATASETS), min_dice_mean=0.7)
        return index.query(filters, sort="-dice_rca_mean", limit=100, offset=rng.choice(pages))

    def dataset_dice_by_id(index: MaskIndex) -> Any:
        filters = QueryFilters(dataset=rng.choice(DATASETS), min_dice_mean=0.7)
        return index.query(filters, sort="id", limit=100, offset=rng.choice(pages))

    def model_dice(index: MaskIndex) -> Any:
        return index.query(
            QueryFilters(model=MODEL, min_dice_mean=0.7), sort="-dice_rca_mean", limit=100, offset=rng.choice(pages)
        )

    def by_status(index: MaskIndex) -> Any:
        status = rng.choice((ImageStatus.DONE, *OTHER_STATUSES))
        return index.images(QueryFilters(status=status), limit=100, offset=rng.choice(pages))

    def by_image_id(index: MaskIndex) -> Any:
        i = rng.randrange(rows)
        found = index.query(QueryFilters(id_pattern=f"{DATASETS[i % len(DATASETS)]}_{i:08d}.png"))
        assert len(found) == 1, found
        return found

    def by_id_prefix(index: MaskIndex) -> Any:
        i = rng.randrange(rows)
        return index.query(QueryFilters(id_pattern=f"{DATASETS[i % len(DATASETS)]}_{i // 100:06d}*"), limit=100)

    return {
        "dataset + dice>=0.7, by dice desc": dataset_dice,
        "dataset + dice>=0.7, by id": dataset_dice_by_id,
        "model + dice>=0.7, by dice desc": model_dice,
        "images by status": by_status,
        "by dataset image id": by_image_id,
        "by id glob prefix": by_id_prefix,
    }


def time_queries(index: MaskIndex, rows: int, repeats: int) -> dict[str, list[float]]:
    latencies: dict[str, list[float]] = {}
    for name, run in queries(rows, random.Random(1)).items():
        for _ in range(3):  # warm the statement caches and the connection pool
            run(index)
        samples = []
        for _ in range(repeats):
            start = time.perf_counter()
            run(index)
            samples.append((time.perf_counter() - start) * 1000)
        latencies[name] = samples
    return latencies


def time_exports(index: MaskIndex, workdir: Path) -> dict[str, tuple[int, float, float]]:
    """One dataset exported at each resolution: rows, wall seconds and the CPU seconds
    of this process (the figure least disturbed by other load on the machine)."""
    timings = {}
    for resolution in ("original", "1024"):
        wall, cpu = time.perf_counter(), time.process_time()
        count = export(index, workdir / "export.csv", dataset=DATASETS[0], resolution=resolution)
        timings[resolution] = (count, time.perf_counter() - wall, time.process_time() - cpu)
    return timings


# --- backends -------------------------------------------------------------------------


@contextmanager
def sqlite_index(workdir: Path) -> Iterator[MaskIndex]:
    index = MaskIndex(f"sqlite:///{workdir / 'bench.db'}")
    try:
        yield index
    finally:
        index.close()


@contextmanager
def postgres_index(admin_url: str) -> Iterator[MaskIndex]:
    url = sa.make_url(engine_url(admin_url))
    name = f"chexmask_bench_{uuid.uuid4().hex[:10]}"
    admin = sa.create_engine(url, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.exec_driver_sql(f'CREATE DATABASE "{name}"')
    index = MaskIndex(url.set(database=name).render_as_string(hide_password=False))
    try:
        yield index
    finally:
        index.close()
        with admin.connect() as connection:
            connection.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.dispose()


def database_bytes(index: MaskIndex, workdir: Path) -> int:
    if index.dialect == "postgresql":
        with index.engine.connect() as connection:
            return int(connection.exec_driver_sql("SELECT pg_database_size(current_database())").scalar())
    return sum(p.stat().st_size for p in workdir.glob("bench.db*"))


def run_backend(backend: str, args: argparse.Namespace, workdir: Path) -> Result:
    opened = sqlite_index(workdir) if backend == "sqlite" else postgres_index(args.pg_url)
    with opened as index:
        index.upgrade()
        start = time.perf_counter()
        load(index, Synth(args.rle_runs), args.rows)
        load_s = time.perf_counter() - start
        print(f"[{backend}] loaded {args.rows:,} segmentations in {load_s:.1f} s", flush=True)
        latencies = time_queries(index, args.rows, args.repeats)
        exports = time_exports(index, workdir)
        size = database_bytes(index, workdir)
    return Result(backend, args.rows, load_s, latencies, exports, size / args.rows)


def report(results: list[Result]) -> str:
    lines = []
    for r in results:
        lines.append(
            f"\n{r.backend}: {r.rows:,} segmentations, load {r.load_s:.1f} s "
            f"({r.rows / r.load_s:,.0f} rows/s), {r.bytes_per_row:,.0f} bytes/row on disk"
        )
        lines.append(f"  {'query (page of 100)':<38}{'p50 ms':>9}{'p95 ms':>9}{'max ms':>9}  target")
        for name, samples in r.latencies_ms.items():
            p50 = statistics.median(samples)
            p95 = statistics.quantiles(samples, n=20)[-1]
            verdict = "ok" if p95 <= P95_TARGET_MS else "MISSED"
            lines.append(f"  {name:<38}{p50:>9.2f}{p95:>9.2f}{max(samples):>9.2f}  {verdict}")
        for resolution, (count, wall, cpu) in r.exports.items():
            verdict = "ok" if count / wall >= EXPORT_TARGET else "MISSED"
            lines.append(
                f"  export {count:,} rows at {resolution} resolution (CSV): {wall:.1f} s, "
                f"{count / wall:,.0f} rows/s ({count / cpu:,.0f} per CPU second)  {verdict}"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000, help="segmentations to load")
    parser.add_argument("--backends", default="sqlite,postgresql")
    parser.add_argument(
        "--pg-url",
        default="postgresql+psycopg://postgres@127.0.0.1:5432/test",
        help="a server where a scratch database may be created",
    )
    parser.add_argument("--repeats", type=int, default=200, help="timed calls per query")
    parser.add_argument(
        "--rle-runs", type=int, default=64, help="runs per synthetic RLE string (real lungs at 2048 px: ~1500)"
    )
    parser.add_argument("--workdir", type=Path, help="where the SQLite file and export go")
    args = parser.parse_args(argv)

    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        results = [run_backend(b.strip(), args, Path(tmp)) for b in args.backends.split(",")]
    # Other work on the machine slows every number here; say how busy it was.
    print(
        f"machine: {os.cpu_count()} CPUs, 1-min load average {load_before:.1f} at start, "
        f"{os.getloadavg()[0]:.1f} at end"
    )
    print(report(results))


if __name__ == "__main__":
    main()
