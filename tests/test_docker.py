"""docker/compose.yaml, checked without a Docker engine: every service runs a command
and options that exist, and the pieces that must agree (paths, keys, env) do."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import click
import pytest
import yaml

from chexmask.app.cli import cli

DOCKER = Path(__file__).resolve().parents[1] / "docker"


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((DOCKER / "compose.yaml").read_text())


@pytest.fixture(scope="module")
def services(compose) -> dict:
    return compose["services"]


def ours(service: dict) -> bool:
    return "build" in service or str(service.get("image", "")).startswith("chexmask-stream")


def resolve(args: list[str]) -> tuple[click.Command, click.Context]:
    """The chexmask (sub)command ``args`` name, parsed as click would parse them."""
    command: click.Command = cli
    name = "chexmask"
    while isinstance(command, click.Group):
        sub = args[0]
        found = command.get_command(click.Context(command), sub)
        assert found is not None, f"chexmask has no command {sub!r} ({' '.join(args)})"
        command, name, args = found, sub, args[1:]
    return command, command.make_context(name, list(args))


def test_dockerfiles_run_chexmask(services):
    for service in services.values():
        if "build" in service:
            dockerfile = DOCKER.parent / service["build"]["dockerfile"]
            text = dockerfile.read_text()
            assert 'ENTRYPOINT ["chexmask"]' in text, dockerfile
            for folder in ("chexmask", "worker", "ingest", "storage"):
                assert f"COPY {folder} {folder}" in text, (dockerfile, folder)
            assert service["build"]["context"] == ".."


def test_every_command_and_option_exists(services):
    checked = 0
    for name, service in services.items():
        if not ours(service):
            continue
        args = [str(a) for a in service.get("command", [])]
        if service.get("entrypoint") == ["celery"]:  # Flower
            app_module = args[args.index("--app") + 1]
            assert hasattr(importlib.import_module(app_module), "app"), name
            assert "flower" in args
            assert "flower" in (DOCKER / "Dockerfile").read_text()
            continue
        command, context = resolve(args)
        assert context.params is not None, name
        checked += 1
    assert checked >= 6


def test_the_pieces_agree(services):
    minio_env = services["minio"]["environment"]
    listener = [str(a) for a in services["listener"]["command"]]
    # The listener reads the list MinIO writes, in the format it parses.
    assert listener[listener.index("--redis-list") + 1] == minio_env["MINIO_NOTIFY_REDIS_KEY_PRIMARY"]
    assert minio_env["MINIO_NOTIFY_REDIS_FORMAT_PRIMARY"] == "access"
    assert listener[listener.index("--redis-url") + 1].endswith("/0")  # MinIO writes to database 0
    init = "\n".join(services["minio-init"]["command"])
    target_id = re.search(r"MINIO_NOTIFY_REDIS_\w+_(\w+)", " ".join(minio_env)).group(1)
    assert f"arn:minio:sqs::{target_id}:redis" in init and "mc event add" in init
    store_bucket = services["worker-cpu"]["environment"]["CHEXMASK_STORE_URL"].split("/")[2]
    assert f"local/{store_bucket}" in init

    # Workers read watched files by path: the same mount point everywhere.
    watched = [str(a) for a in services["watcher"]["command"]][-1]
    for worker in ("worker-cpu", "worker-gpu"):
        mounts = {v.split(":")[1] for v in services[worker]["volumes"]}
        assert watched in mounts, worker

    # The DICOM listener publishes the port it listens on; what it receives goes to the
    # shared S3 store, which every worker reads (checked for all services below).
    dicom = [str(a) for a in services["dicom-listener"]["command"]]
    port = dicom[dicom.index("--dicom-port") + 1]
    assert f"{port}:{port}" in services["dicom-listener"]["ports"] and port == "11112"
    assert services["dicom-listener"]["environment"]["CHEXMASK_STORE_URL"].startswith("s3://")

    # The QC workers send the DICOM outputs on; every worker's sweep retries failed sends.
    for worker in ("worker-cpu", "worker-gpu"):
        env = services[worker]["environment"]
        assert {"CHEXMASK_DICOM_DESTINATION", "CHEXMASK_STOW_DESTINATION"} <= set(env), worker

    gpu = services["worker-gpu"]
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    assert [str(a) for a in gpu["command"]][:3] == ["worker", "--queues", "segment"]
    assert gpu["build"]["dockerfile"].endswith("Dockerfile.gpu")
    cpu_queues = [str(a) for a in services["worker-cpu"]["command"]]
    assert set(cpu_queues[cpu_queues.index("--queues") + 1].split(",")) == {"ingest", "qc"}
    assert sum("--beat" in [str(a) for a in s.get("command", [])] for s in services.values()) == 1

    for name, service in services.items():
        if ours(service):
            env = service["environment"]
            assert env["CHEXMASK_BROKER_URL"].startswith("redis://redis:"), name
            assert env["CHEXMASK_DATABASE_URL"].startswith("postgresql://"), name
            assert env["AWS_ENDPOINT_URL"] == "http://minio:9000", name
    for infrastructure in ("redis", "postgres", "minio"):
        assert infrastructure in services
