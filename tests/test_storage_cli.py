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
