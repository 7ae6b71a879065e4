"""Settings (chexmask/config.py): the environment, .env, derived defaults, errors, secrets."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from fastapi.testclient import TestClient

from chexmask.app.cli import cli
from chexmask.config import DicomDestination, Settings, mask_url
from chexmask.errors import ConfigError


@pytest.fixture(autouse=True)
def clean_env(monkeypatch, tmp_path):
    """No CHEXMASK_* variable of the caller's, and no .env but the test's own."""
    import os

    for name in list(os.environ):
        if name.upper().startswith("CHEXMASK_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


def test_defaults_derive_from_home(tmp_path, monkeypatch):
    monkeypatch.setenv("CHEXMASK_HOME", str(tmp_path / "h"))
    settings = Settings.from_env()
    home = (tmp_path / "h").resolve()
    assert settings.home == home
    assert settings.database_url == f"sqlite:///{home / 'index.db'}"
    assert settings.store_url == (home / "store").as_uri()
    assert settings.broker_url == f"sqla+sqlite:///{home / 'broker.db'}"
    assert (settings.batch_size, settings.visibility_timeout_s, settings.scan_interval_s) == (2, 3600, 3600)
    assert (settings.log_format, settings.api_token, settings.s3_endpoint_url) == ("text", None, None)
    # Without CHEXMASK_HOME: ./.chexmask, made absolute.
    monkeypatch.delenv("CHEXMASK_HOME")
    assert Settings.from_env().home == (tmp_path / ".chexmask").resolve()


def test_embedded_broker_file_is_in_wal_mode(tmp_path):
    """One fsync per publish rather than a rollback journal's several; the mode is kept
    by the file, so kombu's own connections use it too."""
    import sqlite3

    from chexmask.worker.celery_app import create_app

    create_app(Settings(home=tmp_path))
    connection = sqlite3.connect(tmp_path / "broker.db")
    try:
        assert connection.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    finally:
        connection.close()


def _publish_once(home: str, start: Any) -> None:
    from chexmask.queues import INGEST_QUEUE
    from chexmask.worker.celery_app import create_app, declare_queues

    start.wait()  # every process at once, on a broker file none of them has seen
    app = create_app(Settings(home=Path(home)))
    declare_queues(app)  # as a producer's intake does (open_intake)
    app.send_task("chexmask.noop", queue=INGEST_QUEUE)


def test_producers_starting_together_on_a_new_broker_file_all_publish(tmp_path):
    """kombu's SQL transport makes a queue's row by a lookup, then an insert: producers
    starting at once (listener processes sharing a port) raced to insert it. Producers
    declare our queues first, and a loser of that race looks again."""
    import multiprocessing
    import sqlite3

    context = multiprocessing.get_context("spawn")
    start = context.Event()
    producers = [context.Process(target=_publish_once, args=(str(tmp_path), start)) for _ in range(4)]
    for producer in producers:
        producer.start()
    start.set()
    for producer in producers:
        producer.join(60)
    assert [p.exitcode for p in producers] == [0] * 4
    connection = sqlite3.connect(tmp_path / "broker.db")
    try:
        assert connection.execute("SELECT name, count(*) FROM kombu_queue GROUP BY name").fetchall() == [
            ("ingest", 1),
            ("qc", 1),
            ("segment", 1),
        ]
        assert connection.execute("SELECT count(*) FROM kombu_message").fetchone() == (4,)
    finally:
        connection.close()


