"""``chexmask db|query|export|stats|api`` end to end, configured by environment variables."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
import time

import httpx
import pandas as pd
import pytest
from click.testing import CliRunner
from PIL import Image

from chexmask.app.cli import cli
from chexmask.errors import ConfigError
from chexmask.storage.index import MaskIndex


def url_of(index) -> str:
    return index.engine.url.render_as_string(hide_password=False)


@pytest.fixture
def run(index, sample, tmp_path, monkeypatch):
    """Invoke the CLI against the test index."""
    monkeypatch.setenv("CHEXMASK_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("CHEXMASK_DATABASE_URL", url_of(index))
    runner = CliRunner()

    def invoke(*args: str):
        result = runner.invoke(cli, list(args), catch_exceptions=False)
        assert result.exit_code == 0, result.output
        return result

    for i, mean in enumerate([0.55, 0.72, 0.91]):
        sample(f"img_{i}.png", dataset="mimic", release="2.0", dice_mean=mean, dice_max=mean + 0.05)
    return invoke


def test_db_upgrade_and_current(tmp_path, monkeypatch):
    url = f"sqlite:///{tmp_path / 'new' / 'index.db'}"
    monkeypatch.setenv("CHEXMASK_DATABASE_URL", url)
    runner = CliRunner()
    with pytest.raises(ConfigError, match="db upgrade"):
        runner.invoke(cli, ["query"], catch_exceptions=False)
    assert "current: empty" in runner.invoke(cli, ["db", "current"]).output
    upgrade = runner.invoke(cli, ["db", "upgrade"]).output.strip().splitlines()
    head = MaskIndex.head_revision()
    assert upgrade == [f"index {url}", f"index schema: empty -> {head}"]
    assert runner.invoke(cli, ["db", "upgrade"]).output.strip().splitlines()[-1] == f"index schema: {head} -> {head}"
    assert runner.invoke(cli, ["db", "current"]).output.strip().splitlines()[-1] == f"current: {head}  head: {head}"


def test_query_formats(run):
    table = run("query", "--dataset", "mimic-cxr", "--sort", "-dice_rca_mean").stdout
    lines = table.splitlines()
    assert lines[0].split()[:4] == ["id", "dataset", "release", "dataset_image_id"]
    assert [line.split()[3] for line in lines[1:]] == ["img_2.png", "img_1.png", "img_0.png"]
    assert "0.9100" in lines[1]

    rows = json.loads(run("query", "--min-dice-mean", "0.7", "--format", "json").stdout)
    assert [r["dataset_image_id"] for r in rows] == ["img_1.png", "img_2.png"]
    assert rows[0]["status"] == "done" and rows[0]["dataset"] == "mimic-cxr-jpg"

    text = run("query", "--id", "img_?.png", "--limit", "1", "--offset", "1", "--format", "csv").stdout
    (row,) = list(csv.DictReader(io.StringIO(text)))
    assert row["dataset_image_id"] == "img_1.png" and float(row["dice_rca_max"]) == 0.77


def test_export(run, tmp_path):
    out = tmp_path / "mimic.csv"
    result = run("export", "--dataset", "mimic", "--min-dice-mean", "0.7", "--out", str(out), "--resolution", "1024")
    assert "wrote 2 rows" in result.stderr
    frame = pd.read_csv(out)
    assert list(frame["dicom_id"]) == ["img_1.png", "img_2.png"]
    assert list(frame["Height"]) == [1024, 1024]
    run("export", "--dataset", "mimic", "--out", str(tmp_path / "mimic.parquet"))
    assert len(pd.read_parquet(tmp_path / "mimic.parquet")) == 3


def test_stats(run, tmp_path):
    plot = tmp_path / "dice.png"
    table = run("stats", "--plot", str(plot)).stdout
    header, mean_row, max_row = (line.split() for line in table.splitlines())
    assert header[:3] == ["dataset", "release", "queued"] and header[-1] == ">=0.7"
    assert mean_row[:2] == ["mimic-cxr-jpg", "2.0"] and mean_row[header.index("metric")] == "mean"
    assert mean_row[-1] == "66.7%"  # two of three >= 0.7
    assert max_row[-1] == "66.7%" and max_row[header.index("n")] == "3"
    with Image.open(plot) as image:
        assert image.format == "PNG"
    (group,) = json.loads(run("stats", "--format", "json", "--dataset", "mimic").stdout)
    assert group["dice_rca_mean"]["n"] == 3 and group["status_counts"]["done"] == 3


# One backend is enough here: starting the real server is the slow part.
@pytest.mark.parametrize("index", ["sqlite"], indirect=True)
def test_api_serves_over_http(index, sample, unused_port, tmp_path):
    for name in ("a.png", "b.png", "c.png"):
        sample(name)
    port, log = unused_port, tmp_path / "api.log"
    env = {
        **os.environ,
        "CHEXMASK_API_TOKEN": "t0ken",
        "CHEXMASK_DATABASE_URL": url_of(index),
        "CHEXMASK_HOME": str(tmp_path / "home"),
    }
    with log.open("wb") as stderr:  # the server keeps its own copy of the handle
        server = subprocess.Popen(
            # The storage command alone: the full CLI would also import every other subsystem.
            [
                sys.executable,
                "-c",
                "from chexmask.app.index_cli import api_command; api_command()",
                "--port",
                str(port),
            ],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 20
        while True:
            try:
                assert httpx.get(f"{base}/health").json()["status"] == "ok"
                break
            except httpx.TransportError:
                alive = server.poll() is None and time.monotonic() < deadline
                assert alive, f"api did not start:\n{log.read_text()}"
                time.sleep(0.1)
        assert httpx.get(f"{base}/segmentations").status_code == 401
        page = httpx.get(f"{base}/segmentations", headers={"Authorization": "Bearer t0ken"}).json()
        assert len(page["items"]) == 3
    finally:
        server.terminate()
        server.wait(timeout=10)


def test_query_carries_the_quality_record(run, index):
    image, segmentation = index.register_image(uri="file:///x/flagged.png", dataset="mimic").image, None
    rows = {r["dataset_image_id"]: r for r in json.loads(run("query", "--format", "json").stdout)}
    first = rows["img_0.png"]
    index.set_qc(
        first["id"],
        dice_rca_mean=0.4,
        dice_rca_max=0.5,
        dice_rca_mean_h=0.3,
        dice_rca_max_h=0.35,
        flags=["inverted", "occluded"],
        reason="estimate capped at 0.50: suspect input (inverted)",
    )
    as_json = {r["dataset_image_id"]: r for r in json.loads(run("query", "--format", "json").stdout)}
    assert as_json["img_0.png"]["qc_flags"] == ["inverted", "occluded"]
    assert (as_json["img_0.png"]["dice_rca_mean_h"], as_json["img_0.png"]["dice_rca_max_h"]) == (0.3, 0.35)
    assert as_json["img_0.png"]["qc_reason"].startswith("estimate capped")
    as_csv = {r["dataset_image_id"]: r for r in csv.DictReader(io.StringIO(run("query", "--format", "csv").stdout))}
    assert as_csv["img_0.png"]["qc_flags"] == "inverted;occluded" and as_csv["img_0.png"]["dice_rca_mean_h"] == "0.3"
    assert image.id is not None and segmentation is None


def test_stats_report_draws_the_datasets_quality(run, index, tmp_path, monkeypatch):
    import cv2
    import numpy as np

    from chexmask.status import ImageStatus
    from chexmask.storage.objectstore import open_store

    store_url = (tmp_path / "store").as_uri()
    monkeypatch.setenv("CHEXMASK_STORE_URL", store_url)
    worst = min(json.loads(run("query", "--format", "json").stdout), key=lambda r: r["dice_rca_mean"])
    overlay = np.full((64, 64, 3), 90, np.uint8)
    key = f"segmentations/ab/{worst['id']}/overlay.jpg"
    open_store(store_url).put(key, cv2.imencode(".jpg", overlay)[1].tobytes())
    with index.engine.begin() as connection:
        connection.exec_driver_sql(
            f"UPDATE segmentation SET object_keys = '{json.dumps({'overlay': key})}', qc_flags = '[\"occluded\"]' "
            f"WHERE id = {worst['id']}"
        )
    refused = index.register_image(uri="file:///x/ct.dcm", dataset="mimic").image
    index.mark(refused.id, ImageStatus.REFUSED, "wrong_modality", "A CT, not a radiograph.")

    report = tmp_path / "quality.html"
    run("stats", "--dataset", "mimic", "--report", str(report))
    page = report.read_text()
    assert "<h2>mimic-cxr-jpg</h2>" in page
    assert "<td>done</td><td>3</td>" in page and "<td>refused</td><td>1</td>" in page
    # Dice RCA (Mean) 0.55, 0.72, 0.91: two of three at or above 0.7
    assert "<td>Mean, overall</td><td>3</td><td>0.727</td><td>66.7%</td>" in page
    assert "<td>occluded</td><td>1</td>" in page and "<td>wrong_modality</td><td>1</td>" in page
    assert page.count("data:image/png;base64,") == 2  # Mean and Max histograms
    assert "data:image/jpeg;base64," in page and "img_0.png: Dice RCA mean 0.550" in page
    assert report.with_suffix(".png").read_bytes().startswith(b"\x89PNG")
