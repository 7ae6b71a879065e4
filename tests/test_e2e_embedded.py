"""End to end with no server at all: ``chexmask serve --once`` (SQLite index, folder
store, no broker), and Celery workers on the embedded SQLite broker.

The first two tests are the product path (what ``make run`` runs, and a worker's
ingest -> segment -> QC chain) with the bundled default weights; they are in the
default suite. Each starts torch and loads the model in a subprocess, and each real
image is a forward pass of a few seconds on a CPU, so the other tests are slow.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from test_e2e_celery import CORRUPT_PNG, Process, wait_for

from chexmask.config import Settings
from chexmask.ingest.queue import CeleryQueue, Intake
from chexmask.ingest.registry import Registry
from chexmask.messages import Arrival
from chexmask.status import ImageStatus, QCStatus
from chexmask.storage.index import MaskIndex
from chexmask.storage.queries import QueryFilters
from chexmask.worker.celery_app import create_app

# One real image of each format the product reads.
PNG, JPEG, DICOM = "00000001_000.png", "16747_3_1.jpg", "siim_cr_jpeg_baseline_mono2.dcm"
ARTEFACTS = {"record", "masks", "right_lung", "left_lung", "heart", "overlay", "picture"}


def embedded_env(home: Path, weights: Path | None = None) -> dict[str, str]:
    """The environment of a fresh embedded install: no CHEXMASK_* but the home (and the
    weights when given; otherwise the bundled default model)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHEXMASK_")}
    env = {**env, "CHEXMASK_HOME": str(home), "PYTHONUNBUFFERED": "1"}
    return {**env, "CHEXMASK_WEIGHTS": str(weights)} if weights else env


def chexmask(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "chexmask.app.cli", *args], env=env, capture_output=True, text=True, timeout=600
    )


def bundled_model() -> str:
    """The model version of the default weights shipped in chexmask/weights, run
    re-framed as by default: their name, "-reframed" and the first 12 hex digits of
    their sha256, as the manifest lists them."""
    import chexmask

    manifest = json.loads((Path(chexmask.__file__).parent / "weights" / "manifest.json").read_text())
    return f"{manifest['name']}-reframed-{manifest['sha256'][:12]}"


def check_stored(home: Path, index: MaskIndex, image) -> int:
    """A done image has one segmentation by the bundled model, all its objects in the
    store under CHEXMASK_HOME, and QC recorded (skipped without a reference bank)."""
    [row] = [r for r in index.query(QueryFilters(status=ImageStatus.DONE)) if r.uri == image.uri]
    segmentation = index.get_segmentation(row.id)
    assert segmentation.image_id == image.id and segmentation.model_version == bundled_model()
    dicom = {"seg", "sr"} if image.uri.endswith(".dcm") else set()  # SEG and SR (written after QC)
    assert set(segmentation.object_keys) == ARTEFACTS | dicom
    stored = {name: home / "store" / key for name, key in segmentation.object_keys.items()}
    for name, path in stored.items():
        assert path.is_file() and path.stat().st_size > 0, name
    record = json.loads(stored["record"].read_text())
    assert record["sha256"] == image.sha256 == segmentation.image_sha256
    assert len(record["landmarks_original"]) == 120
    masks = json.loads(stored["masks"].read_text())
    assert masks["rle"] == segmentation.rle() and masks["rle_1024"] == segmentation.rle("1024")
    for organ in ("right_lung", "left_lung", "heart"):
        mask = cv2.imread(str(stored[organ]), cv2.IMREAD_GRAYSCALE)
        assert mask.shape == (image.height, image.width) and np.count_nonzero(mask), organ
    assert stored["overlay"].read_bytes().startswith(b"\xff\xd8")  # JPEG
    # QC ran: scores with a reference bank, otherwise skipped with the plausibility flags.
    assert segmentation.qc_status in (QCStatus.DONE, QCStatus.SKIPPED)
    if segmentation.qc_status is QCStatus.DONE:
        assert 0 <= segmentation.dice_rca_mean <= segmentation.dice_rca_max <= 1
    else:
        assert segmentation.qc_flags is not None and segmentation.dice_rca_mean is None
    return segmentation.id


