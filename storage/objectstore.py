"""Where segmentation artefacts (record, RLE masks, PNGs) live: a folder or an S3 bucket.

One URL picks the backend (``file:///path`` or ``s3://bucket/prefix``). Keys are
``/``-separated relative paths. Every write is all-or-nothing: a reader sees the
old object, the new one, or none, never a partial file.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import uuid
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

from chexmask.config import Settings
from chexmask.errors import ConfigError, NotFound, TransientError

CHUNK_SIZE = 1 << 16
_TEMP_PREFIX = ".tmp-"
_SHA256 = re.compile(r"[0-9a-f]{64}")
_MODEL_VERSION = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")


class ObjectStore(ABC):
    """A flat key -> bytes store. Missing keys raise ``NotFound``."""

    @abstractmethod
    def put(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> None:
        """Store ``data`` under ``key`` atomically, replacing any previous object."""

    def put_file(self, key: str, source: Path, content_type: str = "application/octet-stream") -> None:
        """Store the file at ``source`` under ``key`` as ``put`` does; ``source`` stays."""
        self.put(key, source.read_bytes(), content_type)

    @abstractmethod
    def get(self, key: str) -> bytes: ...

    @abstractmethod
    def stream(self, key: str, chunk_size: int = CHUNK_SIZE) -> Iterator[bytes]:
        """The object's bytes in chunks, without holding it all in memory."""

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    @abstractmethod
    def url(self, key: str) -> str:
        """The canonical URI of the object (``file://...`` or ``s3://...``)."""

    @abstractmethod
    def list(self, prefix: str = "") -> Iterator[str]:
        """Keys starting with ``prefix``, in lexicographic order."""


def check_key(key: str) -> str:
    """Refuse keys that could escape the store root or name a folder."""
    parts = key.split("/")
    if not key or key.startswith("/") or any(p in ("", ".", "..") for p in parts) or "\\" in key:
        raise ValueError(f"invalid object key: {key!r}")
    return key


