"""Reading source images by URI: ``file:///path`` or ``s3://bucket/key``.

Sources are the images to segment, wherever they arrived; the object store
(``objectstore``) holds what we make of them. A source that is gone raises
``FileNotFoundError`` whatever the backend; a storage or network hiccup raises
``TransientError`` (retried with backoff).
"""

from __future__ import annotations

import errno
from functools import lru_cache
from pathlib import Path
from urllib.parse import unquote, urlparse

from chexmask.errors import NotFound, TransientError
from chexmask.storage.objectstore import S3Store

# Errors of a network filesystem or a flaky disk that may pass on a retry.
_TRANSIENT_ERRNOS = {errno.EIO, errno.EAGAIN, errno.ETIMEDOUT, errno.ESTALE, errno.EBUSY}


def read(uri: str) -> bytes:
    parsed = urlparse(uri)
    if parsed.scheme == "file":
        return _read_file(Path(unquote(parsed.path)))
    if parsed.scheme == "s3":
        try:
            return bucket(parsed.netloc).get(parsed.path.lstrip("/"))
        except NotFound:
            raise FileNotFoundError(f"no such object: {uri}") from None
    raise ValueError(f"cannot read {uri!r}: only file:// and s3:// sources are supported")


def _read_file(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise
    except OSError as exc:
        if exc.errno in _TRANSIENT_ERRNOS:
            raise TransientError(f"reading {path}: {exc}") from exc
        raise


@lru_cache(maxsize=64)
def bucket(name: str) -> S3Store:
    """One client per bucket and process (boto3 clients are thread-safe); the endpoint
    comes from ``CHEXMASK_S3_ENDPOINT_URL`` or ``AWS_ENDPOINT_URL`` as for the object store."""
    return S3Store(name)
