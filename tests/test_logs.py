"""Logging (chexmask/logs.py): text and JSON lines, the image context, one outcome line per image."""

from __future__ import annotations

import io
import json
import logging
import os
import re
from concurrent.futures import ThreadPoolExecutor

import pytest

from chexmask import logs
from chexmask.config import Settings


@pytest.fixture
def restore_logging():
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def test_json_lines_carry_the_image_context(restore_logging):
    out = io.StringIO()
    logs.configure(1, "json", stream=out)
    log = logging.getLogger("chexmask.test")
    log.info("before")
    with logs.image_context(image_id=12, dataset="chestx-ray8", task_id="abc-1"):
        log.info("image %d segmented", 12)
        with logs.image_context(segmentation_id=5):
            logs.bind(dataset="padchest")
            log.warning("inner")
        try:
            raise ValueError("boom")
        except ValueError:
            log.exception("failed")
    log.debug("not shown at -v")
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [line["message"] for line in lines] == ["before", "image 12 segmented", "inner", "failed"]
    before, segmented, inner, failed = lines
    assert set(before) == {"time", "level", "logger", "message"}
    assert (before["level"], before["logger"]) == ("INFO", "chexmask.test")
    assert before["time"].endswith("+00:00")
    assert {k: segmented[k] for k in ("image_id", "dataset", "task_id")} == {
        "image_id": 12,
        "dataset": "chestx-ray8",
        "task_id": "abc-1",
    }
    assert (inner["segmentation_id"], inner["dataset"], inner["level"]) == (5, "padchest", "WARNING")
    assert failed["dataset"] == "chestx-ray8" and "ValueError: boom" in failed["exception"]


def test_text_lines_append_the_context(restore_logging):
    out = io.StringIO()
    logs.configure(0, "text", stream=out)
    with logs.image_context(image_id=7, dataset="nih", task_id=None):
        logging.getLogger("chexmask.test").warning("slow")
    line = out.getvalue().strip()
    assert re.fullmatch(r"\S+ \S+ WARNING chexmask\.test: slow \[image_id=7 dataset=nih\]", line), line


def test_configure_replaces_its_handler_and_follows_settings(restore_logging, monkeypatch):
    logs.configure(0, "text")
    logs.configure(2, "json")
    root = logging.getLogger()
    ours = [h for h in root.handlers if isinstance(h, logs._Handler)]
    assert len(ours) == 1 and isinstance(ours[0].formatter, logs.JsonFormatter)
    assert root.level == logging.DEBUG
    monkeypatch.setenv("CHEXMASK_LOG_FORMAT", "json")
    assert Settings.from_env().log_format == "json"


def test_context_stays_with_its_thread():
    def work(image_id: int) -> list:
        with logs.image_context(image_id=image_id):
            return [logs.current()["image_id"] for _ in range(50)]

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(work, range(8)))
    assert results == [[i] * 50 for i in range(8)]
    assert logs.current() == {}


def test_one_outcome_line_per_image(tmp_path, samples_dir, random_weights, caplog):
    """``serve --once`` over a good and a truncated image: each gets exactly one outcome
    line, and every line about an image carries its id and dataset."""
    from chexmask.app.serve import Server

    inbox = tmp_path / "inbox" / "images_001"
    inbox.mkdir(parents=True)
    good = inbox / "00000001_000.png"
    good.write_bytes((samples_dir / "00000001_000.png").read_bytes())
    bad = inbox / "00000002_000.png"
    bad.write_bytes(good.read_bytes()[:3000])
    for path in (good, bad):
        os.utime(path, (1_000_000_000, 1_000_000_000))
    home = tmp_path / "home"
    settings = Settings(home=home, weights=str(random_weights), broker_url="")

    caplog.handler.addFilter(logs.ContextFilter())
    caplog.set_level(logging.INFO)
    server = Server(settings, tmp_path / "inbox", settle=0.0, threads=2)
    try:
        server.start()
        server.run_once()
        assert server.tally.counts == {"segmented": 1, "refused": 1}
        # Again: the good image is unchanged, nothing is processed, no outcome line.
        server.run_once()
    finally:
        server.close()

    outcomes = [
        r for r in caplog.records if r.name == "chexmask.worker.service" and r.getMessage().startswith("image ")
    ]
    by_image = {}
    for record in outcomes:
        by_image.setdefault(record.image_id, []).append(record.getMessage())
    assert len(by_image) == 2 and all(len(lines) == 1 for lines in by_image.values()), by_image
    # The two images run side by side: take each one's line by its name, not by id order.
    messages = sorted((lines[0] for lines in by_image.values()), key=lambda m: m.split("(", 1)[1])
    assert re.fullmatch(
        r"image \d+ \(chestx-ray8/00000001_000\.png\) segmented in [\d.]+ s "
        r"\(segmentation \d+\); QC pending",
        messages[0],
    ), messages
    assert re.fullmatch(r"image \d+ \(chestx-ray8/00000002_000\.png\) refused: \w+: .+", messages[1]), messages
    for record in outcomes:
        assert record.levelno == logging.INFO and record.dataset == "chestx-ray8"
        entry = json.loads(logs.JsonFormatter().format(record))
        assert (entry["image_id"], entry["dataset"]) == (record.image_id, "chestx-ray8")
    # Whatever else was logged while an image was processed says which image.
    during = [r for r in caplog.records if r.name.startswith("chexmask") and "image_id" in getattr(r, "context", {})]
    assert len(during) >= 2


def test_fail_logs_the_outcome_line(tmp_path, caplog):
    from chexmask.ingest.registry import Registry
    from chexmask.messages import Arrival
    from chexmask.worker.service import Service

    source = tmp_path / "x.png"
    source.write_bytes(b"not read")
    service = Service(Settings(home=tmp_path / "home", broker_url=""))
    try:
        service.index.upgrade()
        admitted = Registry(service.index).admit(Arrival.for_file(source, "padchest"))
        caplog.handler.addFilter(logs.ContextFilter())
        caplog.set_level(logging.INFO)
        service.fail(admitted.image_id, TimeoutError("store down"))
    finally:
        service.close()
    [record] = [r for r in caplog.records if r.name == "chexmask.worker.service"]
    assert record.levelno == logging.ERROR
    assert record.getMessage() == f"image {admitted.image_id} (padchest/x.png) failed: TimeoutError: store down"
    assert (record.image_id, record.dataset) == (admitted.image_id, "padchest")
