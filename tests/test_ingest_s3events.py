"""Bucket notifications: parsing, dedupe, and the SQS, Redis-list and webhook listeners."""

from __future__ import annotations

import json
import threading
import time
import uuid

import pytest

from chexmask.ingest.queue import Intake
from chexmask.ingest.registry import Registry
from chexmask.ingest.s3events import (
    Deduper,
    Listener,
    ObjectCreated,
    RedisListListener,
    SqsListener,
    _sqs_region,
    parse,
    webhook_app,
)
from chexmask.messages import Arrival
from chexmask.storage.index import MaskIndex


def record(
    key: str,
    event: str = "ObjectCreated:Put",
    bucket: str = "xrays",
    etag: str = "abc",
    sequencer: str | None = "0055AED6DCD90281E5",
    version: str | None = None,
) -> dict:
    obj = {"key": key, "size": 1234, "eTag": etag}
    if sequencer:
        obj["sequencer"] = sequencer
    if version:
        obj["versionId"] = version
    return {
        "eventVersion": "2.1",
        "eventSource": "aws:s3",
        "eventName": event,
        "s3": {"s3SchemaVersion": "1.0", "bucket": {"name": bucket}, "object": obj},
    }


class ListQueue:
    """An IngestQueue keeping what it was given; fails while ``broken``."""

    def __init__(self):
        self.arrivals: list[Arrival] = []
        self.broken = False

    def put(self, arrivals):
        if self.broken:
            raise ConnectionError("broker down")
        self.arrivals += arrivals


@pytest.fixture
def queue():
    return ListQueue()


@pytest.fixture
def listener(tmp_path, queue):
    index = MaskIndex(f"sqlite:///{tmp_path / 'index.db'}")
    index.upgrade()
    yield Listener(Intake(Registry(index), queue), release="2024")
    index.close()


# --- parsing ----------------------------------------------------------------------------


def test_aws_records_are_url_decoded_and_filtered():
    events = parse(
        json.dumps(
            {
                "Records": [
                    record("CheXpert-v1.0/train/patient00001/study1/view1+frontal%281%29.jpg"),
                    record("gone.png", event="ObjectRemoved:Delete"),
                    record("a+b%2Bc.png", event="s3:ObjectCreated:CompleteMultipartUpload", version="v7"),
                ]
            }
        )
    )
    assert [e.key for e in events] == ["CheXpert-v1.0/train/patient00001/study1/view1 frontal(1).jpg", "a b+c.png"]
    assert events[1].version_id == "v7" and events[1].etag == "abc" and events[1].size == 1234
    arrival = events[1].arrival(dataset="nih", release="v1")
    assert (arrival.uri, arrival.dataset, arrival.release, arrival.etag) == (
        "s3://xrays/a b+c.png",
        "chestx-ray8",
        "v1",
        "abc",
    )


def test_minio_access_entry_sns_envelope_and_test_event():
    minio = [
        {
            "Event": [record("images_001/00000001_000.png", event="s3:ObjectCreated:Put")],
            "EventTime": "2024-05-01T10:00:00.000Z",
        }
    ]
    assert [e.key for e in parse(json.dumps(minio).encode())] == ["images_001/00000001_000.png"]
    sns = {"Type": "Notification", "Message": json.dumps({"Records": [record("x.png")]})}
    assert [e.key for e in parse(sns)] == ["x.png"]
    assert parse({"Service": "Amazon S3", "Event": "s3:TestEvent", "Bucket": "xrays"}) == []
    with pytest.raises(ValueError):
        parse({"hello": "world"})


def test_deduper_keeps_new_uploads_and_drops_repeats():
    first = ObjectCreated("b", "k.png", etag="e1", sequencer="01")
    repeat = ObjectCreated("b", "k.png", etag="e1", sequencer="01")
    reupload = ObjectCreated("b", "k.png", etag="e1", sequencer="02")
    deduper = Deduper(capacity=2)
    assert deduper.fresh([first, repeat, reupload]) == [first, reupload]
    assert deduper.fresh([first]) == []  # seen again: now the most recent
    deduper.fresh([ObjectCreated("b", "other.png", sequencer="03")])  # pushes out the oldest
    assert deduper.fresh([reupload]) == [reupload]


def test_listener_queues_each_image_once(listener, queue):
    body = json.dumps({"Records": [record("images_001/00000001_000.png"), record("notes/readme.txt")]})
    offered = listener.handle([body, body, "not json at all"])
    assert [a.uri for a in queue.arrivals] == ["s3://xrays/images_001/00000001_000.png"]
    assert (offered.new, offered.skipped) == (1, 3)  # the repeat and two text files
    assert queue.arrivals[0].release == "2024"
    # A later duplicate from another listener instance is dropped by the index.
    other = Listener(listener.intake)
    assert other.handle([body]).skipped == 2 and len(queue.arrivals) == 1
    # A new version of the object is queued again.
    changed = json.dumps({"Records": [record("images_001/00000001_000.png", etag="new", sequencer="99")]})
    assert listener.handle([changed]).changed == 1 and len(queue.arrivals) == 2


