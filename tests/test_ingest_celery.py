"""The Celery application's settings, and the embedded SQLite broker."""

from __future__ import annotations

import sqlite3

import pytest

from chexmask.config import Settings
from chexmask.errors import ConfigError
from chexmask.ingest.queue import CeleryQueue
from chexmask.messages import Arrival
from chexmask.queues import INGEST_TASK, SCAN_TASK, SEGMENT_TASK
from chexmask.worker.celery_app import ScanPrefix, create_app, prune_sqlite_broker, scan_prefixes


def app_for(tmp_path, broker_url: str, **settings):
    return create_app(Settings(home=tmp_path, broker_url=broker_url, **settings))


def test_settings_read_the_queue_variables(monkeypatch):
    monkeypatch.setenv("CHEXMASK_VISIBILITY_TIMEOUT", "7200")
    monkeypatch.setenv("CHEXMASK_SCAN_PREFIXES", "s3://nih/images chestx-ray8")
    monkeypatch.setenv("CHEXMASK_SCAN_INTERVAL", "900")
    settings = Settings.from_env()
    assert (settings.visibility_timeout_s, settings.scan_prefixes, settings.scan_interval_s) == (
        7200,
        "s3://nih/images chestx-ray8",
        900,
    )
    monkeypatch.setenv("CHEXMASK_SCAN_INTERVAL", "soon")
    with pytest.raises(ConfigError, match="CHEXMASK_SCAN_INTERVAL"):
        Settings.from_env()


def test_delivery_guarantees(tmp_path):
    conf = app_for(tmp_path, "redis://127.0.0.1:6379/0", visibility_timeout_s=7200).conf
    assert conf.task_acks_late and conf.task_reject_on_worker_lost
    assert conf.worker_prefetch_multiplier == 1
    assert conf.broker_transport_options == {
        "visibility_timeout": 7200,
        "unacked_restore_interval": 10,
        "unacked_restore_throttle": 1,
        "unacked_mutex_expire": 30,
    }
    assert conf.task_routes[INGEST_TASK] == {"queue": "ingest"} and conf.task_routes[SEGMENT_TASK] == {
        "queue": "segment"
    }
    assert conf.task_ignore_result
    assert app_for(tmp_path, "amqp://guest:guest@127.0.0.1:5672//").conf.broker_transport_options == {
        "confirm_publish": True
    }


def test_default_broker_is_a_sqlite_file(tmp_path):
    app = create_app(Settings(home=tmp_path, broker_url=f"sqla+sqlite:///{tmp_path}/q/broker.db"))
    assert (tmp_path / "q").is_dir() and app.conf.broker_transport_options == {}


def test_scan_prefixes_and_beat_schedule(tmp_path):
    value = "s3://nih/images chestx-ray8 v1;\n/data/chexpert  chexpert ; s3://x/y"
    assert scan_prefixes(value) == [
        ScanPrefix("s3://nih/images", "chestx-ray8", "v1"),
        ScanPrefix("/data/chexpert", "chexpert"),
        ScanPrefix("s3://x/y"),
    ]
    with pytest.raises(ConfigError):
        scan_prefixes("s3://a b c d")
    schedule = app_for(
        tmp_path, "redis://127.0.0.1:6379/0", scan_prefixes=value, scan_interval_s=900
    ).conf.beat_schedule
    assert schedule["scan s3://nih/images"] == {
        "task": SCAN_TASK,
        "schedule": 900.0,
        "args": ("s3://nih/images", "chestx-ray8", "v1"),
    }
    assert len(schedule) == 3


def test_sqlite_broker_keeps_messages_until_taken_and_is_pruned(tmp_path):
    broker = f"sqla+sqlite:///{tmp_path / 'broker.db'}"
    app = app_for(tmp_path, broker)
    arrivals = [Arrival("file:///in/a.png", "generic", "a"), Arrival("file:///in/b.png", "generic", "b")]
    CeleryQueue(app).put(arrivals)
    with app.connection_for_read() as connection:
        queue = connection.SimpleQueue("ingest")
        message = queue.get(timeout=5)
        assert message.headers["task"] == INGEST_TASK
        assert message.payload[0] == [arrivals[0].to_dict()]
        message.ack()
        queue.close()
    assert prune_sqlite_broker(broker) == 1  # the delivered one; the other still waits
    with sqlite3.connect(tmp_path / "broker.db") as db:
        assert db.execute("SELECT count(*) FROM kombu_message WHERE visible = 1").fetchone() == (1,)


def test_a_dead_workers_task_returns_within_the_timeout_and_a_tenth(tmp_path):
    """kombu sweeps unacked messages every interval x throttle seconds (10 x 10 by
    default, which brought tasks back ~90 s after a 30 s timeout)."""
    options = app_for(tmp_path, "redis://127.0.0.1:6379/0", visibility_timeout_s=30).conf.broker_transport_options
    assert options["visibility_timeout"] == 30
    assert options["unacked_restore_interval"] * options["unacked_restore_throttle"] <= 3


def test_worker_names_expand_like_celery():
    import socket

    from chexmask.app.pipeline_cli import _expand_hostname

    assert _expand_hostname("gpu@%h") == f"gpu@{socket.gethostname()}"
    assert _expand_hostname(None) is None
