"""Reading source images by URI: ``file:///path`` or ``s3://bucket/key``.

Sources are the images to segment, wherever they arrived; the object store
(``objectstore``) holds what we make of them. A source that is gone raises
``FileNotFoundError`` whatever the backend; a storage or network hiccup raises
``TransientError`` (retried with backoff).
"""

from __future__ import annotations

import errno
import os
import stat
from functools import lru_cache
from pathlib import Path
from urllib.parse import unquote_to_bytes, urlparse

from chexmask.errors import NotARegularFile, NotFound, TransientError
from chexmask.storage.objectstore import S3Store

# Errors of a network filesystem or a flaky disk that may pass on a retry.
_TRANSIENT_ERRNOS = {errno.EIO, errno.EAGAIN, errno.ETIMEDOUT, errno.ESTALE, errno.EBUSY}


def read(uri: str) -> bytes:
    parsed = urlparse(uri)
    if parsed.scheme == "file":
        return _read_file(Path(os.fsdecode(unquote_to_bytes(parsed.path))))
    if parsed.scheme == "s3":
        try:
            return bucket(parsed.netloc).get(parsed.path.lstrip("/"))
        except NotFound:
            raise FileNotFoundError(f"no such object: {uri}") from None
    raise ValueError(f"cannot read {uri!r}: only file:// and s3:// sources are supported")


def _read_file(path: Path) -> bytes:
    try:
        return read_regular_file(path)
    except (FileNotFoundError, NotARegularFile):
        raise
    except OSError as exc:
        if exc.errno in _TRANSIENT_ERRNOS:
            raise TransientError(f"reading {path}: {exc}") from exc
        raise


def read_regular_file(path: Path) -> bytes:
    """The bytes of ``path`` if it is a regular file (a symlink is followed to one).

    Opened without blocking and checked with fstat before any read: a FIFO would
    block a reader until a writer comes, and a device (/dev/zero) never ends.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | getattr(os, "O_CLOEXEC", 0))
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise NotARegularFile(f"not a regular file (a FIFO, device, socket or folder): {path}")
        with os.fdopen(fd, "rb", closefd=False) as fh:
            return fh.read()
    finally:
        os.close(fd)


@lru_cache(maxsize=64)
def bucket(name: str) -> S3Store:
    """One client per bucket and process (boto3 clients are thread-safe); the endpoint
    comes from ``CHEXMASK_S3_ENDPOINT_URL`` or ``AWS_ENDPOINT_URL`` as for the object store."""
    return S3Store(name)
