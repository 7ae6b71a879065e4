"""End to end with no server at all: ``chexmask serve --once`` (SQLite index, folder
store, no broker), and a Celery worker on the embedded SQLite broker.

Slow: each run starts torch and loads the model; each real image is a forward
pass of a few seconds on a CPU.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from chexmask.status import ImageStatus
from chexmask.storage.index import MaskIndex
from chexmask.storage.queries import QueryFilters
from test_e2e_celery import CORRUPT_PNG, Process, wait_for

pytestmark = pytest.mark.slow


def embedded_env(home: Path, weights: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHEXMASK_")}
    return {**env, "CHEXMASK_HOME": str(home), "CHEXMASK_WEIGHTS": str(weights), "PYTHONUNBUFFERED": "1"}


def chexmask(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "chexmask.app.cli", *args], env=env, capture_output=True,
                          text=True, timeout=600)


def test_serve_once(tmp_path, random_weights, samples_dir):
    home, inbox = tmp_path / "home", tmp_path / "inbox"
    env = embedded_env(home, random_weights)
    # An image a previous run registered but never finished (a scan queued it, then the
    # process died): serve takes it up from the index.
    earlier = tmp_path / "earlier" / "covid-19-pneumonia-58-prior.jpg"
    earlier.parent.mkdir()
    earlier.write_bytes((samples_dir / earlier.name).read_bytes())
    scan = subprocess.run([sys.executable, "-c", "from chexmask.app.pipeline_cli import scan_command; scan_command()",
                           str(earlier.parent)], env=env, capture_output=True, text=True, timeout=300)
    assert "1 new" in scan.stdout, scan.stderr

    (inbox / "images_001").mkdir(parents=True)
    (inbox / "images_001" / "00000001_000.png").write_bytes((samples_dir / "00000001_000.png").read_bytes())
    (inbox / "corrupt.png").write_bytes(CORRUPT_PNG)
    (inbox / ".hidden.png").write_bytes(CORRUPT_PNG)
    (inbox / "copy.png.part").write_bytes(CORRUPT_PNG)

    run = chexmask(["serve", "--inbox", str(inbox), "--once"], env)
    assert run.returncode == 0, run.stdout + run.stderr
    lines = run.stdout.splitlines()
    assert any(line.startswith("[") and "segmented 00000001_000.png" in line for line in lines), run.stdout
    assert any("segmented covid-19-pneumonia-58-prior.jpg" in line for line in lines), run.stdout
    assert any(re.search(r"refused   corrupt\.png  \w+: \w", line) for line in lines), run.stdout
    assert lines[-1].startswith("1 refused, 2 segmented in")

    index = MaskIndex(f"sqlite:///{home / 'index.db'}")
    try:
        images = {Path(i.uri).name: i for i in index.images()}
        assert set(images) == {"00000001_000.png", "corrupt.png", "covid-19-pneumonia-58-prior.jpg"}
        assert images["corrupt.png"].status is ImageStatus.REFUSED and images["corrupt.png"].reason
        assert images["00000001_000.png"].dataset == "chestx-ray8"
        rows = index.query(QueryFilters(status=ImageStatus.DONE))
        assert len(rows) == 2
        for row in rows:
            segmentation = index.get_segmentation(row.id)
            for key in segmentation.object_keys.values():
                assert (home / "store" / key).is_file(), key
            record = json.loads((home / "store" / segmentation.object_keys["record"]).read_text())
            assert record["sha256"] == images[Path(row.uri).name].sha256
            assert segmentation.qc_status != "pending"
    finally:
        index.close()

    again = chexmask(["serve", "--inbox", str(inbox), "--once"], env)
    assert again.returncode == 0 and again.stdout.splitlines()[-1].startswith("nothing to do, 2 unchanged"), again.stdout


def test_worker_with_periodic_scans_on_the_embedded_sqlite_broker(tmp_path, random_weights, samples_dir):
    """``chexmask worker --beat`` alone on a fresh home: it creates the index, beat
    scans CHEXMASK_SCAN_PREFIXES, and the tasks travel through the SQLite broker."""
    home, release = tmp_path / "home", tmp_path / "release"
    release.mkdir()
    (release / "00000001_000.png").write_bytes((samples_dir / "00000001_000.png").read_bytes())
    (release / "corrupt.png").write_bytes(CORRUPT_PNG)
    env = {**embedded_env(home, random_weights), "CHEXMASK_SCAN_PREFIXES": f"{release} nih test",
           "CHEXMASK_SCAN_INTERVAL": "2"}

    worker = Process.cli(["worker", "--concurrency", "2", "--beat"], env, tmp_path / "worker.log")
    try:
        worker.wait_output(" ready.")
        index = MaskIndex(f"sqlite:///{home / 'index.db'}")
        try:
            def finished():
                images = index.images()
                return len(images) == 2 and all(i.status.final for i in images) and images
            images = {Path(i.uri).name: i for i in wait_for("both images final", finished)}
            assert images["00000001_000.png"].status is ImageStatus.DONE
            assert images["corrupt.png"].status is ImageStatus.REFUSED
            assert {(i.dataset, i.release) for i in images.values()} == {("chestx-ray8", "test")}
            assert len(index.query(QueryFilters(release="test"))) == 1
            wait_for("a later scan", lambda: worker.output().count("'seen': 2, 'new': 0") >= 1, timeout=60)
        finally:
            index.close()
    finally:
        assert worker.stop() == 0, worker.output()[-3000:]
    assert (home / "broker.db").is_file()


def test_serve_watches_until_stopped(tmp_path, random_weights, samples_dir):
    home, inbox = tmp_path / "home", tmp_path / "inbox"
    server = Process.cli(["serve", "--inbox", str(inbox)], embedded_env(home, random_weights), tmp_path / "serve.log")
    try:
        server.wait_output("watching")
        partial = inbox / ".00000001_000.png.part"  # as a copy tool writes: aside, then renamed
        partial.write_bytes((samples_dir / "00000001_000.png").read_bytes())
        partial.rename(inbox / "00000001_000.png")
        server.wait_output("[1] segmented 00000001_000.png")
    finally:
        assert server.stop() == 0, server.output()
    assert server.output().splitlines()[-1].startswith("1 segmented in")