def test_environment_is_parsed_and_typed(tmp_path, monkeypatch):
    monkeypatch.setenv("CHEXMASK_HOME", str(tmp_path))
    monkeypatch.setenv("CHEXMASK_DATABASE_URL", "postgresql://u:pw@db/chexmask")
    monkeypatch.setenv("CHEXMASK_BATCH_SIZE", "8")
    monkeypatch.setenv("CHEXMASK_MODEL_THREADS", "")  # empty: not set
    monkeypatch.setenv("CHEXMASK_SCAN_INTERVAL", "60")
    monkeypatch.setenv("CHEXMASK_VISIBILITY_TIMEOUT", "7200")
    monkeypatch.setenv("CHEXMASK_S3_ENDPOINT_URL", "http://minio:9000")
    monkeypatch.setenv("CHEXMASK_EVENTS_REDIS_URL", "redis://events:6379/1")
    monkeypatch.setenv("CHEXMASK_WEBHOOK_TOKEN", "hook-secret")
    monkeypatch.setenv("CHEXMASK_LOG_FORMAT", "json")
    settings = Settings.from_env()
    assert settings.database_url == "postgresql://u:pw@db/chexmask"
    assert settings.store_url == (tmp_path.resolve() / "store").as_uri()  # still derived
    assert (settings.batch_size, settings.model_threads) == (8, 0)
    assert (settings.scan_interval_s, settings.visibility_timeout_s) == (60, 7200)
    assert settings.s3_endpoint_url == "http://minio:9000"
    assert settings.events_redis_url == "redis://events:6379/1"
    assert settings.webhook_token.get_secret_value() == "hook-secret"
    assert settings.log_format == "json"
    # The field names are not variables of their own.
    monkeypatch.setenv("CHEXMASK_SCAN_INTERVAL_S", "5")
    monkeypatch.setenv("SCAN_INTERVAL_S", "5")
    assert Settings.from_env().scan_interval_s == 60


def test_keyword_arguments_win_and_keep_explicit_values(tmp_path, monkeypatch):
    monkeypatch.setenv("CHEXMASK_BATCH_SIZE", "8")
    settings = Settings(home=tmp_path, broker_url="", scan_interval_s=900, visibility_timeout_s=60, batch_size=3)
    assert (settings.broker_url, settings.scan_interval_s, settings.visibility_timeout_s, settings.batch_size) == (
        "",
        900,
        60,
        3,
    )
    assert settings.database_url == f"sqlite:///{tmp_path.resolve() / 'index.db'}"


def test_dotenv_file(tmp_path, monkeypatch):
    (tmp_path / ".env").write_text(
        "# deployment settings\n"
        "CHEXMASK_BATCH_SIZE=4\n"
        "CHEXMASK_API_TOKEN=from-dotenv\n"
        "CHEXMASK_SCAN_INTERVAL=120\n"
        "OTHER_TOOL_SETTING=ignored\n"
    )
    settings = Settings.from_env()
    assert (settings.batch_size, settings.scan_interval_s) == (4, 120)
    assert settings.api_token.get_secret_value() == "from-dotenv"
    monkeypatch.setenv("CHEXMASK_BATCH_SIZE", "6")  # the environment wins over .env
    assert Settings.from_env().batch_size == 6


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("CHEXMASK_SCAN_INTERVAL", "soon"),
        ("CHEXMASK_VISIBILITY_TIMEOUT", "1h"),
        ("CHEXMASK_BATCH_SIZE", "two"),
        ("CHEXMASK_LOG_FORMAT", "xml"),
        ("CHEXMASK_DICOM_DESTINATION", "pacs.local:104"),
        ("CHEXMASK_DICOM_DESTINATION", "PACS@pacs.local:70000"),
        ("CHEXMASK_DICOM_DESTINATION", "AN_AE_TITLE_TOO_LONG@pacs.local:104"),
        ("CHEXMASK_STOW_DESTINATION", "pacs.local/studies"),
        ("CHEXMASK_STOW_MAX_BYTES", "0"),
    ],
)
def test_malformed_values_name_the_variable(monkeypatch, name, value):
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError, match=name) as raised:
        Settings.from_env()
    assert repr(value) in str(raised.value)


def test_push_destinations_are_named_as_the_index_records_them(monkeypatch):
    assert Settings().push_destinations == []
    assert Settings(stow_destination="http://archive:8042/dicom-web/studies").push_destinations == [
        "stow:http://archive:8042/dicom-web/studies"
    ]
    monkeypatch.setenv("CHEXMASK_DICOM_DESTINATION", "PACS_1@[::1]:11112")
    monkeypatch.setenv("CHEXMASK_STOW_DESTINATION", "https://pacs.local/dicom-web/studies")
    settings = Settings.from_env()
    assert settings.push_destinations == ["dicom:PACS_1@[::1]:11112", "stow:https://pacs.local/dicom-web/studies"]
    assert DicomDestination.parse("PACS_1@[::1]:11112") == DicomDestination("PACS_1", "::1", 11112)


