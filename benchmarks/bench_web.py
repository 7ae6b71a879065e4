"""Benchmark the web app: server time of the gallery and image pages over a large
index, and the round trips of grading one mask by keyboard.

    python -m benchmarks.bench_web --rows 1000000

Rows come from bench_storage's synthetic loader. Pages are fetched through the
real FastAPI app (TestClient, no network), so the times are the server's: SQL,
templates and all. Targets: p95 <= 150 ms per page; >= 20 graded masks per minute
(the round trips per grade are counted; their server time is measured).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from fastapi.testclient import TestClient

from benchmarks.bench_storage import Synth, load, postgres_index, sqlite_index
from chexmask.config import Settings, mask_url
from chexmask.storage.api import create_app
from chexmask.storage.index import MaskIndex
from chexmask.storage.models import Segmentation

P95_TARGET_MS = 150.0
GRADES_TARGET = 20.0  # masks per minute
# A reviewer's own time per mask (look, press a digit and Enter): what is left of a
# minute after it bounds the server's share.
REVIEWER_SECONDS = 2.0


def timed(client: TestClient, paths: Callable[[], str], repeats: int) -> list[float]:
    samples = []
    for _ in range(repeats):
        path = paths()
        start = time.perf_counter()
        response = client.get(path)
        samples.append((time.perf_counter() - start) * 1000)
        assert response.status_code == 200, (path, response.status_code, response.text[:200])
    return samples


def page_paths(rows: int, rng: random.Random) -> dict[str, Callable[[], str]]:
    deep = lambda: rng.randrange(1, rows)  # noqa: E731 - a cursor anywhere in the set
    return {
        "gallery, worst Dice first (page 1)": lambda: "/?sort=dice_rca_mean",
        "gallery, a dataset, worst first": lambda: "/?dataset=padchest&sort=dice_rca_mean",
        "gallery, deep keyset page": lambda: f"/?sort=dice_rca_mean&after={deep()}",
        "gallery, Dice 0.5-0.7, newest first": lambda: "/?min_dice_mean=0.5&max_dice_mean=0.7&sort=-created_at",
        "gallery, rare Dice < 0.45, newest first": lambda: "/?max_dice_mean=0.45&sort=-created_at",
        "gallery, a dataset, Dice >= 0.7, oldest first": lambda: "/?dataset=vindr&min_dice_mean=0.7&sort=created_at",
        "gallery, Dice 0.5-0.7, deep newest-first page": lambda: (
            f"/?min_dice_mean=0.5&max_dice_mean=0.7&sort=-created_at&after={deep()}"
        ),
        "image page (with prev/next)": lambda: f"/image/{deep()}?sort=dice_rca_mean",
        "image page in a dataset filter": lambda: f"/image/{deep()}?dataset=chexpert&sort=-dice_rca_mean",
    }


def grading_rounds(client: TestClient, reviewer: str, masks: int) -> list[float]:
    """Grade ``masks`` masks from the queue as the keyboard flow does; server seconds per mask.

    Per mask the browser makes ROUND_TRIPS requests: the POST of the grade, the GET of
    the next queue page it is redirected to, and that page's overlay image (not in
    the store for synthetic rows, so not timed here; it is one streamed object).
    """
    page = client.get("/queue?order=worst").text
    times = []
    for _ in range(masks):
        seg_id = int(page.split('action="/review/', 1)[1].split('"', 1)[0])
        start = time.perf_counter()
        response = client.post(
            f"/review/{seg_id}",
            data={"reviewer": reviewer, "overall": "4", "next": "/queue?order=worst"},
            follow_redirects=False,
        )
        following = client.get(response.headers["location"])
        times.append(time.perf_counter() - start)
        assert response.status_code == 303 and following.status_code == 200
        page = following.text
    return times


ROUND_TRIPS = 3


def run_backend(backend: str, args: argparse.Namespace, workdir: Path) -> list[str]:
    if args.database:
        opened: Any = contextlib.closing(MaskIndex(args.database))
    else:
        opened = sqlite_index(workdir) if backend == "sqlite" else postgres_index(args.pg_url)
    lines = []
    with opened as index:
        index.upgrade()
        start = time.perf_counter()
        if args.database:
            with index.engine.connect() as connection:
                rows = connection.execute(sa.select(sa.func.max(Segmentation.id))).scalar() or 0
            lines.append(f"\n{index.dialect} ({mask_url(args.database)}): {rows:,} segmentations, as found")
        else:
            rows = args.rows
            load(index, Synth(16), rows)
            lines.append(f"\n{backend}: {rows:,} segmentations (loaded in {time.perf_counter() - start:.0f} s)")
        settings = Settings(
            database_url=index.engine.url.render_as_string(hide_password=False),
            store_url=(workdir / "store").as_uri(),
            home=workdir,
        )
        with TestClient(create_app(settings)) as client:
            client.cookies.set("chexmask_reviewer", "bench")
            rng = random.Random(1)
            lines.append(f"  {'page':<48}{'p50 ms':>9}{'p95 ms':>9}  target {P95_TARGET_MS:.0f} ms")
            for name, paths in page_paths(rows, rng).items():
                timed(client, paths, 3)  # warm caches and the connection pool
                samples = timed(client, paths, args.repeats)
                p95 = statistics.quantiles(samples, n=20)[-1]
                verdict = "ok" if p95 <= P95_TARGET_MS else "MISSED"
                lines.append(f"  {name:<48}{statistics.median(samples):>9.1f}{p95:>9.1f}  {verdict}")
            rounds = grading_rounds(client, "bench", args.grades)
            trips = ROUND_TRIPS
            server_s = statistics.median(rounds)
            per_minute = 60 / (REVIEWER_SECONDS + server_s)
            verdict = "ok" if per_minute >= GRADES_TARGET else "MISSED"
            lines.append(
                f"  grading by keyboard: {trips} round trips per mask, {server_s * 1000:.0f} ms server "
                f"time (median of {len(rounds)}); with {REVIEWER_SECONDS:.0f} s of reviewer time per mask "
                f"{per_minute:.1f} masks/minute  {verdict}"
            )
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--backends", default="sqlite,postgresql")
    parser.add_argument("--pg-url", default="postgresql+psycopg://postgres@127.0.0.1:5432/test")
    parser.add_argument("--repeats", type=int, default=60, help="timed requests per page kind")
    parser.add_argument("--grades", type=int, default=20, help="masks graded through the queue")
    parser.add_argument("--workdir", type=Path)
    parser.add_argument(
        "--database",
        help="benchmark this existing index (e.g. one bench_storage filled) instead of loading a new one",
    )
    args = parser.parse_args(argv)
    load_before = os.getloadavg()[0]
    lines = []
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        for backend in [""] if args.database else args.backends.split(","):
            lines += run_backend(backend.strip(), args, Path(tmp))
            print("\n".join(lines[-8:]), flush=True)
    print(
        f"machine: {os.cpu_count()} CPUs, 1-min load average {load_before:.1f} at start, "
        f"{os.getloadavg()[0]:.1f} at end"
    )
    print("\n".join(lines))


if __name__ == "__main__":
    main()
