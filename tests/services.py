"""Real services for tests: PostgreSQL, Redis and a moto S3 server over HTTP.

Each helper skips the calling test with a clear reason when its service is not
reachable, so the suite still runs (with fewer tests) on a bare machine. In CI
(the variable ``CI`` set, as CI systems do) it fails the test instead: there
``.ci/run`` starts the services, and a silent skip would hide that it did not.

The fixtures below are loaded once, as a plugin, by ``conftest.py``
(``pytest_plugins = ["services"]``), which keeps the session-scoped ones single
for the whole run.

- ``postgres_url()`` / ``redis_url()``: from ``CHEXMASK_TEST_PG_URL`` and
  ``CHEXMASK_TEST_REDIS_URL`` (defaults: the local servers).
- ``fresh_postgres_database()``: a uniquely named database, dropped afterwards.
- ``moto_s3_server()``: moto's standalone server on a free loopback port.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlparse

import pytest

DEFAULT_PG_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
FAKE_AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def postgres_url() -> str:
    return os.environ.get("CHEXMASK_TEST_PG_URL") or DEFAULT_PG_URL


def redis_url() -> str:
    return os.environ.get("CHEXMASK_TEST_REDIS_URL") or DEFAULT_REDIS_URL


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def unreachable(message: str) -> None:
    """Skip the calling test, or fail it in CI, where every service must be up."""
    if os.environ.get("CI"):
        pytest.fail(f"{message} (CI is set, so .ci/run should have started it)", pytrace=False)
    pytest.skip(message)


def require_postgres(url: str | None = None) -> str:
    """The URL, or skip the test when PostgreSQL does not answer there (fail in CI)."""
    import sqlalchemy as sa

    url = url or postgres_url()
    engine = sa.create_engine(_psycopg(url), connect_args={"connect_timeout": 3})
    try:
        with engine.connect() as connection:
            connection.execute(sa.text("SELECT 1"))
    except Exception as exc:
        unreachable(f"PostgreSQL not reachable at {_safe(url)} (set CHEXMASK_TEST_PG_URL): {exc}")
    finally:
        engine.dispose()
    return url


def require_redis(url: str | None = None) -> str:
    """The URL, or skip the test when Redis does not answer there (fail in CI)."""
    import redis

    url = url or redis_url()
    client = redis.Redis.from_url(url, socket_connect_timeout=3)
    try:
        client.ping()
    except Exception as exc:
        unreachable(f"Redis not reachable at {_safe(url)} (set CHEXMASK_TEST_REDIS_URL): {exc}")
    finally:
        client.close()
    return url


@contextmanager
def fresh_postgres_database(url: str | None = None) -> Iterator[str]:
    """Create a uniquely named database next to ``url``'s, yield its URL, drop it."""
    import sqlalchemy as sa

    admin_url = sa.engine.make_url(_psycopg(require_postgres(url)))
    name = f"chexmask_test_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as connection:
            connection.execute(sa.text(f'CREATE DATABASE "{name}"'))
        yield admin_url.set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as connection:
            connection.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@contextmanager
def moto_s3_server() -> Iterator[str]:
    """Run moto's S3 server on a free loopback port; yield its endpoint URL.

    Clients need credentials, any will do: see ``FAKE_AWS_ENV`` and ``s3_client``.
    """
    try:
        from moto.server import ThreadedMotoServer
    except ImportError as exc:
        pytest.skip(f"moto[server] is not installed: {exc}")
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


def s3_client(endpoint_url: str):
    """A boto3 S3 client for the moto server, with the fake credentials."""
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=endpoint_url,
        aws_access_key_id=FAKE_AWS_ENV["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=FAKE_AWS_ENV["AWS_SECRET_ACCESS_KEY"],
        region_name=FAKE_AWS_ENV["AWS_DEFAULT_REGION"],
    )


def _psycopg(url: str) -> str:
    # The bare "postgresql://" scheme would make SQLAlchemy look for psycopg2.
    scheme, _, rest = url.partition("://")
    return f"postgresql+psycopg://{rest}" if scheme in ("postgresql", "postgres") else url


def _safe(url: str) -> str:
    parsed = urlparse(url)
    return url.replace(f":{parsed.password}@", ":***@") if parsed.password else url


# --- pytest fixtures (import the ones a test module uses, with their dependencies) ---


@pytest.fixture(scope="session")
def pg_database() -> Iterator[str]:
    """One fresh PostgreSQL database for the whole session."""
    import sqlalchemy as sa

    with fresh_postgres_database() as url:
        engine = sa.create_engine(url, isolation_level="AUTOCOMMIT")
        with engine.connect() as connection:
            # Throwaway data: commits need not wait for the WAL flush.
            name = sa.engine.make_url(url).database
            connection.execute(sa.text(f'ALTER DATABASE "{name}" SET synchronous_commit = off'))
        engine.dispose()
        yield url


@pytest.fixture
def new_pg_database() -> Iterator[str]:
    """A fresh, empty PostgreSQL database for one test (slower than ``pg_database``)."""
    with fresh_postgres_database() as url:
        yield url


