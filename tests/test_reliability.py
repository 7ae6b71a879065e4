"""Nothing lost, nothing hangs: crashes at every step boundary, hostile inbox files,
and `serve` stopping on SIGTERM, each against the real `chexmask serve` process.

Each crash is a SIGKILL the process sends itself at an injected point
(``CHEXMASK_FAULT``, ``chexmask/faults.py``); one restart must then leave the
image done exactly once and its QC not pending.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sqlmodel import Session, select

from chexmask.faults import POINTS
from chexmask.status import ImageStatus, QCStatus
from chexmask.storage.index import MaskIndex
from chexmask.storage.models import Segmentation, SourceImage

IMAGE = "00000001_000.png"


def env_for(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHEXMASK_")}
    return {**env, "CHEXMASK_HOME": str(home), "CHEXMASK_LEASE": "2", "PYTHONUNBUFFERED": "1", **extra}


def serve_once(inbox: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "chexmask.app.cli", "serve", "--inbox", str(inbox), "--once", "--settle", "0"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def rows(home: Path) -> tuple[list[SourceImage], list[Segmentation]]:
    index = MaskIndex(f"sqlite:///{home / 'index.db'}")
    try:
        with Session(index.engine) as session:
            return list(session.scalars(select(SourceImage))), list(session.scalars(select(Segmentation)))
    finally:
        index.close()


def test_crashes_at_every_step_while_images_arrive_then_one_restart_leave_each_done_once(tmp_path, samples_dir):
    """One run per crash point, each with a new image arriving; every run first takes
    up what the previous crash left, so the crash may hit a recovered image or the
    new one. After one clean restart: every image done once, nothing held, no QC pending."""
    home, inbox = tmp_path / "home", tmp_path / "inbox"
    inbox.mkdir()
    data = (samples_dir / IMAGE).read_bytes()
    for n, point in enumerate(POINTS):
        # Distinct content per image (a trailing byte after IEND), so none reuses another's result.
        (inbox / f"{n}_{IMAGE}").write_bytes(data + bytes([n]))
        crashed = serve_once(inbox, env_for(home, CHEXMASK_FAULT=point))
        assert crashed.returncode == -signal.SIGKILL, (point, crashed.stdout + crashed.stderr)
    restarted = serve_once(inbox, env_for(home))
    assert restarted.returncode == 0, restarted.stdout + restarted.stderr
    images, segmentations = rows(home)
    assert len(images) == len(POINTS)
    assert {(i.status, i.lease_owner) for i in images} == {(ImageStatus.DONE, None)}
    assert sorted(s.image_sha256 for s in segmentations) == sorted(i.sha256 for i in images)
    assert all(s.qc_status is not QCStatus.PENDING for s in segmentations)


@pytest.mark.slow
@pytest.mark.parametrize("point", POINTS)
def test_a_crash_at_any_step_then_one_restart_leaves_the_image_done_once(point, tmp_path, samples_dir):
    home, inbox = tmp_path / "home", tmp_path / "inbox"
    inbox.mkdir()
    (inbox / IMAGE).write_bytes((samples_dir / IMAGE).read_bytes())

    crashed = serve_once(inbox, env_for(home, CHEXMASK_FAULT=point))
    assert crashed.returncode == -signal.SIGKILL, crashed.stdout + crashed.stderr

    restarted = serve_once(inbox, env_for(home))
    assert restarted.returncode == 0, restarted.stdout + restarted.stderr
    images, segmentations = rows(home)
    assert [(i.status, i.lease_owner) for i in images] == [(ImageStatus.DONE, None)]
    assert len(segmentations) == 1 and segmentations[0].image_sha256 == images[0].sha256
    assert segmentations[0].qc_status is not QCStatus.PENDING
    store = home / "store"
    assert all((store / key).is_file() for key in segmentations[0].object_keys.values())


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_serve_skips_fifos_and_devices_and_stops_on_sigterm(tmp_path, samples_dir):
    home, inbox = tmp_path / "home", tmp_path / "inbox"
    inbox.mkdir()
    os.mkfifo(inbox / "fifo.png")
    (inbox / "zero.png").symlink_to("/dev/zero")
    (inbox / IMAGE).write_bytes((samples_dir / IMAGE).read_bytes())
    out = tmp_path / "serve.log"
    with open(out, "w") as log:
        serve = subprocess.Popen(
            [sys.executable, "-m", "chexmask.app.cli", "serve", "--inbox", str(inbox), "--settle", "0.2"],
            env=env_for(home),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 240
        while f"segmented {IMAGE}" not in out.read_text() and time.monotonic() < deadline:
            assert serve.poll() is None, out.read_text()
            time.sleep(0.5)
        assert f"segmented {IMAGE}" in out.read_text(), out.read_text()
        # A FIFO made after the start arrives by event, not by the scan.
        os.mkfifo(inbox / "late.png")
        time.sleep(2)
        serve.send_signal(signal.SIGTERM)
        stopped = time.monotonic()
        serve.wait(timeout=15)
        assert time.monotonic() - stopped < 10, out.read_text()
    finally:
        if serve.poll() is None:
            serve.kill()
    images, _ = rows(home)
    assert [(Path(i.uri).name, i.status) for i in images] == [(IMAGE, ImageStatus.DONE)]


def test_names_that_are_not_utf8_are_segmented(tmp_path, samples_dir):
    home, inbox = tmp_path / "home", tmp_path / "inbox"
    inbox.mkdir()
    name = b"caf\xe9-" + IMAGE.encode()  # Latin-1, not UTF-8
    with open(os.path.join(os.fsencode(inbox), name), "wb") as fh:
        fh.write((samples_dir / IMAGE).read_bytes())
    run = serve_once(inbox, env_for(home))
    assert run.returncode == 0, run.stdout + run.stderr
    images, segmentations = rows(home)
    assert [i.status for i in images] == [ImageStatus.DONE] and len(segmentations) == 1
    assert "%E9" in images[0].uri  # the exact bytes, percent-encoded


def test_a_transient_failure_is_retried_and_retry_requeues_failed(tmp_path, samples_dir):
    """A read-only store fails the image with a transient cause: it gets a retry time;
    `chexmask retry --failed` puts it back to queued, and the next run finishes it."""
    home, inbox = tmp_path / "home", tmp_path / "inbox"
    inbox.mkdir()
    (inbox / IMAGE).write_bytes((samples_dir / IMAGE).read_bytes())
    store = tmp_path / "store"
    store.mkdir()
    store.chmod(0o500)
    if os.access(store, os.W_OK):  # root ignores the mode
        pytest.skip("cannot make a read-only folder as this user")
    env = env_for(home, CHEXMASK_STORE_URL=store.as_uri())
    failed = subprocess.run(
        [
            sys.executable,
            "-c",
            "import chexmask.retry as r, chexmask.app.cli as c;"
            "r.RETRY = r.RetryPolicy(transient_retries=0, unexpected_retries=0);"
            "import chexmask.app.serve as s; s.RETRY = r.RETRY; c.main()",
            "serve",
            "--inbox",
            str(inbox),
            "--once",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    images, _ = rows(home)
    assert images[0].status is ImageStatus.FAILED, failed.stdout + failed.stderr
    assert images[0].retry_at is not None and images[0].failing_since is not None
    store.chmod(0o700)
    retry = subprocess.run(
        [sys.executable, "-m", "chexmask.app.cli", "retry", "--failed"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "1 image(s)" in retry.stdout, retry.stdout + retry.stderr
    assert rows(home)[0][0].status is ImageStatus.QUEUED
    assert serve_once(inbox, env).returncode == 0
    images, segmentations = rows(home)
    assert images[0].status is ImageStatus.DONE and len(segmentations) == 1