def test_serve_once(tmp_path, samples_dir):
    """``make run`` once: a PNG (in a ChestX-ray8 folder), a JPEG, a DICOM and a corrupt
    file through decode, the bundled model, the store, the index and QC."""
    home, inbox = tmp_path / "home", tmp_path / "inbox"
    env = embedded_env(home)
    (inbox / "images_001").mkdir(parents=True)
    shutil.copy(samples_dir / PNG, inbox / "images_001" / PNG)
    for name in (JPEG, DICOM):
        shutil.copy(samples_dir / name, inbox / name)
    (inbox / "corrupt.png").write_bytes(CORRUPT_PNG)
    (inbox / ".hidden.png").write_bytes(CORRUPT_PNG)
    (inbox / "copy.png.part").write_bytes(CORRUPT_PNG)

    run = chexmask(["serve", "--inbox", str(inbox), "--once"], env)
    assert run.returncode == 0, run.stdout + run.stderr
    lines = run.stdout.splitlines()
    assert lines[0].startswith(f"model {bundled_model()}; index sqlite:///{home / 'index.db'}"), run.stdout
    reported = {}  # the segmentation id each image's line reports
    for line in lines:
        if match := re.fullmatch(r"\[[1-4]\] segmented (\S+)  segmentation (\d+)  \(\d+\.\d s\)", line):
            reported[match[1]] = int(match[2])
    assert set(reported) == {PNG, JPEG, DICOM}, run.stdout
    refused = [line for line in lines if re.fullmatch(r"\[[1-4]\] refused   corrupt\.png  \w+: \w.*", line)]
    assert len(refused) == 1, run.stdout
    assert re.fullmatch(r"1 refused, 3 segmented in \d+\.\d s, \d+\.\d\d images/s", lines[-1]), run.stdout

    index = MaskIndex(f"sqlite:///{home / 'index.db'}")
    try:
        images = {Path(i.uri).name: i for i in index.images()}
        assert set(images) == {PNG, JPEG, DICOM, "corrupt.png"}  # no hidden or partial files
        corrupt = images["corrupt.png"]
        assert corrupt.status is ImageStatus.REFUSED and corrupt.refusal_code and corrupt.reason
        assert f"{corrupt.refusal_code}: " in refused[0]
        assert images[PNG].dataset == "chestx-ray8" and images[PNG].dataset_image_id == PNG
        assert len(index.query(QueryFilters(status=ImageStatus.DONE))) == 3
        for name in (PNG, JPEG, DICOM):
            assert images[name].status is ImageStatus.DONE and images[name].attempts == 1, name
            assert check_stored(home, index, images[name]) == reported[name], name
    finally:
        index.close()

    again = chexmask(["serve", "--inbox", str(inbox), "--once"], env)
    assert again.returncode == 0 and again.stdout.splitlines()[-1].startswith("nothing to do, 4 unchanged"), (
        again.stdout
    )


