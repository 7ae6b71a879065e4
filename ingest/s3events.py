"""Object-created notifications from S3 (through SQS) and MinIO (Redis list, webhook).

All of them carry AWS's record format: ``{"Records": [{"eventName":
"ObjectCreated:Put", "s3": {"bucket": {"name": ...}, "object": {"key": ...,
"eTag": ..., "versionId": ..., "sequencer": ...}}}]}``, with keys URL-encoded
(``+`` for spaces) and, from MinIO, event names prefixed ``s3:``. Only
``ObjectCreated:*`` events are used; ``s3:TestEvent`` messages are skipped.

Notifications are delivered at least once: a listener drops repeats it has
seen (same bucket, key, version or ETag and sequencer), and ``Intake`` drops
objects the index already has. A message is deleted only once its work is
safely queued.
"""

from __future__ import annotations

import hmac
import json
import logging
import re
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any
from urllib.parse import unquote_plus

from fastapi import FastAPI, Header, HTTPException, Request
from starlette.concurrency import run_in_threadpool

from chexmask.files import ignored_name
from chexmask.ingest.queue import Intake, Offered
from chexmask.messages import Arrival

log = logging.getLogger(__name__)

DEDUPE_CAPACITY = 100_000


@dataclass(frozen=True)
class ObjectCreated:
    bucket: str
    key: str  # decoded
    etag: str | None = None
    version_id: str | None = None
    sequencer: str | None = None
    size: int | None = None

    @property
    def identity(self) -> tuple[str, str, str | None, str | None]:
        """Equal for repeats of one notification, different for a new upload of the key."""
        return (self.bucket, self.key, self.version_id or self.etag, self.sequencer)

    def arrival(self, dataset: str | None = None, release: str | None = None) -> Arrival:
        return Arrival.for_object(self.bucket, self.key, self.etag, self.size, dataset, release)


def parse(message: Any) -> list[ObjectCreated]:
    """The object-created events in a notification of any shape we receive: an S3/MinIO
    ``{"Records": [...]}`` (also MinIO's webhook body), an SNS envelope around one, or a
    MinIO Redis ``access``-format entry ``[{"Event": [...], "EventTime": ...}]``."""
    if isinstance(message, (str, bytes)):
        message = json.loads(message)
    if isinstance(message, list):
        return [event for entry in message for event in _records(entry.get("Event") or [])]
    if not isinstance(message, dict):
        raise ValueError(f"not an S3 notification: {type(message).__name__}")
    if "Records" in message:
        return _records(message["Records"] or [])
    if message.get("Type") == "Notification" and "Message" in message:
        return parse(message["Message"])
    if message.get("Event") == "s3:TestEvent":
        return []
    raise ValueError(f"not an S3 notification: keys {sorted(message)}")


def _records(records: Iterable[dict]) -> list[ObjectCreated]:
    events = []
    for record in records:
        name = str(record.get("eventName", "")).removeprefix("s3:")
        if not name.startswith("ObjectCreated:"):
            continue
        s3 = record["s3"]
        obj = s3["object"]
        events.append(
            ObjectCreated(
                bucket=s3["bucket"]["name"],
                key=unquote_plus(obj["key"]),
                etag=(obj.get("eTag") or obj.get("etag") or "").strip('"') or None,
                version_id=obj.get("versionId") or None,
                sequencer=obj.get("sequencer") or None,
                size=obj.get("size"),
            )
        )
    return events


class Deduper:
    """The identities of the last ``capacity`` events, forgetting the oldest first."""

    def __init__(self, capacity: int = DEDUPE_CAPACITY):
        self.capacity = capacity
        self._seen: OrderedDict[tuple, None] = OrderedDict()
        self._lock = threading.Lock()

    def fresh(self, events: Iterable[ObjectCreated]) -> list[ObjectCreated]:
        """Events not seen before (and not repeated within ``events``); remembers them."""
        fresh = []
        with self._lock:
            for event in events:
                if event.identity in self._seen:
                    self._seen.move_to_end(event.identity)
                    continue
                self._seen[event.identity] = None
                fresh.append(event)
            while len(self._seen) > self.capacity:
                self._seen.popitem(last=False)
        return fresh

    def forget(self, events: Iterable[ObjectCreated]) -> None:
        """Events whose queueing failed: they must pass again when redelivered."""
        with self._lock:
            for event in events:
                self._seen.pop(event.identity, None)


class Listener:
    """Turns notification messages into queued arrivals."""

    def __init__(
        self, intake: Intake, *, dataset: str | None = None, release: str | None = None, deduper: Deduper | None = None
    ):
        self.intake = intake
        self.dataset = dataset
        self.release = release
        self.deduper = deduper or Deduper()

    def handle(self, messages: Sequence[Any]) -> Offered:
        """Queue the images announced in ``messages``; raises if queueing failed (then
        nothing may be acknowledged). Unreadable messages are logged and skipped, and so
        are objects that are not images (hidden, temporary, other suffixes)."""
        events = []
        for message in messages:
            try:
                events += parse(message)
            except (ValueError, KeyError, TypeError) as exc:
                log.error("skipping a message that is not an S3 notification (%s): %.300r", exc, message)
        fresh = self.deduper.fresh(e for e in events if not ignored_name(PurePosixPath(e.key)))
        try:
            offered = self.intake.offer([e.arrival(self.dataset, self.release) for e in fresh])
        except BaseException:
            self.deduper.forget(fresh)
            raise
        offered.skipped += len(events) - len(fresh)
        return offered


