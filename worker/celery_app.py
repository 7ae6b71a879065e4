"""The Celery application: broker, routing and delivery guarantees.

``app`` is built from the environment on first use, as ``celery --app
chexmask.worker.celery_app`` (Flower, beat) expects; producers that only send
tasks build their own with ``create_app``. The queues and task names live in
``chexmask.queues``; this process's tasks in ``worker/tasks.py`` (segment, QC)
and ``ingest/tasks.py`` (ingest, scan), which ``chexmask worker`` loads.

Every task is acknowledged only when it has finished (``acks_late``), so a
worker that dies mid-task has its message delivered again; each stage is
idempotent through the index, so a redelivery never makes a second result.
"""

from __future__ import annotations

import logging
import sqlite3
from dataclasses import dataclass
from pathlib import Path

import sqlalchemy as sa
from celery import Celery
from kombu import Queue
from sqlalchemy.engine import make_url

from chexmask.config import Settings
from chexmask.errors import ConfigError
from chexmask.queues import INGEST_QUEUE, QUEUES, ROUTES, SCAN_TASK
from chexmask.storage.engine import enable_wal

log = logging.getLogger(__name__)

app: Celery  # built on first use, see __getattr__ below
DECLARE_ATTEMPTS = 3  # declare_queues: the tables, then the row, may each be raced once


@dataclass(frozen=True)
class ScanPrefix:
    uri: str
    dataset: str | None = None
    release: str | None = None


def scan_prefixes(value: str) -> list[ScanPrefix]:
    """Parse ``CHEXMASK_SCAN_PREFIXES``: entries ``URI [DATASET [RELEASE]]`` separated
    by ``;`` or new lines, e.g. ``s3://nih/images chestx-ray8 v1; /data/chexpert chexpert``."""
    prefixes = []
    for entry in value.replace("\n", ";").split(";"):
        words = entry.split()
        if not words:
            continue
        if len(words) > 3:
            raise ConfigError(f"CHEXMASK_SCAN_PREFIXES entry {entry.strip()!r}: expected URI [DATASET [RELEASE]]")
        prefixes.append(ScanPrefix(*words))
    return prefixes


def transport_options(broker_url: str, visibility_timeout: int) -> dict:
    scheme = broker_url.split("://", 1)[0]
    if scheme.startswith(("redis", "rediss")):
        # kombu restores unacknowledged messages only when it sweeps, every
        # unacked_restore_interval x unacked_restore_throttle seconds (10 x 10 by
        # default): a dead worker's task came back ~90 s after a 30 s timeout. Sweep
        # every tenth of the timeout (1-10 s) and on every call, so a task returns
        # within the timeout plus at most a tenth of it; a sweeper that dies
        # holding kombu's restore mutex blocks the others only for a few sweeps.
        interval = max(1, min(10, visibility_timeout // 10))
        return {
            "visibility_timeout": visibility_timeout,
            "unacked_restore_interval": interval,
            "unacked_restore_throttle": 1,
            "unacked_mutex_expire": max(10, 3 * interval),
        }
    if scheme.startswith("sqs"):
        return {"visibility_timeout": visibility_timeout}
    if scheme.startswith(("amqp", "pyamqp")):
        # A publish returns only once the broker holds the message ("safely queued").
        return {"confirm_publish": True}
    # Nothing for the SQLite broker: kombu passes its options on to create_engine,
    # so it polls at its default interval (1 s).
    return {}


def beat_schedule(prefixes: list[ScanPrefix], interval_s: int) -> dict:
    return {
        f"scan {p.uri}": {
            "task": SCAN_TASK,
            "schedule": float(interval_s),
            "args": (p.uri, p.dataset, p.release),
        }
        for p in prefixes
    }


def create_app(settings: Settings | None = None) -> Celery:
    settings = settings or Settings.from_env()
    _prepare_sqlite_broker(settings.broker_url)
    app = Celery("chexmask", broker=settings.broker_url)
    visibility = settings.visibility_timeout_s
    prefixes = scan_prefixes(settings.scan_prefixes)
    app.conf.update(
        task_routes=ROUTES,
        task_default_queue=INGEST_QUEUE,
        task_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,  # results live in the index and the store
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        # A task running when the broker connection drops is delivered again
        # elsewhere; cancelling it here avoids running it twice at once.
        worker_cancel_long_running_tasks_on_connection_loss=True,
        worker_prefetch_multiplier=1,
        broker_transport_options=transport_options(settings.broker_url, visibility),
        broker_connection_retry_on_startup=True,
        worker_send_task_events=True,  # for Flower
        task_send_sent_event=True,
        beat_schedule=beat_schedule(prefixes, settings.scan_interval_s),
        beat_schedule_filename=str(settings.home / "celerybeat-schedule"),
    )
    return app


def declare_queues(app: Celery) -> None:
    """Our queues declared before a producer sends anything (``open_intake``). kombu's
    SQL transport makes its tables, then a queue's row, on first use, each by a look
    then a write: producers starting together on a new broker file (listener
    processes sharing a port) both wrote, and the loser's first publish failed
    ("table kombu_queue already exists", or a UNIQUE violation). Here the loser
    looks again and finds them. Not in ``create_app``: the worker forks its pool
    after building the app, and an SQLite connection must not cross a fork."""
    if _sqlite_broker_path(app.conf.broker_url) is None:
        return
    for name in QUEUES:
        for attempt in range(1, DECLARE_ATTEMPTS + 1):
            try:
                with app.connection_for_write() as connection:
                    Queue(name).declare(channel=connection.default_channel)
                break
            except (sa.exc.IntegrityError, sa.exc.OperationalError):
                if attempt == DECLARE_ATTEMPTS:
                    raise


def _sqlite_broker_path(broker_url: str) -> Path | None:
    if not broker_url.startswith("sqla+sqlite"):
        return None
    database = make_url(broker_url.removeprefix("sqla+")).database
    return Path(database) if database and database != ":memory:" else None


def _prepare_sqlite_broker(broker_url: str) -> None:
    """The broker file's folder, and the file in WAL mode (kept by the file): a publish
    commits with one fsync instead of a rollback journal's several (20 -> 9 ms here),
    as durably, and the workers' polling reads no longer block it."""
    if (path := _sqlite_broker_path(broker_url)) is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        connection = sqlite3.connect(path, timeout=30)
        try:
            enable_wal(connection.cursor())
        finally:
            connection.close()


def prune_sqlite_broker(broker_url: str) -> int:
    """Delete delivered messages from the embedded broker; how many went.

    kombu's SQLAlchemy transport only hides a message once it is delivered and
    never deletes it, so the file would grow forever. Hidden rows are never read
    again: unacknowledged messages are restored from the worker's memory.
    """
    path = _sqlite_broker_path(broker_url)
    if path is None or not path.exists():
        return 0
    with sqlite3.connect(path, timeout=30) as connection:
        try:
            deleted = connection.execute("DELETE FROM kombu_message WHERE visible = 0").rowcount
        except sqlite3.OperationalError:  # no table yet: nothing was ever sent
            return 0
    log.info("pruned %d delivered messages from %s", deleted, path)
    return deleted


def __getattr__(name: str) -> Celery:
    # ``app`` on first use rather than on import: building it reads the environment
    # and, for the embedded broker, creates its folder.
    global app
    if name != "app":
        raise AttributeError(name)
    app = create_app()
    return app
