"""The pipeline stages (worker/service.py, ingest/registry.py): retries, and one real image end to end."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from services import embedded_service

from chexmask.errors import NotFound, RefusedInput, TransientError
from chexmask.ingest.registry import Registry
from chexmask.messages import Arrival
from chexmask.retry import RETRY, RetryPolicy
from chexmask.status import ImageStatus, QCStatus
from chexmask.worker.service import Service


def test_retry_policy():
    assert RETRY.retries_for(RefusedInput("not_an_image", "no")) == 0
    assert RETRY.retries_for(NotFound("no segmentation with id 7")) == 0
    assert RETRY.retries_for(TransientError("S3 SlowDown")) == 5
    assert RETRY.retries_for(KeyError("bug")) == 2
    delays = [RETRY.delay(n) for n in range(12)]
    assert delays[0] <= 5 and 20 <= delays[3] <= 40 and max(delays) <= 600
    assert RETRY.next_delay(TransientError("x"), 4) is not None and RETRY.next_delay(TransientError("x"), 5) is None


def test_retry_run_waits_between_tries_and_gives_up_with_the_last_error():
    policy = RetryPolicy(transient_retries=2, backoff_s=1.0)
    calls, waits = [], []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise TransientError(f"hiccup {len(calls)}")
        return "done"

    assert policy.run(flaky, sleep=waits.append) == "done"
    assert len(calls) == 3 and len(waits) == 2 and 0.5 <= waits[0] <= 1 and 1 <= waits[1] <= 2

    def broken():
        calls.append(1)
        raise TransientError("down")

    calls.clear()
    with pytest.raises(TransientError, match="down"):
        policy.run(broken, sleep=waits.append)
    assert len(calls) == 3  # the first try and two retries
    calls.clear()
    with pytest.raises(RefusedInput):
        policy.run(
            lambda: (calls.append(1), (_ for _ in ()).throw(RefusedInput("truncated", "cut")))[1], sleep=waits.append
        )
    assert len(calls) == 1  # never retried


# --- one real image through the real model -----------------------------------------------------


@pytest.fixture(scope="module")
def service(tmp_path_factory, random_weights):
    with embedded_service(tmp_path_factory.mktemp("home"), random_weights) as service:
        yield service


def arrival_for(path: Path) -> Arrival:
    return Arrival.for_file(path)


def admit(service: Service, path: Path):
    return Registry(service.index).admit(arrival_for(path))


def test_segment_writes_the_store_and_the_index_once(service, samples_dir, tmp_path):
    source = tmp_path / "images_001" / "00000001_000.png"
    source.parent.mkdir()
    source.write_bytes((samples_dir / "00000001_000.png").read_bytes())
    ingested = admit(service, source)
    assert ingested is not None
    result = service.segment(ingested.image_id, timings={"ingest": ingested.seconds})
    assert result.status is ImageStatus.DONE and result.qc_pending and not result.reused

    image = service.index.get_image(ingested.image_id)
    assert (image.status, image.dataset, image.dataset_image_id, image.attempts) == (
        ImageStatus.DONE,
        "chestx-ray8",
        "00000001_000.png",
        1,
    )
    row = service.index.get_segmentation(result.segmentation_id)
    padding = result.prepared.padding
    assert (image.height, image.width) == (row.height, row.width) == (padding.height, padding.width)
    assert set(row.object_keys) == {"record", "masks", "right_lung", "left_lung", "heart", "overlay", "picture"}
    for key in row.object_keys.values():
        assert service.store.exists(key), key
    record = json.loads(service.store.get(row.object_keys["record"]))
    masks = json.loads(service.store.get(row.object_keys["masks"]))
    assert record["sha256"] == image.sha256 == row.image_sha256
    assert masks["rle"] == row.rle() and masks["rle_1024"] == row.rle("1024")
    assert record["landmarks_original"] == row.landmarks_original
    assert service.store.get(row.object_keys["overlay"]).startswith(b"\xff\xd8")  # JPEG
    # The plain picture under the web app's layers: the 1024 input itself, no organ tint.
    picture = cv2.imdecode(np.frombuffer(service.store.get(row.object_keys["picture"]), np.uint8), cv2.IMREAD_UNCHANGED)
    assert picture.shape == (1024, 1024)
    assert np.abs(picture.astype(int) - result.prepared.image.astype(int)).mean() < 2
    assert {"ingest", "fetch", "decode", "preprocess", "inference", "store"} <= set(row.timings)

    # Redelivered: nothing is computed or written again.
    again = service.segment(ingested.image_id)
    assert again.reused and again.segmentation_id == row.id
    assert service.index.get_image(ingested.image_id).attempts == 1
    # A duplicate announcement of the same file is dropped at ingest.
    assert admit(service, source) is None
    # The same bytes under another name reuse the segmentation.
    copy = tmp_path / "copy.png"
    copy.write_bytes(source.read_bytes())
    other = admit(service, copy)
    assert service.segment(other.image_id).segmentation_id == row.id
    assert service.index.has_segmentation(image.sha256, service.model.version)

    assert service.qc(row.id, result.prepared.image) is QCStatus.DONE  # the bundled reference bank
    qc_row = service.index.get_segmentation(row.id)
    assert qc_row.qc_status is QCStatus.DONE and qc_row.qc_flags is not None
    assert 0 <= qc_row.dice_rca_mean <= qc_row.dice_rca_max <= 1


@pytest.mark.slow
def test_refused_and_missing_sources(service, tmp_path):
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    ingested = admit(service, corrupt)
    result = service.segment(ingested.image_id)
    assert result.status is ImageStatus.REFUSED and result.code
    image = service.index.get_image(ingested.image_id)
    assert (image.status, image.refusal_code, image.reason) == (ImageStatus.REFUSED, result.code, result.reason)
    assert service.segment(ingested.image_id).status is ImageStatus.REFUSED  # never retried
    assert service.index.get_image(ingested.image_id).attempts == 1

    gone = tmp_path / "gone.png"
    gone.write_bytes(b"x")
    ingested = admit(service, gone)
    gone.unlink()
    assert admit(service, corrupt) is None
    result = service.segment(ingested.image_id)
    assert result.status is ImageStatus.FAILED and "not found" in result.reason
    assert service.index.get_image(ingested.image_id).status is ImageStatus.FAILED


def test_an_image_that_keeps_killing_workers_ends_failed(service, samples_dir, tmp_path):
    """Each redelivery after a worker death leaves the image 'processing' with one more
    attempt; at the cap it is failed with a reason instead of delivered forever."""
    source = tmp_path / "poison.png"
    # Content no other test segments (a stored result would be reused, not retried).
    source.write_bytes((samples_dir / "00000001_000.png").read_bytes() + b"poison")
    ingested = admit(service, source)
    for _ in range(RETRY.max_attempts):
        service.index.mark(ingested.image_id, ImageStatus.PROCESSING)  # a worker took it, then died
    result = service.segment(ingested.image_id)
    assert result.status is ImageStatus.FAILED and "gave up after" in result.reason
    image = service.index.get_image(ingested.image_id)
    assert image.status is ImageStatus.FAILED and image.attempts == RETRY.max_attempts


@pytest.mark.slow
def test_transient_errors_are_retried_then_the_image_fails(service, monkeypatch):
    """The segment task against an S3 endpoint that refuses connections: retried
    (eagerly here, without the backoff waits), then marked failed with the reason."""
    from services import FAKE_AWS_ENV, free_port

    from chexmask.storage import sources as fetch
    from chexmask.worker import tasks

    for name, value in FAKE_AWS_ENV.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    fetch.bucket.cache_clear()
    monkeypatch.setattr(tasks, "_service", service)
    image = service.index.register_image(uri="s3://unreachable/00000001_000.png", dataset="nih").image
    try:
        outcome = tasks.segment.apply(args=[image.id])
    finally:
        fetch.bucket.cache_clear()
    assert isinstance(outcome.result, TransientError)
    failed = service.index.get_image(image.id)
    assert failed.status is ImageStatus.FAILED and failed.reason.startswith("TransientError: S3 unreachable")
    assert failed.attempts == RETRY.transient_retries + 1


@pytest.mark.slow
def test_qc_with_a_reference_bank_stores_dice_rca(service, samples_dir, jsrt_bank, tmp_path):
    bank_path = tmp_path / "bank.npz"
    jsrt_bank(4).save(bank_path)
    source = tmp_path / "utils_example1.jpg"
    source.write_bytes((samples_dir / source.name).read_bytes())
    ingested = admit(service, source)
    result = service.segment(ingested.image_id)

    banked = Service(service.settings.model_copy(update={"qc_bank": str(bank_path)}))
    try:
        assert banked.qc(result.segmentation_id) is QCStatus.DONE  # reads the source again
    finally:
        banked.close()
    row = service.index.get_segmentation(result.segmentation_id)
    assert row.qc_status is QCStatus.DONE
    assert 0 <= row.dice_rca_mean <= row.dice_rca_max <= 1 and row.dice_rca_mean_h is not None