class SqsListener:
    """Long-polls an SQS queue of S3 notifications."""

    def __init__(self, listener: Listener, queue_url: str, client: Any = None, wait_s: int = 20):
        import boto3

        self.listener = listener
        self.queue_url = queue_url
        self.client = client or boto3.client("sqs", region_name=_sqs_region(queue_url))
        self.wait_s = wait_s

    def poll(self) -> int:
        """One receive; the messages are deleted only after their objects are queued."""
        response = self.client.receive_message(
            QueueUrl=self.queue_url, MaxNumberOfMessages=10, WaitTimeSeconds=self.wait_s
        )
        messages = response.get("Messages", [])
        if not messages:
            return 0
        self.listener.handle([m["Body"] for m in messages])
        self.client.delete_message_batch(
            QueueUrl=self.queue_url,
            Entries=[{"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]} for i, m in enumerate(messages)],
        )
        return len(messages)

    def run(self, stop: threading.Event) -> None:
        _loop(self.poll, stop)


class RedisListListener:
    """Consumes MinIO's Redis notification target (``format=access``: a list of entries).

    Each entry is moved atomically to ``<key>:processing`` (BLMOVE, the reliable
    form of BLPOP) and removed from there once queued, so an entry in hand when
    the listener dies is picked up again at its next start.
    """

    def __init__(self, listener: Listener, client: Any, key: str, timeout_s: float = 1.0, batch: int = 100):
        self.listener = listener
        self.client = client
        self.key = key
        self.processing = f"{key}:processing"
        self.timeout_s = timeout_s
        self.batch = batch
        self._stranded = True  # entries a previous run took but did not queue

    def recover(self) -> int:
        """Finish entries taken earlier but not queued (a crash, or a failed hand-off)."""
        self._stranded = False
        leftover = self.client.lrange(self.processing, 0, -1)
        if leftover:
            self._finish(leftover)
        return len(leftover)

    def poll(self) -> int:
        recovered = self.recover() if self._stranded else 0
        first = self.client.blmove(self.key, self.processing, self.timeout_s, "LEFT", "RIGHT")
        if first is None:
            return recovered
        entries = [first]
        while len(entries) < self.batch and (more := self.client.lmove(self.key, self.processing, "LEFT", "RIGHT")):
            entries.append(more)
        self._finish(entries)
        return recovered + len(entries)

    def _finish(self, entries: list[bytes]) -> None:
        try:
            self.listener.handle(entries)
        except BaseException:
            self._stranded = True
            raise
        with self.client.pipeline() as pipe:
            for entry in entries:
                pipe.lrem(self.processing, 1, entry)
            pipe.execute()

    def run(self, stop: threading.Event) -> None:
        _loop(self.poll, stop)


def webhook_app(listener: Listener, token: str | None = None) -> FastAPI:
    """A FastAPI app for MinIO's webhook target: ``POST /events`` with the record JSON.

    With ``token`` set (MinIO's ``auth_token``), requests must carry it in the
    Authorization header, bare or as ``Bearer <token>``. A 2xx answer is given
    only once the objects are queued; otherwise MinIO keeps and resends the event.
    """
    app = FastAPI(title="chexmask MinIO webhook")

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok"}

    @app.post("/events")
    async def events(request: Request, authorization: str | None = Header(default=None)) -> dict:
        if token and not _token_matches(authorization, token):
            raise HTTPException(status_code=401, detail="missing or wrong token")
        body = await request.body()
        if not body.strip():  # MinIO checks the endpoint with an empty request
            return {"queued": 0}
        offered = await run_in_threadpool(listener.handle, [body])
        return {"queued": offered.new + offered.changed, "skipped": offered.skipped}

    return app


def _sqs_region(queue_url: str) -> str | None:
    """The region in an AWS queue URL (``https://sqs.<region>.amazonaws.com/...``), so no
    region setting is needed; None (the configured one) for other endpoints."""
    match = re.match(r"https://sqs\.([a-z0-9-]+)\.amazonaws\.com", queue_url)
    return match.group(1) if match else None


def _token_matches(header: str | None, token: str) -> bool:
    given = (header or "").removeprefix("Bearer ").strip()
    return hmac.compare_digest(given.encode(), token.encode())


def _loop(poll: Callable[[], int], stop: threading.Event) -> None:
    """Poll until ``stop``; errors (broker or network down) are logged and retried."""
    pause = 1.0
    while not stop.is_set():
        try:
            poll()
            pause = 1.0
        except Exception:
            log.exception("listener error; retrying in %.0f s", pause)
            stop.wait(pause)
            pause = min(pause * 2, 60.0)
