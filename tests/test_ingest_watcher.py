"""The folder watcher, on a real folder with real watchdog observers."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from chexmask.ingest.watcher import FolderWatcher

PNG = b"\x89PNG\r\n\x1a\n" + b"x" * 100


class Reports:
    """What the watcher reported: (path, size at report time), in order."""

    def __init__(self):
        self.items: list[tuple[Path, int]] = []
        self.lock = threading.Lock()

    def __call__(self, paths: list[Path]) -> None:
        with self.lock:
            self.items += [(p, p.stat().st_size) for p in paths]

    @property
    def names(self) -> list[str]:
        with self.lock:
            return [p.name for p, _ in self.items]


def wait_for(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        time.sleep(0.05)


def test_closed_file_is_reported_at_once_and_only_once(tmp_path):
    reports = Reports()
    # A long quiet period: only the close-write event can report the file this fast.
    with FolderWatcher(tmp_path, reports, settle=30, reconcile_every=0.3):
        (tmp_path / "a.png").write_bytes(PNG)
        wait_for(lambda: reports.names == ["a.png"], timeout=5)
        time.sleep(1.0)  # a few reconciliation scans later: still reported once
    assert reports.names == ["a.png"]


def test_renamed_into_place_after_download(tmp_path):
    reports = Reports()
    with FolderWatcher(tmp_path, reports, settle=30, reconcile_every=60):
        partial = tmp_path / "scan.png.part"
        with partial.open("wb") as f:
            f.write(PNG[:10])
            f.flush()
            time.sleep(0.3)
            f.write(PNG[10:])
        partial.rename(tmp_path / "scan.png")
        wait_for(lambda: reports.names == ["scan.png"], timeout=5)
    assert reports.items == [(tmp_path / "scan.png", len(PNG))]


def test_hidden_temporary_and_other_files_are_ignored(tmp_path):
    reports = Reports()
    (tmp_path / ".cache").mkdir()
    with FolderWatcher(tmp_path, reports, settle=0.2, reconcile_every=0.2):
        for name in (
            ".hidden.png",
            "~$lock.png",
            "backup.png~",
            "b.tmp",
            "c.crdownload",
            "d.part",
            ".cache/e.png",
            "notes.txt",
            "series/f.dcm",
        ):
            path = tmp_path / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(PNG)
        wait_for(lambda: reports.names == ["f.dcm"])
        time.sleep(1.0)
    assert reports.names == ["f.dcm"]


def test_polling_waits_for_a_quiet_period(tmp_path):
    reports = Reports()
    # The quiet period is 8x the pause between writes, so a loaded machine (a slow fsync)
    # cannot make a pause look like the end of the copy.
    with FolderWatcher(tmp_path, reports, polling=True, poll_interval=0.1, settle=2.0, reconcile_every=60):
        path = tmp_path / "slow.png"
        with path.open("wb") as f:  # a slow copy: the file grows for a while
            for _ in range(5):
                f.write(PNG)
                f.flush()
                os.fsync(f.fileno())
                time.sleep(0.25)
        wait_for(lambda: reports.names, timeout=10)
        time.sleep(0.8)
    assert reports.items == [(path, 5 * len(PNG))]


def test_files_that_arrived_while_stopped_are_found_at_start(tmp_path):
    reports = Reports()
    FolderWatcher(tmp_path, reports, settle=0.2).start().stop()
    (tmp_path / "night").mkdir()
    for name in ("night/1.png", "night/2.png"):
        (tmp_path / name).write_bytes(PNG)
    with FolderWatcher(tmp_path, reports, settle=0.2, reconcile_every=60):
        wait_for(lambda: sorted(reports.names) == ["1.png", "2.png"])


def test_a_rewritten_file_is_reported_again(tmp_path):
    reports = Reports()
    path = tmp_path / "a.png"
    with FolderWatcher(tmp_path, reports, settle=30, reconcile_every=0.3):
        path.write_bytes(PNG)
        wait_for(lambda: len(reports.items) == 1)
        path.write_bytes(PNG * 2)
        wait_for(lambda: len(reports.items) == 2)
    assert [size for _, size in reports.items] == [len(PNG), 2 * len(PNG)]


def test_once_returns_complete_files_after_they_settle(tmp_path):
    old, fresh = tmp_path / "old.png", tmp_path / "fresh.png"
    old.write_bytes(PNG)
    os.utime(old, (time.time() - 60, time.time() - 60))
    fresh.write_bytes(PNG)
    watcher = FolderWatcher(tmp_path, Reports(), settle=0.3)
    assert sorted(p.name for p in watcher.once()) == ["fresh.png", "old.png"]


@pytest.mark.parametrize("polling", [False, True])
def test_a_folder_moved_in_is_reported(tmp_path, polling):
    outside = tmp_path / "outside"
    (outside / "study").mkdir(parents=True)
    (outside / "study" / "1.png").write_bytes(PNG)
    inbox = tmp_path / "inbox"
    reports = Reports()
    with FolderWatcher(inbox, reports, polling=polling, poll_interval=0.1, settle=0.3, reconcile_every=60):
        time.sleep(0.3)
        (outside / "study").rename(inbox / "study")
        wait_for(lambda: reports.names == ["1.png"])