def test_malformed_dotenv_value_names_the_variable(tmp_path):
    (tmp_path / ".env").write_text("CHEXMASK_BATCH_SIZE=soon\n")
    with pytest.raises(ConfigError, match="CHEXMASK_BATCH_SIZE: must be a whole number"):
        Settings.from_env()


def test_the_cli_reports_a_malformed_variable(monkeypatch, capsys):
    from chexmask.app.cli import main

    monkeypatch.setenv("CHEXMASK_SCAN_INTERVAL", "soon")
    monkeypatch.setattr("sys.argv", ["chexmask", "db", "current"])
    with pytest.raises(SystemExit) as exited:
        main()
    assert exited.value.code == 2
    assert "CHEXMASK_SCAN_INTERVAL" in capsys.readouterr().err


def test_secrets_are_not_shown():
    settings = Settings(api_token="t0p-secret", webhook_token="hook-secret", stow_destination_token="stow-secret")
    assert "t0p-secret" not in repr(settings) and "t0p-secret" not in str(settings)
    assert "hook-secret" not in repr(settings) and "stow-secret" not in repr(settings)
    assert settings.api_token.get_secret_value() == "t0p-secret"


@pytest.mark.parametrize(
    ("url", "masked"),
    [
        ("postgresql://chexmask:s3cret@db:5432/index", "postgresql://chexmask:***@db:5432/index"),
        ("postgresql+psycopg://u:p%40ss@db/x?sslmode=require", "postgresql+psycopg://u:***@db/x?sslmode=require"),
        ("redis://:s3cret@redis:6379/0", "redis://:***@redis:6379/0"),
        ("amqp://guest:guest@rabbit//", "amqp://guest:***@rabbit//"),
        ("postgresql://chexmask@db/index", "postgresql://chexmask@db/index"),
        ("sqlite:////data/index.db", "sqlite:////data/index.db"),
        ("s3://bucket/prefix", "s3://bucket/prefix"),
        ("", ""),
    ],
)
def test_mask_url(url, masked):
    assert mask_url(url) == masked


def test_db_current_masks_the_password(monkeypatch, unused_port):
    url = f"postgresql://chexmask:s3cret-pw@127.0.0.1:{unused_port}/index"
    monkeypatch.setenv("CHEXMASK_DATABASE_URL", url)
    result = CliRunner().invoke(cli, ["db", "current"])
    assert result.exit_code != 0  # nobody listens there
    assert f"index postgresql://chexmask:***@127.0.0.1:{unused_port}/index" in result.output
    assert "s3cret-pw" not in result.output


def test_health_does_not_show_the_database(tmp_path, unused_port):
    from chexmask.storage.api import create_app

    url = f"postgresql://chexmask:s3cret-pw@127.0.0.1:{unused_port}/index"
    with TestClient(create_app(Settings(database_url=url, store_url=tmp_path.as_uri()))) as client:
        response = client.get("/health")
    assert response.status_code == 503
    body = response.text
    assert "s3cret-pw" not in body and "127.0.0.1" not in body and str(unused_port) not in body
    assert "chexmask" not in body.replace("chexmask-stream", "")


def test_s3_store_endpoint_comes_from_the_settings(monkeypatch, fake_aws):
    from chexmask.storage.objectstore import open_store

    monkeypatch.setenv("CHEXMASK_S3_ENDPOINT_URL", "http://127.0.0.1:9")
    assert open_store("s3://bucket/x").client.meta.endpoint_url == "http://127.0.0.1:9"
    explicit = open_store("s3://bucket/x", Settings(s3_endpoint_url="http://127.0.0.1:10").s3_endpoint_url)
    assert explicit.client.meta.endpoint_url == "http://127.0.0.1:10"


def test_chexmask_variables_are_read_only_in_config():
    """Every CHEXMASK_* variable goes through Settings: no other module reads the environment."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    readers = re.compile(r"os\.environ|getenv|envvar=")
    offenders = []
    for folder in ("chexmask", "storage", "worker", "ingest", "app"):
        for path in (root / folder).rglob("*.py"):
            if path.name == "config.py" and path.parent.name == "chexmask":
                continue
            if readers.search(path.read_text()):
                offenders.append(str(path.relative_to(root)))
    assert offenders == []