def test_worker_round_trip_on_the_embedded_sqlite_broker(tmp_path, samples_dir):
    """A real ``chexmask worker`` on the embedded SQLite broker: arrivals offered
    through ``Intake`` travel ingest -> segment -> QC; the image ends done with its
    segmentation, the corrupt file refused."""
    home, inbox = tmp_path / "home", tmp_path / "inbox"
    inbox.mkdir()
    shutil.copy(samples_dir / JPEG, inbox / JPEG)
    (inbox / "corrupt.png").write_bytes(CORRUPT_PNG)

    worker = Process.cli(["worker", "--concurrency", "2"], embedded_env(home), tmp_path / "worker.log")
    try:
        worker.wait_output(" ready.")
        settings = Settings(
            home=home, database_url=f"sqlite:///{home / 'index.db'}", broker_url=f"sqla+sqlite:///{home / 'broker.db'}"
        )
        index = MaskIndex(settings.database_url)  # the worker created and migrated it
        try:
            intake = Intake(Registry(index), CeleryQueue(create_app(settings)))
            offered = intake.offer([Arrival.for_file(inbox / JPEG), Arrival.for_file(inbox / "corrupt.png")])
            assert (offered.new, offered.changed, offered.skipped) == (2, 0, 0)

            def finished():
                images = index.images()
                return all(i.status.final for i in images) and {Path(i.uri).name: i for i in images}

            images = wait_for("both arrivals final", finished, timeout=300)
            assert set(images) == {JPEG, "corrupt.png"}
            assert images["corrupt.png"].status is ImageStatus.REFUSED and images["corrupt.png"].refusal_code
            image = images[JPEG]
            assert image.status is ImageStatus.DONE and image.attempts == 1
            # The QC task comes after the image is marked done.
            [row] = index.query(QueryFilters(status=ImageStatus.DONE))
            wait_for(
                "QC recorded", lambda: index.get_segmentation(row.id).qc_status is not QCStatus.PENDING, timeout=120
            )
            check_stored(home, index, image)
        finally:
            index.close()
    finally:
        assert worker.stop() == 0, worker.output()[-3000:]
    log = worker.output()
    for task in ("chexmask.ingest", "chexmask.segment", "chexmask.qc"):
        assert re.search(rf"Task {re.escape(task)}\[[-0-9a-f]+\] succeeded", log), (task, log[-3000:])


@pytest.mark.slow
def test_serve_takes_up_images_a_previous_run_left_unfinished(tmp_path, random_weights, samples_dir):
    """An image a previous run registered but never finished (a scan queued it, then
    the process died): serve takes it up from the index."""
    home, inbox = tmp_path / "home", tmp_path / "inbox"
    env = embedded_env(home, random_weights)
    earlier = tmp_path / "earlier" / "covid-19-pneumonia-58-prior.jpg"
    earlier.parent.mkdir()
    earlier.write_bytes((samples_dir / earlier.name).read_bytes())
    scan = subprocess.run(
        [
            sys.executable,
            "-c",
            "from chexmask.app.pipeline_cli import scan_command; scan_command()",
            str(earlier.parent),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert "1 new" in scan.stdout, scan.stderr

    inbox.mkdir()
    (inbox / PNG).write_bytes((samples_dir / PNG).read_bytes())
    run = chexmask(["serve", "--inbox", str(inbox), "--once"], env)
    assert run.returncode == 0, run.stdout + run.stderr
    lines = run.stdout.splitlines()
    assert any(f"segmented {PNG}" in line for line in lines), run.stdout
    assert any("segmented covid-19-pneumonia-58-prior.jpg" in line for line in lines), run.stdout
    assert lines[-1].startswith("2 segmented in")

    index = MaskIndex(f"sqlite:///{home / 'index.db'}")
    try:
        images = {Path(i.uri).name: i for i in index.images()}
        assert set(images) == {PNG, "covid-19-pneumonia-58-prior.jpg"}
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


@pytest.mark.slow
def test_worker_with_periodic_scans_on_the_embedded_sqlite_broker(tmp_path, random_weights, samples_dir):
    """``chexmask worker --beat`` alone on a fresh home: it creates the index, beat
    scans CHEXMASK_SCAN_PREFIXES, and the tasks travel through the SQLite broker."""
    home, release = tmp_path / "home", tmp_path / "release"
    release.mkdir()
    (release / "00000001_000.png").write_bytes((samples_dir / "00000001_000.png").read_bytes())
    (release / "corrupt.png").write_bytes(CORRUPT_PNG)
    env = {
        **embedded_env(home, random_weights),
        "CHEXMASK_SCAN_PREFIXES": f"{release} nih test",
        "CHEXMASK_SCAN_INTERVAL": "2",
    }

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


@pytest.mark.slow
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
