"""Watch a folder and report each image file once it is complete.

A file is complete when the writer closes it (inotify's close-write, where the
platform has it), when it is renamed into place, or when its size and mtime
have stayed the same for ``settle`` seconds (polling, network mounts, copies
that reopen the file). Hidden and temporary files are ignored until they are
renamed to their final name.

A reconciliation scan at start and every ``reconcile_every`` seconds reports
files that arrived while nobody was watching or whose events were lost; the
consumer checks the index, so a file reported again is not queued again.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer
from watchdog.observers.polling import PollingObserver

from chexmask.files import ignored, regular, walk

log = logging.getLogger(__name__)

DEFAULT_SETTLE_S = 2.0
DEFAULT_RECONCILE_S = 600.0
_TICK_S = 0.2


@dataclass
class _Pending:
    size: int
    mtime_ns: int
    stable_since: float
    ready: bool = False


class FolderWatcher:
    """Calls ``on_files(paths)`` with complete files, from one thread, in batches."""

    def __init__(
        self,
        root: Path,
        on_files: Callable[[list[Path]], None],
        *,
        polling: bool = False,
        settle: float = DEFAULT_SETTLE_S,
        reconcile_every: float = DEFAULT_RECONCILE_S,
        poll_interval: float = 1.0,
    ):
        self.root = root.absolute()
        self.on_files = on_files
        self.settle = settle
        self.reconcile_every = reconcile_every
        self._observer = PollingObserver(timeout=poll_interval) if polling else Observer()
        self._pending: dict[Path, _Pending] = {}
        self._reported: dict[Path, tuple[int, int]] = {}  # path -> (size, mtime_ns) last reported
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="chexmask-watcher", daemon=True)

    # --- lifecycle --------------------------------------------------------------------

    def start(self) -> FolderWatcher:
        self.root.mkdir(parents=True, exist_ok=True)
        # Events first, then the scan: a file landing in between is seen at least once.
        self._observer.schedule(_Handler(self), str(self.root), recursive=True)
        self._observer.start()
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._observer.stop()
        self._observer.join()
        if self._thread.is_alive():
            self._thread.join()

    def __enter__(self) -> FolderWatcher:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def once(self) -> list[Path]:
        """Scan, wait for files still being written to settle, and return every complete file
        (for ``serve --once``; no events)."""
        self.root.mkdir(parents=True, exist_ok=True)
        files = self.scan()
        while self._pending:
            time.sleep(_TICK_S)
            files += self._settled()
        return files

    # --- the two ways files are found ---------------------------------------------------

    def scan(self) -> list[Path]:
        """Complete files not reported yet; younger ones wait in pending to settle."""
        now = time.time()
        ready, present = [], set()
        for path, stat in walk(self.root):
            present.add(path)
            if ignored(path, self.root) or self._reported.get(path) == (stat.st_size, stat.st_mtime_ns):
                continue
            if now - stat.st_mtime_ns / 1e9 >= self.settle:
                ready.append(path)
                self._reported[path] = (stat.st_size, stat.st_mtime_ns)
            else:
                self._touch(path, only_new=True)
        # Forget files cleared out of the folder, so memory follows what it holds now.
        self._reported = {p: v for p, v in self._reported.items() if p in present}
        return ready

    def _touch(self, path: Path, ready: bool = False, only_new: bool = False) -> None:
        """Note activity on ``path``; ``ready`` when the event says the file is complete.
        ``only_new`` (scans) leaves a file the events already track alone."""
        if ignored(path, self.root):
            return
        try:
            stat = path.stat()
        except OSError:  # gone, or a dangling link
            return
        if not regular(path, stat):
            return
        item = _Pending(stat.st_size, stat.st_mtime_ns, time.monotonic(), ready)
        with self._lock:
            if only_new:
                self._pending.setdefault(path, item)
            else:
                self._pending[path] = item

    def _settled(self) -> list[Path]:
        """Pending files now complete: flagged ready, or unchanged for ``settle`` seconds."""
        now = time.monotonic()
        with self._lock:
            pending = list(self._pending.items())
        settled = []
        for path, item in pending:
            try:
                stat = path.stat()
            except FileNotFoundError:  # deleted, or renamed away (the rename has its own event)
                self._forget(path, item)
                continue
            version = (stat.st_size, stat.st_mtime_ns)
            if not item.ready and version != (item.size, item.mtime_ns):
                # Still growing: restart the quiet period, unless an event replaced the entry meanwhile.
                self._replace(path, item, _Pending(*version, now))
                continue
            if item.ready or now - item.stable_since >= self.settle:
                if not self._forget(path, item):
                    continue  # written to again meanwhile: wait for that to finish
                if self._reported.get(path) != version:
                    self._reported[path] = version
                    settled.append(path)
        return settled

    def _forget(self, path: Path, item: _Pending) -> bool:
        return self._replace(path, item, None)

    def _replace(self, path: Path, old: _Pending, new: _Pending | None) -> bool:
        """Swap the entry of ``path`` if it is still ``old`` (events may update it
        meanwhile); whether it was."""
        with self._lock:
            if self._pending.get(path) is not old:
                return False
            if new is None:
                del self._pending[path]
            else:
                self._pending[path] = new
            return True

    def _run(self) -> None:
        next_scan = 0.0
        while not self._stop.is_set():
            files = self._settled()
            if time.monotonic() >= next_scan:
                files += self.scan()
                next_scan = time.monotonic() + self.reconcile_every
            if files:
                self._report(files)
            self._stop.wait(_TICK_S)

    def _report(self, files: list[Path]) -> None:
        try:
            self.on_files(files)
        except Exception:
            # Forget them so the next reconciliation scan offers them again.
            log.exception("could not hand on %d file(s); retrying at the next scan", len(files))
            for path in files:
                self._reported.pop(path, None)


class _Handler(FileSystemEventHandler):
    def __init__(self, watcher: FolderWatcher):
        self.watcher = watcher

    def on_created(self, event: FileSystemEvent) -> None:
        if event.is_directory:  # a folder moved in: its files come with no events of their own
            for path, _ in walk(Path(os.fsdecode(event.src_path))):
                self.watcher._touch(path)
        else:
            self.watcher._touch(Path(os.fsdecode(event.src_path)))

    def on_modified(self, event: FileSystemEvent) -> None:
        if not event.is_directory:
            self.watcher._touch(Path(os.fsdecode(event.src_path)))

    def on_closed(self, event: FileSystemEvent) -> None:
        self.watcher._touch(Path(os.fsdecode(event.src_path)), ready=True)

    def on_moved(self, event: FileSystemEvent) -> None:
        dest = Path(os.fsdecode(event.dest_path))
        if event.is_directory:
            for path, _ in walk(dest):
                self.watcher._touch(path, ready=True)
        else:  # a rename into place: the writer has finished
            self.watcher._touch(dest, ready=True)
