"""Scan a dataset release, an S3 prefix or a folder, and queue what the index lacks.

Objects are compared with the index by URI and ETag (S3) or mtime and size
(files): only new or changed ones are queued, then registered, so running a
scan again queues nothing that is already known. That makes re-running the
resume; the state file (last key handed on, per URI, dataset and release)
only saves re-listing what an interrupted scan already covered.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path, PurePosixPath
from urllib.parse import unquote, urlparse

from tqdm import tqdm

from chexmask.files import ignored_name, walk
from chexmask.ingest.queue import Intake, Offered
from chexmask.messages import Arrival
from chexmask.storage import sources

DEFAULT_PAGE = 1000  # one S3 listing request; a page is looked up and registered in a few statements


@dataclass
class ScanCounts:
    seen: int = 0
    new: int = 0
    changed: int = 0
    skipped: int = 0
    covered: int = 0  # not queued: an imported (published) segmentation has their id

    def add(self, seen: int, offered: Offered) -> None:
        self.seen += seen
        self.new += offered.new
        self.changed += offered.changed
        self.skipped += offered.skipped
        self.covered += offered.covered


class ScanState:
    """The last key a scan handed on, in a small JSON file."""

    def __init__(self, folder: Path, uri: str, dataset: str | None, release: str | None):
        ident = json.dumps([uri, dataset, release])
        self.path = folder / f"{hashlib.sha256(ident.encode()).hexdigest()[:16]}.json"
        self.ident = ident

    def last_key(self) -> str | None:
        try:
            state = json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        return state["last_key"] if state.get("scan") == self.ident else None

    def save(self, key: str) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"scan": self.ident, "last_key": key}))
        os.replace(tmp, self.path)

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)


class ReleaseScanner:
    def __init__(
        self,
        intake: Intake,
        *,
        dataset: str | None = None,
        release: str | None = None,
        state_dir: Path | None = None,
        page_size: int = DEFAULT_PAGE,
        progress: bool = True,
    ):
        self.intake = intake
        self.dataset = dataset
        self.release = release
        self.state_dir = state_dir
        self.page_size = page_size
        self.progress = progress

    def scan(self, uri: str, resume: bool = True) -> ScanCounts:
        """Queue the new and changed images under ``uri`` (``s3://bucket/prefix``, a folder
        or ``file:///folder``); resumes after the last key of an interrupted scan."""
        state = ScanState(self.state_dir, uri, self.dataset, self.release) if self.state_dir else None
        start_after = state.last_key() if state and resume else None
        counts = ScanCounts()
        with tqdm(desc=f"scan {uri}", unit=" obj", disable=not self.progress, dynamic_ncols=True) as bar:
            if start_after:
                bar.write(f"resuming after {start_after}")
            listing = self._list(uri, start_after)
            while page := list(islice(listing, self.page_size)):
                counts.add(len(page), self.intake.offer([arrival for _, arrival in page]))
                if state:
                    state.save(page[-1][0])
                bar.update(len(page))
                bar.set_postfix(new=counts.new, changed=counts.changed, skipped=counts.skipped, covered=counts.covered)
        if state:
            state.clear()  # complete: the next scan starts from the beginning
        return counts

    def _list(self, uri: str, start_after: str | None) -> Iterator[tuple[str, Arrival]]:
        parsed = urlparse(uri)
        if parsed.scheme == "s3":
            return self._objects(parsed.netloc, parsed.path.lstrip("/"), start_after)
        folder = Path(unquote(parsed.path)) if parsed.scheme == "file" else Path(uri)
        if not folder.is_dir():
            raise FileNotFoundError(f"no such folder: {folder}")
        return self._files(folder.absolute(), start_after)

    def _objects(self, bucket: str, prefix: str, start_after: str | None) -> Iterator[tuple[str, Arrival]]:
        params = {"Bucket": bucket, "Prefix": prefix}
        if start_after:
            params["StartAfter"] = start_after
        paginator = sources.bucket(bucket).client.get_paginator("list_objects_v2")
        for page in paginator.paginate(**params):
            for obj in page.get("Contents", []):
                key = obj["Key"]
                if key.endswith("/") or ignored_name(PurePosixPath(key[len(prefix) :].lstrip("/"))):
                    continue
                yield key, Arrival.for_object(bucket, key, obj.get("ETag"), obj.get("Size"), self.dataset, self.release)

    def _files(self, root: Path, start_after: str | None) -> Iterator[tuple[str, Arrival]]:
        # walk() goes folder by folder in name order, so keys compare part by part.
        after = tuple(start_after.split("/")) if start_after else None
        for path, stat in walk(root):
            relative = path.relative_to(root)
            if ignored_name(relative) or (after and relative.parts <= after):
                continue
            yield relative.as_posix(), Arrival.for_file(path, self.dataset, self.release, stat)