@pytest.fixture(scope="session")
def moto_endpoint() -> Iterator[str]:
    with moto_s3_server() as endpoint:
        yield endpoint


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.services)])
def index(request: pytest.FixtureRequest, tmp_path):
    """An empty, migrated MaskIndex on SQLite (a tmp file) and on PostgreSQL."""
    from chexmask.storage.index import MaskIndex

    if request.param == "sqlite":
        index = MaskIndex(f"sqlite:///{tmp_path / 'index.db'}")
        index.upgrade()
    else:
        index = MaskIndex(request.getfixturevalue("pg_database"))
        index.upgrade()  # a no-op after the first test
        _empty_postgres_tables(index)
    yield index
    index.close()


def _empty_postgres_tables(index) -> None:
    import sqlalchemy as sa

    # DELETE, not TRUNCATE: on tables this small it is ~30x faster.
    with index.engine.begin() as connection:
        for table in ("dicom_push", "comparison", "review", "segmentation", "source_image", "model_version"):
            connection.execute(sa.text(f"DELETE FROM {table}"))


@pytest.fixture
def fake_aws(monkeypatch) -> None:
    """Fake AWS credentials in the environment, so boto3 can sign requests."""
    for name, value in FAKE_AWS_ENV.items():
        monkeypatch.setenv(name, value)


@pytest.fixture
def unused_port() -> int:
    """A loopback port nothing listens on."""
    return free_port()


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.services)])
def store(request: pytest.FixtureRequest, tmp_path, monkeypatch):
    """An empty ObjectStore: a tmp folder, or a fresh bucket on the moto server."""
    from chexmask.storage.objectstore import open_store

    if request.param == "local":
        return open_store((tmp_path / "store").as_uri())
    endpoint = request.getfixturevalue("moto_endpoint")
    bucket = f"chexmask-{uuid.uuid4().hex[:12]}"
    s3_client(endpoint).create_bucket(Bucket=bucket)
    request.getfixturevalue("fake_aws")
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    return open_store(f"s3://{bucket}/masks")


def add_sample(
    index,
    name: str,
    *,
    dataset: str = "chestx-ray8",
    release: str | None = None,
    model: str = "hybridgnet-test",
    dice_mean: float | None = None,
    dice_max: float | None = None,
    landmarks_1024=None,
    landmarks_original=None,
    rle=None,
    rle_1024=None,
    height: int = 512,
    width: int = 512,
    object_keys: dict[str, str] | None = None,
    measurements: dict[str, Any] | None = None,
    landmark_std: list[float] | None = None,
):
    """Register an image called ``name`` and give it a segmentation (and QC when
    Dice values are given; uncertainty from 20 samples with ``landmark_std``).
    Returns ``(image, segmentation)``."""
    import hashlib

    from chexmask.status import ImageStatus

    sha = hashlib.sha256(f"{dataset}/{name}".encode()).hexdigest()
    image = index.register_image(
        uri=f"file:///data/{dataset}/{name}",
        dataset=dataset,
        release=release,
        dataset_image_id=name,
        sha256=sha,
        height=height,
        width=width,
    ).image
    points = [[i, 2 * i] for i in range(120)]
    masks = {"right_lung": "1 2", "left_lung": "10 3", "heart": "20 4"}
    segmentation, _ = index.add_segmentation(
        image_id=image.id,
        image_sha256=sha,
        model_version=model,
        weights_sha256="ab" * 32,
        landmarks_1024=landmarks_1024 or points,
        landmarks_original=landmarks_original or points,
        height=height,
        width=width,
        rle=rle or masks,
        rle_1024=rle_1024 or masks,
        object_keys=object_keys,
        measurements=measurements,
        landmark_std=landmark_std,
        uncertainty_samples=None if landmark_std is None else 20,
    )
    if dice_mean is not None or dice_max is not None:
        segmentation = index.set_qc(segmentation.id, dice_rca_mean=dice_mean, dice_rca_max=dice_max)
    image = index.mark(image.id, ImageStatus.DONE)
    return image, segmentation


@pytest.fixture
def sample(index):
    """``sample(name, **options)``: ``add_sample`` on the test's index."""

    def add(name: str, **options):
        return add_sample(index, name, **options)

    return add


@contextmanager
def embedded_service(home, weights=None, **fields: Any) -> Iterator[Any]:
    """A worker ``Service`` over an embedded index and store under ``home`` (no broker),
    its index upgraded; ``weights`` default to the bundled model; ``fields``: other
    ``Settings`` fields."""
    from chexmask.config import Settings
    from chexmask.worker.service import Service

    settings = Settings(
        home=home,
        database_url=f"sqlite:///{home / 'index.db'}",
        store_url=(home / "store").as_uri(),
        broker_url="",
        **({"weights": str(weights)} if weights is not None else {}),
        **fields,
    )
    service = Service(settings)
    try:
        service.index.upgrade()
        yield service
    finally:
        service.close()