def test_listener_forgets_events_it_could_not_queue(listener, queue):
    body = json.dumps({"Records": [record("a.png")]})
    queue.broken = True
    with pytest.raises(ConnectionError):
        listener.handle([body])
    queue.broken = False
    assert listener.handle([body]).new == 1


def test_sqs_region_comes_from_the_queue_url():
    assert _sqs_region("https://sqs.eu-west-1.amazonaws.com/123456789012/events") == "eu-west-1"
    assert _sqs_region("http://127.0.0.1:9324/000000000000/events") is None


# --- SQS (moto's server) --------------------------------------------------------------------


@pytest.fixture
def aws(moto_endpoint, monkeypatch):
    from services import FAKE_AWS_ENV

    for name, value in FAKE_AWS_ENV.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_endpoint)
    import boto3

    return boto3.client("s3"), boto3.client("sqs")


@pytest.mark.services
def test_sqs_messages_are_deleted_only_once_queued(aws, listener, queue):
    s3, sqs = aws
    bucket = f"xrays-{uuid.uuid4().hex[:8]}"
    s3.create_bucket(Bucket=bucket)
    url = sqs.create_queue(QueueName=bucket, Attributes={"VisibilityTimeout": "1"})["QueueUrl"]
    arn = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    s3.put_bucket_notification_configuration(
        Bucket=bucket,
        NotificationConfiguration={"QueueConfigurations": [{"QueueArn": arn, "Events": ["s3:ObjectCreated:*"]}]},
    )
    s3.put_object(Bucket=bucket, Key="ward 3/00000001_000.png", Body=b"one")
    s3.put_object(Bucket=bucket, Key="a+b.png", Body=b"two")
    sqs_listener = SqsListener(listener, url, client=sqs, wait_s=1)

    queue.broken = True  # the broker is down: nothing may be deleted
    with pytest.raises(ConnectionError):
        while sqs_listener.poll():
            pass
    queue.broken = False
    deadline = time.monotonic() + 20
    while len(queue.arrivals) < 2 and time.monotonic() < deadline:
        sqs_listener.poll()  # redelivered after the 1 s visibility timeout
    assert sorted(a.uri for a in queue.arrivals) == [f"s3://{bucket}/a+b.png", f"s3://{bucket}/ward 3/00000001_000.png"]
    assert queue.arrivals[0].etag and queue.arrivals[0].size == 3
    attributes = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["All"])["Attributes"]
    assert attributes["ApproximateNumberOfMessages"] == attributes["ApproximateNumberOfMessagesNotVisible"] == "0"


# --- MinIO: Redis list target and webhook --------------------------------------------------------


@pytest.mark.services
def test_redis_list_entries_survive_a_failed_hand_off(listener, queue):
    import redis
    from services import redis_url, require_redis

    client = redis.Redis.from_url(require_redis(redis_url()))
    key = f"chexmask-test-events-{uuid.uuid4().hex}"
    try:
        entry = json.dumps(
            [
                {
                    "Event": [record("images_001/00000001_000.png", event="s3:ObjectCreated:Put")],
                    "EventTime": "2024-05-01T10:00:00.000Z",
                }
            ]
        )
        client.rpush(key, entry)
        queue.broken = True
        source = RedisListListener(listener, client, key, timeout_s=0.1)
        with pytest.raises(ConnectionError):
            source.poll()
        assert client.llen(key) == 0 and client.llen(f"{key}:processing") == 1  # kept aside, not lost
        queue.broken = False
        source.poll()  # takes up the stranded entry first
        assert [a.uri for a in queue.arrivals] == ["s3://xrays/images_001/00000001_000.png"]
        assert client.llen(f"{key}:processing") == 0
        assert source.poll() == 0
    finally:
        client.delete(key, f"{key}:processing")


def test_webhook_checks_the_token_and_queues(listener, queue):
    from fastapi.testclient import TestClient

    client = TestClient(webhook_app(listener, token="s3cret"))
    body = {"EventName": "s3:ObjectCreated:Put", "Key": "xrays/a.png", "Records": [record("a.png")]}
    assert client.post("/events", json=body).status_code == 401
    assert client.post("/events", json=body, headers={"Authorization": "wrong"}).status_code == 401
    response = client.post("/events", json=body, headers={"Authorization": "Bearer s3cret"})
    assert response.status_code == 200 and response.json() == {"queued": 1, "skipped": 0}
    assert client.post("/events", content=b"", headers={"Authorization": "s3cret"}).json() == {"queued": 0}
    assert [a.uri for a in queue.arrivals] == ["s3://xrays/a.png"]
    queue.broken = True
    failing = TestClient(webhook_app(Listener(listener.intake)), raise_server_exceptions=False)
    body["Records"] = [record("b.png")]
    assert failing.post("/events", json=body).status_code == 500  # MinIO keeps it and resends


def test_listener_thread_stops(listener):
    stop = threading.Event()

    class Idle:
        def poll(self):
            stop.wait(0.05)
            return 0

    from chexmask.ingest.s3events import _loop

    thread = threading.Thread(target=_loop, args=(Idle().poll, stop))
    thread.start()
    stop.set()
    thread.join(2)
    assert not thread.is_alive()
