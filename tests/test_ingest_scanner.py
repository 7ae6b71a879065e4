"""Release scans of folders and S3 prefixes against a real index."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from chexmask.ingest.queue import Intake
from chexmask.ingest.registry import Registry
from chexmask.ingest.scanner import ReleaseScanner, ScanCounts
from chexmask.storage.index import MaskIndex


class ListQueue:
    """An IngestQueue keeping what it was given; fails after ``capacity`` arrivals."""

    def __init__(self, capacity: int | None = None):
        self.arrivals = []
        self.capacity = capacity

    def put(self, arrivals):
        if self.capacity is not None and len(self.arrivals) + len(arrivals) > self.capacity:
            raise ConnectionError("broker down")
        self.arrivals += arrivals


@pytest.fixture
def index(tmp_path):
    index = MaskIndex(f"sqlite:///{tmp_path / 'index.db'}")
    index.upgrade()
    yield index
    index.close()


def release_folder(root: Path) -> Path:
    for name in (
        "images_001/00000001_000.png",
        "images_001/00000001_001.png",
        "images_002/00000002_000.png",
        "Data_Entry_2017.csv",
        ".DS_Store",
        "images_002/.partial.png",
        "images_002/x.png.part",
    ):
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(name.encode())
    return root


def scanner(index, queue, tmp_path, **kwargs) -> ReleaseScanner:
    return ReleaseScanner(
        Intake(Registry(index), queue),
        dataset="nih",
        release="v1",
        state_dir=tmp_path / "scans",
        progress=False,
        **kwargs,
    )


def test_second_scan_queues_nothing_and_changes_are_found(tmp_path, index):
    root = release_folder(tmp_path / "nih")
    queue = ListQueue()
    assert scanner(index, queue, tmp_path).scan(str(root)) == ScanCounts(seen=3, new=3)
    assert sorted(a.dataset_image_id for a in queue.arrivals) == [
        "00000001_000.png",
        "00000001_001.png",
        "00000002_000.png",
    ]
    assert {a.release for a in queue.arrivals} == {"v1"}
    assert all(image.status == "queued" for image in index.images())  # registered once queued

    assert scanner(index, queue, tmp_path).scan(root.as_uri()) == ScanCounts(seen=3, skipped=3)
    assert len(queue.arrivals) == 3

    (root / "images_001/00000001_001.png").write_bytes(b"rewritten")
    (root / "images_003").mkdir()
    (root / "images_003/00000003_000.png").write_bytes(b"new")
    assert scanner(index, queue, tmp_path).scan(str(root)) == ScanCounts(seen=4, new=1, changed=1, skipped=2)
    assert sorted(a.uri.rsplit("/", 1)[1] for a in queue.arrivals[3:]) == ["00000001_001.png", "00000003_000.png"]


def test_interrupted_scan_resumes_after_the_last_page(tmp_path, index):
    root = release_folder(tmp_path / "nih")
    queue = ListQueue(capacity=2)
    with pytest.raises(ConnectionError):
        scanner(index, queue, tmp_path, page_size=2).scan(str(root))
    state = json.loads(next((tmp_path / "scans").glob("*.json")).read_text())
    assert state["last_key"] == "images_001/00000001_001.png"

    queue.capacity = None
    counts = scanner(index, queue, tmp_path, page_size=2).scan(str(root))
    assert counts == ScanCounts(seen=1, new=1)  # only what follows the saved key is listed
    assert [a.dataset_image_id for a in queue.arrivals] == ["00000001_000.png", "00000001_001.png", "00000002_000.png"]
    assert not list((tmp_path / "scans").glob("*.json"))  # complete: the next scan starts over
    assert scanner(index, queue, tmp_path).scan(str(root)) == ScanCounts(seen=3, skipped=3)


@pytest.fixture
def bucket(moto_endpoint, monkeypatch):
    from services import FAKE_AWS_ENV, s3_client

    for name, value in FAKE_AWS_ENV.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_endpoint)
    name = f"release-{uuid.uuid4().hex[:8]}"
    client = s3_client(moto_endpoint)
    client.create_bucket(Bucket=name)
    for key in (
        "mimic/files/p10/p10000032/s50414267/02aa804e.jpg",
        "mimic/files/p10/p10000032/s50414267/174413ec.jpg",
        "mimic/files/p11/p11000011/s51029426/2a2277a9.jpg",
        "mimic/files/",
        "mimic/README.txt",
        "mimic/.hidden.jpg",
        "other/files/p12/p12000012/s50000000/ffff.jpg",
    ):
        client.put_object(Bucket=name, Key=key, Body=key.encode())
    return name, client


@pytest.mark.services
def test_s3_prefix_scan(tmp_path, index, bucket):
    name, client = bucket
    queue = ListQueue()
    scan = ReleaseScanner(Intake(Registry(index), queue), release="2.0.0", state_dir=tmp_path, progress=False)
    assert scan.scan(f"s3://{name}/mimic/") == ScanCounts(seen=3, new=3)
    assert [(a.dataset, a.dataset_image_id) for a in queue.arrivals] == [
        ("mimic-cxr-jpg", "02aa804e"),
        ("mimic-cxr-jpg", "174413ec"),
        ("mimic-cxr-jpg", "2a2277a9"),
    ]
    assert all(a.etag and '"' not in a.etag and a.size for a in queue.arrivals)
    assert scan.scan(f"s3://{name}/mimic/") == ScanCounts(seen=3, skipped=3)
    client.put_object(Bucket=name, Key="mimic/files/p10/p10000032/s50414267/174413ec.jpg", Body=b"new bytes")
    assert scan.scan(f"s3://{name}/mimic") == ScanCounts(seen=3, changed=1, skipped=2)


@pytest.mark.services
def test_scan_command_queues_ingest_tasks_once(tmp_path, bucket, pg_database):
    """``chexmask scan`` twice against real Redis (broker) and PostgreSQL (index)."""
    name, _ = bucket
    broker, client = empty_redis_database()
    env = {
        **os.environ,
        "CHEXMASK_HOME": str(tmp_path),
        "CHEXMASK_BROKER_URL": broker,
        "CHEXMASK_DATABASE_URL": pg_database,
    }
    try:
        # The command itself, without the CLI group (whose other subsystems import torch).
        command = "from chexmask.app.pipeline_cli import scan_command; scan_command()"
        runs = [
            subprocess.run(
                [sys.executable, "-c", command, f"s3://{name}/mimic/", "--release", "2.0.0"],
                env=env,
                capture_output=True,
                text=True,
                timeout=120,
            )
            for _ in range(2)
        ]
        assert [r.returncode for r in runs] == [0, 0], runs[0].stderr + runs[1].stderr
        assert "3 seen, 3 new, 0 changed, 0 skipped" in runs[0].stdout
        assert "3 seen, 0 new, 0 changed, 3 skipped" in runs[1].stdout
        messages = [json.loads(m) for m in client.lrange("ingest", 0, -1)]
        assert len(messages) == 3
        assert {m["headers"]["task"] for m in messages} == {"chexmask.ingest"}
    finally:
        client.flushdb()


def empty_redis_database():
    """A broker URL on a Redis database nobody uses (so no worker takes the messages)."""
    import redis
    from services import redis_url, require_redis

    base = require_redis(redis_url()).rsplit("/", 1)[0]
    for number in range(15, 7, -1):
        client = redis.Redis.from_url(f"{base}/{number}")
        if client.dbsize() == 0:
            return f"{base}/{number}", client
    pytest.skip("no empty Redis database among 8-15")
