"""ObjectStore on a tmp folder and on moto's S3 server over HTTP."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from chexmask.errors import ConfigError, NotFound, TransientError
from chexmask.storage.objectstore import LocalStore, S3Store, open_store, segmentation_keys

SHA = "0f" * 32


def test_put_get_exists_list_url(store):
    keys = segmentation_keys(SHA, "hybridgnet-1.0")
    store.put(keys.record, b'{"a": 1}', "application/json")
    store.put(keys.heart, b"\x89PNG...", "image/png")
    store.put("other/x.bin", b"x")

    assert store.get(keys.record) == b'{"a": 1}'
    assert b"".join(store.stream(keys.heart, chunk_size=3)) == b"\x89PNG..."
    assert store.exists(keys.record) and not store.exists(keys.masks)
    assert list(store.list("segmentations/")) == sorted([keys.heart, keys.record])
    assert list(store.list()) == sorted([keys.heart, keys.record, "other/x.bin"])
    assert list(store.list("nothing/")) == []
    assert store.url(keys.record).endswith(keys.record)
    assert store.url(keys.record).split(":")[0] in ("file", "s3")


def test_put_file_stores_the_file_and_leaves_it(store, tmp_path):
    source = tmp_path / "received.dcm"
    source.write_bytes(os.urandom(300_000))
    store.put_file("received/dicom/ab/x.dcm", source, "application/dicom")
    assert store.get("received/dicom/ab/x.dcm") == source.read_bytes()
    store.put_file("received/dicom/ab/x.dcm", source)  # again: replaced, same bytes
    assert list(store.list("received/")) == ["received/dicom/ab/x.dcm"]


def test_local_put_file_links_on_the_same_filesystem_and_copies_across(tmp_path):
    """A hard link where the source shares the store's filesystem (the bytes are not
    written again); a copy from another one (/dev/shm, a tmpfs, where there is one)."""
    store = LocalStore(tmp_path / "store")
    source = tmp_path / "received.dcm"
    source.write_bytes(b"DICM" * 1000)
    store.put_file("a/linked.dcm", source)
    stored = store.root / "a" / "linked.dcm"
    assert stored.stat().st_ino == source.stat().st_ino and stored.stat().st_mode & 0o777 == 0o644
    source.unlink()  # as pynetdicom removes its temporary file once answered
    assert store.get("a/linked.dcm") == b"DICM" * 1000

    shm = Path("/dev/shm")
    if not shm.is_dir() or shm.stat().st_dev == tmp_path.stat().st_dev:
        pytest.skip("no second filesystem to copy from")
    elsewhere = shm / f"chexmask-test-{os.getpid()}.dcm"
    elsewhere.write_bytes(b"other" * 1000)
    try:
        store.put_file("a/copied.dcm", elsewhere)
        copied = store.root / "a" / "copied.dcm"
        assert copied.stat().st_ino != elsewhere.stat().st_ino and copied.read_bytes() == b"other" * 1000
    finally:
        elsewhere.unlink()
    assert sorted(p.name for p in copied.parent.iterdir()) == ["copied.dcm", "linked.dcm"]  # no temp left


def test_missing_key_raises_not_found(store):
    with pytest.raises(NotFound):
        store.get("segmentations/none.json")
    with pytest.raises(NotFound):
        store.stream("segmentations/none.json")


def test_put_replaces_whole_object(store):
    store.put("k/v.bin", b"old" * 1000)
    store.put("k/v.bin", b"new")
    assert store.get("k/v.bin") == b"new"


@pytest.mark.parametrize("key", ["", "/abs", "a/../b", "a//b", "a/./b", "..", "a\\b"])
def test_unsafe_keys_are_refused(store, key):
    with pytest.raises(ValueError):
        store.put(key, b"x")


def test_local_put_is_all_or_nothing(tmp_path, monkeypatch):
    store = LocalStore(tmp_path)
    store.put("a/obj.bin", b"version 1")

    def crash(src, dst):  # the process dies between writing the temp file and renaming it
        raise OSError("simulated crash before rename")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="simulated"):
        store.put("a/obj.bin", b"version 2 " * 10_000)
    with pytest.raises(OSError, match="simulated"):
        store.put("a/new.bin", b"never visible")
    monkeypatch.undo()

    assert store.get("a/obj.bin") == b"version 1"
    assert not store.exists("a/new.bin")
    assert sorted(os.listdir(tmp_path / "a")) == ["obj.bin"]  # no temp files left behind
    assert oct((tmp_path / "a" / "obj.bin").stat().st_mode & 0o777) == "0o644"


def test_local_readers_never_see_partial_writes(tmp_path):
    store = LocalStore(tmp_path)
    payloads = [bytes([i]) * 200_000 for i in range(1, 6)]
    store.put("k.bin", payloads[0])
    seen: set[bytes] = set()
    done = threading.Event()

    def read() -> None:
        while not done.is_set():
            seen.add(store.get("k.bin"))

    reader = threading.Thread(target=read)
    reader.start()
    for _ in range(10):
        for payload in payloads:
            store.put("k.bin", payload)
    done.set()
    reader.join()
    assert seen <= set(payloads)  # every read is one complete version


def test_local_list_skips_temp_files(tmp_path):
    store = LocalStore(tmp_path)
    store.put("a/b.bin", b"x")
    (tmp_path / "a" / ".tmp-abc").write_bytes(b"partial")
    assert list(store.list()) == ["a/b.bin"]


def test_open_store_picks_backend(tmp_path, monkeypatch, fake_aws):
    local = open_store(tmp_path.as_uri())
    assert isinstance(local, LocalStore) and local.root == tmp_path.resolve()
    monkeypatch.setenv("CHEXMASK_S3_ENDPOINT_URL", "http://127.0.0.1:9")
    s3 = open_store("s3://bucket/some/prefix/")
    assert isinstance(s3, S3Store)
    assert (s3.bucket, s3.prefix) == ("bucket", "some/prefix/")
    assert s3.client.meta.endpoint_url == "http://127.0.0.1:9"
    assert s3.url("x/y.png") == "s3://bucket/some/prefix/x/y.png"
    for bad in ("http://x/y", "s3:///nobucket", "file://host/path"):
        with pytest.raises(ConfigError):
            open_store(bad)


def test_unreachable_s3_is_transient(fake_aws, unused_port):
    store = S3Store("bucket", endpoint_url=f"http://127.0.0.1:{unused_port}", max_attempts=1)
    with pytest.raises(TransientError):
        store.put("a.bin", b"x")
    with pytest.raises(TransientError):
        store.get("a.bin")


@pytest.mark.services
def test_missing_bucket_is_a_config_error(moto_endpoint, fake_aws):
    store = S3Store("no-such-bucket", endpoint_url=moto_endpoint)
    with pytest.raises(ConfigError, match="no-such-bucket"):
        store.put("a.bin", b"x")


def test_segmentation_keys_are_content_addressed():
    keys = segmentation_keys(SHA, "hybridgnet-1.0")
    base = f"segmentations/0f/{SHA}/hybridgnet-1.0"
    assert keys.as_dict() == {
        "record": f"{base}/record.json",
        "masks": f"{base}/masks.json",
        "right_lung": f"{base}/right_lung.png",
        "left_lung": f"{base}/left_lung.png",
        "heart": f"{base}/heart.png",
        "overlay": f"{base}/overlay.jpg",
        "picture": f"{base}/picture.jpg",
    }
    assert segmentation_keys(SHA, "hybridgnet-1.0") == keys
    with pytest.raises(ValueError):
        segmentation_keys("F" * 64, "m")
    with pytest.raises(ValueError):
        segmentation_keys(SHA, "../m")
