"""End to end, scaled out: real Celery workers (subprocesses) on Redis, the index on
PostgreSQL, images and masks on moto's S3 server, notifications through its SQS.

Slow: each worker process starts torch and loads the model; each real image is
a forward pass of a few seconds on a CPU.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from chexmask.config import Settings
from chexmask.ingest.queue import CeleryQueue
from chexmask.messages import Arrival
from chexmask.status import ImageStatus
from chexmask.storage.index import MaskIndex
from chexmask.storage.models import SourceImage
from chexmask.worker.celery_app import create_app

pytestmark = [pytest.mark.services, pytest.mark.slow]

WORKER_START_S = 180  # torch import and model load on a busy CPU
CORRUPT_PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 64


# --- harness ---------------------------------------------------------------------------------


def wait_for(what: str, predicate: Callable[[], object], timeout: float = 180.0) -> object:
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)
    return value


class Process:
    """A chexmask command in its own process, its output in a log file."""

    def __init__(self, code: str, args: list[str], env: dict[str, str], log: Path):
        self.log = log
        self._file = log.open("wb")
        self.popen = subprocess.Popen(
            [sys.executable, "-c", code, *args], env=env, stdout=self._file, stderr=subprocess.STDOUT
        )

    @classmethod
    def cli(cls, args: list[str], env: dict[str, str], log: Path) -> Process:
        """``chexmask ARGS`` as installed."""
        return cls("from chexmask.app.cli import main; main()", args, env, log)

    @classmethod
    def ingest_command(cls, name: str, args: list[str], env: dict[str, str], log: Path) -> Process:
        """One ingest command on its own: the CLI group also imports the model's subsystems,
        which watchers and listeners do not need (seconds of startup on this CPU)."""
        return cls(f"from chexmask.app.pipeline_cli import {name}_command as c; c()", args, env, log)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_output(self, text: str, timeout: float = WORKER_START_S) -> None:
        wait_for(
            f"{text!r} in {self.log.name}", lambda: text in self.output() or self.popen.poll() is not None, timeout
        )
        assert text in self.output(), self.output()[-3000:]

    def stop(self) -> int:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(60)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        self._file.close()
        return self.popen.returncode

    def kill(self) -> None:
        self.popen.send_signal(signal.SIGKILL)
        self.popen.wait()
        self._file.close()


@dataclass
class Stack:
    env: dict[str, str]
    index: MaskIndex
    endpoint: str
    tmp: Path

    def with_broker(self, broker_url: str, **extra: str) -> dict[str, str]:
        return {**self.env, "CHEXMASK_BROKER_URL": broker_url, **extra}

    def queue(self, broker_url: str) -> CeleryQueue:
        return CeleryQueue(create_app(Settings(home=self.tmp, broker_url=broker_url)))

    def image(self, uri: str) -> SourceImage | None:
        from sqlmodel import Session, select

        with Session(self.index.engine) as session:
            return session.exec(select(SourceImage).where(SourceImage.uri == uri)).first()

    def final(self, uri: str) -> SourceImage | None:
        image = self.image(uri)
        return image if image is not None and image.status.final else None

    def segmentations(self, sha256: str) -> list:
        from sqlmodel import Session, select

        from chexmask.storage.models import Segmentation

        with Session(self.index.engine) as session:
            return list(session.exec(select(Segmentation).where(Segmentation.image_sha256 == sha256)))


def empty_redis_databases(count: int) -> list[str]:
    import redis
    from services import redis_url, require_redis

    base = require_redis(redis_url()).rsplit("/", 1)[0]
    free = [f"{base}/{n}" for n in range(15, 0, -1) if redis.Redis.from_url(f"{base}/{n}").dbsize() == 0]
    if len(free) < count:
        pytest.skip(f"needs {count} empty Redis databases")
    return free[:count]


@pytest.fixture(scope="module")
def stack(tmp_path_factory, random_weights) -> Iterator[Stack]:
    from services import FAKE_AWS_ENV, fresh_postgres_database, moto_s3_server, s3_client

    tmp = tmp_path_factory.mktemp("e2e")
    with fresh_postgres_database() as database_url, moto_s3_server() as endpoint, pytest.MonkeyPatch.context() as mp:
        aws = {**FAKE_AWS_ENV, "AWS_ENDPOINT_URL": endpoint}
        for name, value in aws.items():
            mp.setenv(name, value)
        s3_client(endpoint).create_bucket(Bucket="masks")
        env = {
            **os.environ,
            **aws,
            "CHEXMASK_HOME": str(tmp / "home"),
            "CHEXMASK_DATABASE_URL": database_url,
            "CHEXMASK_STORE_URL": "s3://masks/v1",
            "CHEXMASK_WEIGHTS": str(random_weights),
            "PYTHONUNBUFFERED": "1",
        }
        index = MaskIndex(database_url)
        index.upgrade()
        yield Stack(env, index, endpoint, tmp)
        index.close()


@pytest.fixture(scope="module")
def broker(stack) -> Iterator[str]:
    import redis

    url = empty_redis_databases(1)[0]
    yield url
    redis.Redis.from_url(url).flushdb()


@pytest.fixture(scope="module")
def worker(stack, broker) -> Iterator[Process]:
    process = Process.cli(
        ["worker", "--queues", "ingest,segment,qc", "--concurrency", "4"],
        stack.with_broker(broker),
        stack.tmp / "worker.log",
    )
    process.wait_output(" ready.")
    yield process
    assert process.stop() == 0, process.output()[-3000:]


def store_keys(stack: Stack, sha256: str) -> list[str]:
    from services import s3_client

    listing = s3_client(stack.endpoint).list_objects_v2(
        Bucket="masks", Prefix=f"v1/segmentations/{sha256[:2]}/{sha256}/"
    )
    return sorted(item["Key"].rsplit("/", 1)[1] for item in listing.get("Contents", []))


ARTEFACTS = ["heart.png", "left_lung.png", "masks.json", "overlay.jpg", "picture.jpg", "record.json", "right_lung.png"]


# --- tests ------------------------------------------------------------------------------------------


def test_folder_drops_through_a_restarted_watcher(stack, broker, worker, samples_dir):
    inbox = stack.tmp / "inbox"
    env = stack.with_broker(broker)
    watcher = Process.ingest_command("watch", [str(inbox)], env, stack.tmp / "watch-1.log")
    watcher.wait_output("watching")
    assert watcher.stop() == 0

    # Files arrive while no watcher runs.
    (inbox / "images_001").mkdir(parents=True)
    real = inbox / "images_001" / "00000001_000.png"
    real.write_bytes((samples_dir / "00000001_000.png").read_bytes())
    corrupt = inbox / "corrupt.png"
    corrupt.write_bytes(CORRUPT_PNG)
    (inbox / "notes.txt").write_text("not an image")

    watcher = Process.ingest_command("watch", [str(inbox)], env, stack.tmp / "watch-2.log")
    try:
        done = wait_for("the image segmented", lambda: stack.final(real.absolute().as_uri()))
        refused = wait_for("the corrupt file refused", lambda: stack.final(corrupt.absolute().as_uri()))
    finally:
        watcher.stop()

    assert (done.status, done.dataset, done.dataset_image_id) == (ImageStatus.DONE, "chestx-ray8", "00000001_000.png")
    assert refused.status is ImageStatus.REFUSED and refused.refusal_code and refused.reason
    assert stack.image((inbox / "notes.txt").absolute().as_uri()) is None
    [segmentation] = stack.segmentations(done.sha256)
    assert store_keys(stack, done.sha256) == ARTEFACTS
    assert sorted(segmentation.object_keys) == sorted(Path(a).stem for a in ARTEFACTS)
    assert {"ingest", "queue_wait", "inference", "store"} <= set(segmentation.timings)
    record = json.loads(_s3_get(stack, "masks", f"v1/{segmentation.object_keys['record']}"))
    assert record["sha256"] == done.sha256 and len(record["landmarks_original"]) == 120
    wait_for("QC", lambda: stack.segmentations(done.sha256)[0].qc_status != "pending", timeout=60)


def test_bucket_object_announced_three_times_gives_one_result(stack, broker, worker, samples_dir):
    from services import s3_client

    s3 = s3_client(stack.endpoint)
    import boto3

    sqs = boto3.client("sqs")
    bucket = "xrays"
    s3.create_bucket(Bucket=bucket)
    url = sqs.create_queue(QueueName=f"events-{uuid.uuid4().hex[:8]}")["QueueUrl"]
    arn = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    s3.put_bucket_notification_configuration(
        Bucket=bucket,
        NotificationConfiguration={"QueueConfigurations": [{"QueueArn": arn, "Events": ["s3:ObjectCreated:*"]}]},
    )
    listener = Process.ingest_command(
        "listen", ["--sqs-queue-url", url], stack.with_broker(broker), stack.tmp / "listen.log"
    )
    key = "CheXpert-v1.0/train/patient00001/study1/view1_frontal.jpg"
    try:
        listener.wait_output("listening")
        etag = s3.put_object(Bucket=bucket, Key=key, Body=(samples_dir / "16747_3_1.jpg").read_bytes())["ETag"]
        # At-least-once delivery: the same notification twice more.
        duplicate = {
            "Records": [
                {
                    "eventName": "ObjectCreated:Put",
                    "s3": {
                        "bucket": {"name": bucket},
                        "object": {"key": key.replace("/", "%2F"), "eTag": etag.strip('"'), "size": 1},
                    },
                }
            ]
        }
        for _ in range(2):
            sqs.send_message(QueueUrl=url, MessageBody=json.dumps(duplicate))
        uri = f"s3://{bucket}/{key}"
        image = wait_for("the object segmented", lambda: stack.final(uri))
        wait_for("the notifications consumed", lambda: _sqs_empty(sqs, url), timeout=60)
    finally:
        listener.stop()

    # And a redelivered segmentation task for it.
    stack.queue(broker).app.send_task("chexmask.segment", args=[image.id], queue="segment")
    wait_for("the broker drained", lambda: _redis_idle(broker), timeout=60)

    assert (image.status, image.dataset, image.dataset_image_id) == (ImageStatus.DONE, "chexpert", key)
    assert stack.image(uri).attempts == 1  # processed once
    assert len(stack.segmentations(image.sha256)) == 1
    assert store_keys(stack, image.sha256) == ARTEFACTS


def test_a_killed_worker_has_its_task_redelivered(stack, samples_dir):
    """SIGKILL a worker mid-segmentation; the next worker finishes the job (Redis
    visibility timeout shortened to 3 s for the test)."""
    import redis

    broker = empty_redis_databases(1)[0]
    env = stack.with_broker(broker, CHEXMASK_VISIBILITY_TIMEOUT="3")
    source = stack.tmp / "kill" / "utils_example1.jpg"
    source.parent.mkdir()
    source.write_bytes((samples_dir / "utils_example1.jpg").read_bytes())
    uri = source.absolute().as_uri()
    try:
        first = Process.cli(["worker", "--concurrency", "2"], env, stack.tmp / "worker-killed.log")
        first.wait_output(" ready.")
        stack.queue(broker).put([Arrival.for_file(source)])
        wait_for(
            "the segmentation to start",
            lambda: (i := stack.image(uri)) and i.status is ImageStatus.PROCESSING,
            timeout=120,
        )
        first.kill()
        image = stack.image(uri)
        assert image.status is ImageStatus.PROCESSING and not stack.segmentations(image.sha256)

        time.sleep(4)  # past the visibility timeout
        second = Process.cli(["worker", "--concurrency", "2"], env, stack.tmp / "worker-second.log")
        try:
            done = wait_for("the redelivered task done", lambda: stack.final(uri))
        finally:
            second.stop()
    finally:
        redis.Redis.from_url(broker).flushdb()
    assert done.status is ImageStatus.DONE and done.attempts == 2
    assert len(stack.segmentations(done.sha256)) == 1
    assert store_keys(stack, done.sha256) == ARTEFACTS


# --- helpers -----------------------------------------------------------------------------------------


def _s3_get(stack: Stack, bucket: str, key: str) -> bytes:
    from services import s3_client

    return s3_client(stack.endpoint).get_object(Bucket=bucket, Key=key)["Body"].read()


def _sqs_empty(sqs, url: str) -> bool:
    attributes = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["All"])["Attributes"]
    return attributes["ApproximateNumberOfMessages"] == attributes["ApproximateNumberOfMessagesNotVisible"] == "0"


def _redis_idle(broker: str) -> bool:
    import redis

    client = redis.Redis.from_url(broker)
    return all(client.llen(q) == 0 for q in ("ingest", "segment", "qc")) and client.hlen("unacked") == 0
