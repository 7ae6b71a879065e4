"""The pipeline stages (worker/service.py): batching, retries, and one real image end to end."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from chexmask.config import Settings
from chexmask.errors import RefusedInput, TransientError
from chexmask.ingest.arrival import Arrival
from chexmask.status import ImageStatus
from chexmask.storage.models import QCStatus
from chexmask.worker.service import RETRY, BatchRunner, Service
from test_e2e_celery import weights  # noqa: F401 (a fixture)


class RecordingSegmenter:
    """Stands in for the model to observe batching: returns each input's name."""

    def __init__(self, batch_size: int, fail_on: str | None = None, workers: int = 1):
        self.batch_size = batch_size
        self.workers, self.torch_threads = workers, 1
        self.thread_batch = batch_size // workers
        self.batches: list[list[str]] = []
        self.fail_on = fail_on
        self.info = None
        self.running = 0
        self.most_running = 0
        self._lock = threading.Lock()

    def segment(self, items):
        with self._lock:
            self.batches.append([p.name for p in items])
            self.running += 1
            self.most_running = max(self.most_running, self.running)
        try:
            if any(p.name == self.fail_on for p in items):
                raise ValueError(f"cannot segment {self.fail_on}")
            time.sleep(0.3)
            return [f"segmented {p.name}" for p in items]
        finally:
            with self._lock:
                self.running -= 1


class Item:
    def __init__(self, name):
        self.name = name


def segment_concurrently(runner: BatchRunner, names: list[str]) -> dict[str, object]:
    results: dict[str, object] = {}

    def call(name):
        try:
            results[name] = runner.segment(Item(name))
        except Exception as exc:
            results[name] = exc

    threads = [threading.Thread(target=call, args=(n,)) for n in names]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def test_concurrent_callers_share_batches():
    segmenter = RecordingSegmenter(batch_size=4)
    runner = BatchRunner(segmenter, wait_s=0.5)
    results = segment_concurrently(runner, [f"img{i}" for i in range(6)])
    runner.close()
    assert results == {f"img{i}": f"segmented img{i}" for i in range(6)}
    assert sorted(len(b) for b in segmenter.batches) == [2, 4]


def test_model_threads_run_batches_side_by_side():
    segmenter = RecordingSegmenter(batch_size=4, workers=2)
    runner = BatchRunner(segmenter, wait_s=0.2)
    results = segment_concurrently(runner, [f"img{i}" for i in range(4)])
    runner.close()
    assert results == {f"img{i}": f"segmented img{i}" for i in range(4)}
    assert sorted(name for batch in segmenter.batches for name in batch) == [f"img{i}" for i in range(4)]
    assert segmenter.most_running == 2


def test_a_lone_image_waits_at_most_the_batch_wait():
    segmenter = RecordingSegmenter(batch_size=4)
    runner = BatchRunner(segmenter, wait_s=0.2)
    started = time.monotonic()
    assert runner.segment(Item("alone")) == "segmented alone"
    assert time.monotonic() - started < 1.5
    runner.close()


def test_a_failing_image_does_not_fail_its_batch():
    segmenter = RecordingSegmenter(batch_size=3, fail_on="bad")
    runner = BatchRunner(segmenter, wait_s=0.5)
    results = segment_concurrently(runner, ["a", "bad", "c"])
    runner.close()
    assert results["a"] == "segmented a" and results["c"] == "segmented c"
    assert isinstance(results["bad"], ValueError)


def test_retry_policy():
    assert RETRY.retries_for(RefusedInput("not_an_image", "no")) == 0
    assert RETRY.retries_for(TransientError("S3 SlowDown")) == 5
    assert RETRY.retries_for(KeyError("bug")) == 2
    delays = [RETRY.delay(n) for n in range(12)]
    assert delays[0] <= 5 and 20 <= delays[3] <= 40 and max(delays) <= 600


# --- one real image through the real model -----------------------------------------------------


@pytest.fixture(scope="module")
def service(tmp_path_factory, weights):
    home = tmp_path_factory.mktemp("home")
    settings = Settings(home=home, weights=str(weights), database_url=f"sqlite:///{home / 'index.db'}",
                        store_url=(home / "store").as_uri(), broker_url="", batch_wait_ms=0)
    service = Service(settings)
    service.index.upgrade()
    yield service
    service.close()


def arrival_for(path: Path) -> Arrival:
    return Arrival.for_file(path)


