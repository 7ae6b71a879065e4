"""The messages that travel between the layers.

An ``Arrival`` is an image noticed by a watcher, a listener or a scanner: where it is and what it is.

An arrival travels as a plain dict in task messages, so it holds only strings
and numbers. ``etag`` is the object's S3 ETag, or for a file a weak tag of its
modification time and size: a new tag means new content to look at.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from urllib.parse import quote

from chexmask.datasets import identify


@dataclass(frozen=True)
class Arrival:
    uri: str  # file:///abs/path or s3://bucket/key
    dataset: str
    dataset_image_id: str
    release: str | None = None
    etag: str | None = None
    size: int | None = None

    @classmethod
    def for_file(
        cls, path: Path, dataset: str | None = None, release: str | None = None, stat: os.stat_result | None = None
    ) -> Arrival:
        path = path.absolute()
        stat = stat or path.stat()
        found = identify(printable(path.as_posix()), dataset)
        return cls(file_uri(path), found.dataset, found.image_id, release, file_etag(stat), stat.st_size)

    @classmethod
    def for_object(
        cls,
        bucket: str,
        key: str,
        etag: str | None,
        size: int | None,
        dataset: str | None = None,
        release: str | None = None,
    ) -> Arrival:
        found = identify(key, dataset)
        return cls(
            f"s3://{bucket}/{key}", found.dataset, found.image_id, release, etag.strip('"') if etag else None, size
        )

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Arrival:
        return cls(**data)

    @property
    def name(self) -> str:
        return self.uri.rstrip("/").rsplit("/", 1)[-1]


def file_uri(path: Path) -> str:
    """``file://`` URI of an absolute path, percent-encoding its bytes: a name that is
    not UTF-8 (which ``Path.as_uri`` refuses) keeps its exact bytes, and
    ``storage.sources`` reads it back with ``unquote_to_bytes``."""
    return "file://" + quote(os.fsencode(path.absolute()), safe="/")


def printable(name: str) -> str:
    """A path or name as text any database takes: bytes that are not UTF-8 (kept
    by Python as surrogates) become U+FFFD."""
    return os.fsencode(name).decode("utf-8", "replace")


def file_etag(stat: os.stat_result) -> str:
    """A weak tag of a file's version, as web servers derive one (mtime and size)."""
    return f"{stat.st_mtime_ns:x}-{stat.st_size:x}"