class LocalStore(ObjectStore):
    def __init__(self, root: str | os.PathLike[str]):
        self.root = Path(root).resolve()

    def _path(self, key: str) -> Path:
        return self.root.joinpath(*check_key(key).split("/"))

    def put(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        # The temp file shares the folder so os.replace is an atomic rename on one filesystem.
        fd, tmp = tempfile.mkstemp(prefix=_TEMP_PREFIX, dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o644)  # mkstemp makes 0600; stored objects are meant to be shared
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        _fsync(path.parent)  # make the rename itself durable

    def put_file(self, key: str, source: Path, content_type: str = "application/octet-stream") -> None:
        """A hard link to ``source`` where it is on the store's filesystem: its bytes
        are written to disk once, never copied; a copy where it is not."""
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.parent / f"{_TEMP_PREFIX}{uuid.uuid4().hex}"
        try:
            try:
                os.link(source, tmp)
            except OSError:  # another filesystem, or one without hard links
                shutil.copyfile(source, tmp)
            _fsync(tmp)
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        _fsync(path.parent)

    def get(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except (FileNotFoundError, IsADirectoryError):
            raise NotFound(f"no stored object {key!r}") from None

    def stream(self, key: str, chunk_size: int = CHUNK_SIZE) -> Iterator[bytes]:
        try:
            f = self._path(key).open("rb")
        except (FileNotFoundError, IsADirectoryError):
            raise NotFound(f"no stored object {key!r}") from None
        return _read_chunks(f, chunk_size)

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def url(self, key: str) -> str:
        return self._path(key).as_uri()

    def list(self, prefix: str = "") -> Iterator[str]:
        # Walk only the folder the prefix pins down, not the whole store.
        folder_key = prefix.rpartition("/")[0]
        folder = self._path(folder_key) if folder_key else self.root
        if not folder.is_dir():
            return iter(())
        keys = (
            path.relative_to(self.root).as_posix()
            for path in folder.rglob("*")
            if path.is_file() and not path.name.startswith(_TEMP_PREFIX)
        )
        return iter(sorted(k for k in keys if k.startswith(prefix)))


def _read_chunks(f, chunk_size: int) -> Iterator[bytes]:
    with f:
        while chunk := f.read(chunk_size):
            yield chunk


def _fsync(path: Path) -> None:
    """Flush a file's or a folder's entries to disk (a read-only descriptor suffices)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# S3 error codes that mean "try again later" rather than "this request is wrong".
_TRANSIENT_S3_CODES = {
    "InternalError",
    "RequestTimeout",
    "RequestTimeTooSkewed",
    "ServiceUnavailable",
    "SlowDown",
    "Throttling",
    "ThrottlingException",
    "RequestLimitExceeded",
}


class S3Store(ObjectStore):
    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint_url: str | None = None,
        max_attempts: int = 3,
    ):
        import boto3
        from botocore.config import Config

        self.bucket = bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        if endpoint_url is None:
            # CHEXMASK_S3_ENDPOINT_URL, else boto3's own AWS_ENDPOINT_URL (read by boto3).
            endpoint_url = Settings.from_env().s3_endpoint_url
        config = Config(
            retries={"mode": "standard", "max_attempts": max_attempts},
            connect_timeout=5,
            read_timeout=30,
        )
        self.client = boto3.client("s3", endpoint_url=endpoint_url, config=config)

    def _key(self, key: str) -> str:
        return self.prefix + check_key(key)

    def put(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> None:
        # One PutObject is atomic in S3: the object appears complete or not at all.
        with _s3_errors(key):
            self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data, ContentType=content_type)

    def put_file(self, key: str, source: Path, content_type: str = "application/octet-stream") -> None:
        with _s3_errors(key), source.open("rb") as body:  # streamed, not read into memory
            self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=body, ContentType=content_type)

    def get(self, key: str) -> bytes:
        with _s3_errors(key):
            return self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"].read()

    def stream(self, key: str, chunk_size: int = CHUNK_SIZE) -> Iterator[bytes]:
        with _s3_errors(key):
            body = self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"]
        return _iter_body(body, key, chunk_size)

    def exists(self, key: str) -> bool:
        try:
            with _s3_errors(key):
                self.client.head_object(Bucket=self.bucket, Key=self._key(key))
        except NotFound:
            return False
        return True

    def url(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._key(key)}"

    def list(self, prefix: str = "") -> Iterator[str]:
        paginator = self.client.get_paginator("list_objects_v2")
        with _s3_errors(prefix):
            for page in paginator.paginate(Bucket=self.bucket, Prefix=self.prefix + prefix):
                for item in page.get("Contents", []):
                    yield item["Key"][len(self.prefix) :]


def _iter_body(body, key: str, chunk_size: int) -> Iterator[bytes]:
    with _s3_errors(key):
        try:
            yield from body.iter_chunks(chunk_size)
        finally:
            body.close()


@contextmanager
def _s3_errors(key: str) -> Iterator[None]:
    """Translate botocore exceptions: missing -> NotFound, retryable -> TransientError."""
    from botocore.exceptions import ClientError, ConnectionError, HTTPClientError

    try:
        yield
    except ClientError as exc:
        error = exc.response.get("Error", {})
        code = str(error.get("Code", ""))
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        if code in ("NoSuchKey", "404", "NotFound"):
            raise NotFound(f"no stored object {key!r}") from None
        if code == "NoSuchBucket":
            raise ConfigError(f"S3 bucket does not exist: {error.get('BucketName', '')}") from exc
        if code in _TRANSIENT_S3_CODES or status >= 500:
            raise TransientError(f"S3 {code or status} on {key!r}") from exc
        raise
    except (ConnectionError, HTTPClientError) as exc:  # refused, reset, timed out
        raise TransientError(f"S3 unreachable for {key!r}: {exc}") from exc


def open_store(url: str, endpoint_url: str | None = None) -> ObjectStore:
    """The store named by ``url``: ``file:///path`` or ``s3://bucket[/prefix]``
    (on the S3-compatible server at ``endpoint_url``, default: the settings')."""
    parsed = urlparse(url)
    if parsed.scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            raise ConfigError(f"file store URL must be file:///absolute/path, got {url!r}")
        return LocalStore(unquote(parsed.path))
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise ConfigError(f"S3 store URL needs a bucket: {url!r}")
        return S3Store(parsed.netloc, parsed.path, endpoint_url=endpoint_url)
    raise ConfigError(f"unsupported object store URL {url!r} (use file:///path or s3://bucket/prefix)")


@dataclass(frozen=True)
class SegmentationKeys:
    """Where the artefacts of one segmentation live; derived only from content and model."""

    record: str
    masks: str
    right_lung: str
    left_lung: str
    heart: str
    overlay: str
    picture: str  # the plain 1024 image under the overlay, for the web app's layers

    def as_dict(self) -> dict[str, str]:
        """The keys every segmentation has (not the DICOM ones, which only DICOM inputs have)."""
        return asdict(self)

    @property
    def seg(self) -> str:
        """The DICOM SEG of a DICOM input."""
        return f"{self.record.rpartition('/')[0]}/seg.dcm"

    @property
    def sr(self) -> str:
        """The DICOM SR (measurement report) of a DICOM input, written after QC."""
        return f"{self.record.rpartition('/')[0]}/sr.dcm"


def segmentation_keys(image_sha256: str, model_version: str) -> SegmentationKeys:
    """Content-addressed keys: the same image bytes and model always map to the same objects.

    The two-character fan-out folder keeps any one folder (or S3 listing) small.
    """
    if not _SHA256.fullmatch(image_sha256):
        raise ValueError(f"not a lowercase hex sha256: {image_sha256!r}")
    if not _MODEL_VERSION.fullmatch(model_version):
        raise ValueError(f"model version not usable in a key: {model_version!r}")
    base = f"segmentations/{image_sha256[:2]}/{image_sha256}/{model_version}"
    return SegmentationKeys(
        record=f"{base}/record.json",
        masks=f"{base}/masks.json",
        right_lung=f"{base}/right_lung.png",
        left_lung=f"{base}/left_lung.png",
        heart=f"{base}/heart.png",
        overlay=f"{base}/overlay.jpg",
        picture=f"{base}/picture.jpg",
    )