@pytest.mark.slow
def test_segment_writes_the_store_and_the_index_once(service, samples_dir, tmp_path):
    source = tmp_path / "images_001" / "00000001_000.png"
    source.parent.mkdir()
    source.write_bytes((samples_dir / "00000001_000.png").read_bytes())
    ingested = service.ingest(arrival_for(source))
    assert ingested is not None
    result = service.segment(ingested.image_id, timings={"ingest": ingested.seconds})
    assert result.status is ImageStatus.DONE and result.qc_pending and not result.reused

    image = service.index.get_image(ingested.image_id)
    assert (image.status, image.dataset, image.dataset_image_id, image.attempts) == (
        ImageStatus.DONE, "chestx-ray8", "00000001_000.png", 1)
    row = service.index.get_segmentation(result.segmentation_id)
    padding = result.prepared.padding
    assert (image.height, image.width) == (row.height, row.width) == (padding.height, padding.width)
    assert set(row.object_keys) == {"record", "masks", "right_lung", "left_lung", "heart", "overlay"}
    for key in row.object_keys.values():
        assert service.store.exists(key), key
    record = json.loads(service.store.get(row.object_keys["record"]))
    masks = json.loads(service.store.get(row.object_keys["masks"]))
    assert record["sha256"] == image.sha256 == row.image_sha256
    assert masks["rle"] == row.rle() and masks["rle_1024"] == row.rle("1024")
    assert record["landmarks_original"] == row.landmarks_original
    assert service.store.get(row.object_keys["overlay"]).startswith(b"\xff\xd8")  # JPEG
    assert {"ingest", "fetch", "decode", "preprocess", "inference", "store"} <= set(row.timings)

    # Redelivered: nothing is computed or written again.
    again = service.segment(ingested.image_id)
    assert again.reused and again.segmentation_id == row.id
    assert service.index.get_image(ingested.image_id).attempts == 1
    # A duplicate announcement of the same file is dropped at ingest.
    assert service.ingest(arrival_for(source)) is None
    # The same bytes under another name reuse the segmentation.
    copy = tmp_path / "copy.png"
    copy.write_bytes(source.read_bytes())
    other = service.ingest(arrival_for(copy))
    assert service.segment(other.image_id).segmentation_id == row.id
    assert service.index.has_segmentation(image.sha256, service.runner.info.version)

    assert service.qc(row.id, result.prepared.image) is QCStatus.SKIPPED  # no reference bank
    qc_row = service.index.get_segmentation(row.id)
    assert qc_row.qc_status is QCStatus.SKIPPED and qc_row.qc_flags is not None


@pytest.mark.slow
def test_refused_and_missing_sources(service, tmp_path):
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    ingested = service.ingest(arrival_for(corrupt))
    result = service.segment(ingested.image_id)
    assert result.status is ImageStatus.REFUSED and result.code
    image = service.index.get_image(ingested.image_id)
    assert (image.status, image.refusal_code, image.reason) == (ImageStatus.REFUSED, result.code, result.reason)
    assert service.segment(ingested.image_id).status is ImageStatus.REFUSED  # never retried
    assert service.index.get_image(ingested.image_id).attempts == 1

    gone = tmp_path / "gone.png"
    gone.write_bytes(b"x")
    ingested = service.ingest(arrival_for(gone))
    gone.unlink()
    assert service.ingest(arrival_for(corrupt)) is None
    result = service.segment(ingested.image_id)
    assert result.status is ImageStatus.FAILED and "not found" in result.reason
    assert service.index.get_image(ingested.image_id).status is ImageStatus.FAILED


def test_an_image_that_keeps_killing_workers_ends_failed(service, samples_dir, tmp_path):
    """Each redelivery after a worker death leaves the image 'processing' with one more
    attempt; at the cap it is failed with a reason instead of delivered forever."""
    source = tmp_path / "poison.png"
    # Content no other test segments (a stored result would be reused, not retried).
    source.write_bytes((samples_dir / "00000001_000.png").read_bytes() + b"poison")
    ingested = service.ingest(arrival_for(source))
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
    from chexmask.ingest import fetch
    from chexmask.worker import tasks
    from services import FAKE_AWS_ENV, free_port

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
def test_qc_with_a_reference_bank_stores_dice_rca(service, samples_dir, shared_dir, tmp_path):
    from dataclasses import replace

    from chexmask.worker.bank import ReferenceBank
    from chexmask.worker.train import list_ids

    jsrt = shared_dir / "data" / "jsrt"
    if not (jsrt / "images").is_dir():
        pytest.skip(f"JSRT data not found under {jsrt}")
    bank_path = tmp_path / "bank.npz"
    ReferenceBank.build(jsrt / "images", jsrt / "landmarks", list_ids(jsrt / "images", jsrt / "landmarks")[:4]).save(bank_path)
    source = tmp_path / "utils_example1.jpg"
    source.write_bytes((samples_dir / source.name).read_bytes())
    ingested = service.ingest(arrival_for(source))
    result = service.segment(ingested.image_id)

    banked = Service(replace(service.settings, qc_bank=str(bank_path)))
    try:
        assert banked.qc(result.segmentation_id) is QCStatus.DONE  # reads the source again
    finally:
        banked.close()
    row = service.index.get_segmentation(result.segmentation_id)
    assert row.qc_status is QCStatus.DONE
    assert 0 <= row.dice_rca_mean <= row.dice_rca_max <= 1 and row.dice_rca_mean_h is not None
