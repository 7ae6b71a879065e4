"""``chexmask reprocess``: segmentation tasks for the images a model has not done."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys

import pytest
from services import add_sample
from test_e2e_celery import empty_redis_databases

from chexmask.status import ImageStatus
from chexmask.storage.index import MaskIndex

pytestmark = [pytest.mark.services, pytest.mark.slow]  # two processes that import torch

REPROCESS = "from chexmask.app.pipeline_cli import reprocess_command; reprocess_command()"


def test_reprocess_queues_what_the_model_lacks(tmp_path, random_weights):
    import redis

    from chexmask.config import Settings
    from chexmask.worker.weights import resolve_weights

    version = resolve_weights(str(random_weights), Settings(home=tmp_path))[1].version
    index = MaskIndex(f"sqlite:///{tmp_path / 'index.db'}")
    index.upgrade()
    add_sample(index, "00000001_000.png", model=version)  # done by this model
    add_sample(index, "00000002_000.png", model="older-model")  # done by another only
    queued = index.register_image(uri="file:///in/a.png", dataset="nih").image
    refused = index.register_image(uri="file:///in/b.png", dataset="nih").image
    index.mark(refused.id, ImageStatus.REFUSED, "not_an_image", "no")
    other = index.register_image(uri="file:///in/c.png", dataset="padchest").image
    index.close()

    broker = empty_redis_databases(1)[0]
    env = {
        **os.environ,
        "CHEXMASK_HOME": str(tmp_path),
        "CHEXMASK_WEIGHTS": str(random_weights),
        "CHEXMASK_BROKER_URL": broker,
        "CHEXMASK_DATABASE_URL": f"sqlite:///{tmp_path / 'index.db'}",
    }
    client = redis.Redis.from_url(broker)
    try:
        run = subprocess.run(
            [sys.executable, "-c", REPROCESS, "--dataset", "nih"], env=env, capture_output=True, text=True, timeout=300
        )
        assert run.returncode == 0, run.stderr
        assert f"2 image(s) queued for {version}" in run.stdout
        messages = [json.loads(m) for m in client.lrange("segment", 0, -1)]
        assert {m["headers"]["task"] for m in messages} == {"chexmask.segment"}
        queued_ids = sorted(json.loads(base64.b64decode(m["body"]))[0][0] for m in messages)
        assert other.id not in queued_ids and queued.id in queued_ids and len(queued_ids) == 2

        wrong = subprocess.run(
            [sys.executable, "-c", REPROCESS, "--model", "someone-else"],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert wrong.returncode == 2 and f"workers segment with {version}" in wrong.stderr
    finally:
        client.flushdb()
