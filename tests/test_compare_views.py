"""What a stored comparison shows (SQLite and PostgreSQL): each listed mask carries its
agreement with the compared model's mask in ``query``, the API and the gallery; the
gallery's compare filter pages by keyset with its other filters; the image page
shows the agreement and the other model's outline; the joins use the indexes."""

from __future__ import annotations

import csv
import io
import json
import re

import numpy as np
import pytest
import sqlalchemy as sa
from click.testing import CliRunner
from test_import_compare_scan import AGREEING, DISAGREEING, _published_and_ours
from test_storage_api import client_for
from test_web import card_ids, link

from chexmask.app.cli import cli
from chexmask.storage import browse
from chexmask.storage.comparisons import Agreement, save_comparisons
from chexmask.storage.models import Segmentation
from chexmask.storage.objectstore import open_store
from chexmask.storage.queries import AGREEMENT_FIELDS, QueryFilters
from chexmask.storage.web import _other_landmarks
from chexmask.worker.compare import compare

pytest_plugins = ["services"]

OFFICIAL = "hybridgnet-official"
# Known values of the tiny 10x10 masks (see test_compare_on_a_tiny_case_with_known_dice)
DISAGREEING_VALUES = {
    "agreement_dice": 0.0,
    "agreement_dice_rl": pytest.approx(2 * 40 / 90),
    "agreement_dice_ll": 0.0,
    "agreement_dice_h": 1.0,
    "agreement_hausdorff_rl": 1.0,
    "agreement_hausdorff_ll": 1.0,
    "agreement_hausdorff_h": 0.0,
    "agreement_frame": "original",
    "other_model": OFFICIAL,
    "other_dice_rca_mean": 0.9,
    "other_dice_rca_max": 0.9,
}
AGREEING_DICE = dict.fromkeys(("agreement_dice", "agreement_dice_rl", "agreement_dice_ll", "agreement_dice_h"), 1.0)
# Agreement of ours with the published masks, for the gallery's pages: right lungs of 50 - k pixels
# against the published 50: Dice 2(50 - k)/(100 - k), lowest organ = that one.
SHRUNK = {f"0000000{k}_000.png": 50 - 5 * k for k in range(1, 7)}


def rle_shrunk(pixels: int) -> dict[str, str]:
    return {"right_lung": f"1 {pixels}", "left_lung": "51 10", "heart": ""}


def expected_dice(pixels: int) -> float:
    return 2 * pixels / (pixels + 50)


@pytest.fixture
def compared(index, tmp_path):
    _published_and_ours(index, tmp_path, {"00000001_000.png": AGREEING, "00000002_000.png": DISAGREEING})
    compare(index, "nih", OFFICIAL, "ours")
    return index


def test_listed_masks_carry_their_agreement_in_one_query(compared):
    index = compared
    rows = {r.dataset_image_id: r for r in index.query(QueryFilters(model="ours", compare_to=OFFICIAL))}
    assert sorted(rows) == ["00000001_000.png", "00000002_000.png"]
    bad = rows["00000002_000.png"]
    assert {k: getattr(bad, k) for k in DISAGREEING_VALUES} == DISAGREEING_VALUES
    assert bad.compared_at is not None and bad.other_segmentation_id != bad.id
    assert {k: getattr(rows["00000001_000.png"], k) for k in AGREEING_DICE} == AGREEING_DICE
    # from the other side: the published masks against ours, our Dice RCA (none set) as the other's
    theirs = index.query(QueryFilters(model=OFFICIAL, compare_to="ours", max_agreement_dice=0.5))
    assert [(r.dataset_image_id, r.other_model, r.agreement_dice, r.other_dice_rca_mean) for r in theirs] == [
        ("00000002_000.png", "ours", 0.0, None)
    ]
    # without compare_to: no comparison joined, every agreement field empty (None, not 0)
    plain = index.query(QueryFilters(dataset="nih"))
    assert len(plain) == 4
    assert {getattr(r, k) for r in plain for k in AGREEMENT_FIELDS} == {None}


def test_only_the_latest_comparison_of_a_mask_counts(compared):
    """A mask paired again with another mask of the model (its image changed, or two
    images share the id) is listed once, with and by the newest result."""
    index = compared
    ours = {r.dataset_image_id: r for r in index.query(QueryFilters(model="ours"))}
    theirs = {r.dataset_image_id: r for r in index.query(QueryFilters(model=OFFICIAL))}
    bad, other = ours["00000002_000.png"], theirs["00000001_000.png"]
    dice = {"right_lung": 0.95, "left_lung": 0.97, "heart": 0.99}
    hausdorff = dict.fromkeys(dice, 2.0)
    save_comparisons(index, [Agreement((bad.id, other.id), ("ours", OFFICIAL), "original", dice, hausdorff)])

    rows = index.query(QueryFilters(model="ours", compare_to=OFFICIAL))
    assert sorted((r.dataset_image_id, r.agreement_dice, r.other_segmentation_id) for r in rows) == [
        ("00000001_000.png", 1.0, other.id),
        ("00000002_000.png", 0.95, other.id),
    ]
    assert [r.dataset_image_id for r in index.query(QueryFilters(compare_to=OFFICIAL, max_agreement_dice=0.5))] == []


def test_query_command_shows_the_agreement_columns(compared, tmp_path, monkeypatch):
    monkeypatch.setenv("CHEXMASK_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("CHEXMASK_DATABASE_URL", compared.engine.url.render_as_string(hide_password=False))
    runner = CliRunner()

    def run(*args: str) -> str:
        result = runner.invoke(cli, ["query", "--dataset", "nih", "--sort", "dataset_image_id", *args])
        assert result.exit_code == 0, result.output
        return result.output

    table = run("--model", "ours", "--compare-to", OFFICIAL).splitlines()
    header = table[0].split()
    assert header[-8:] == [
        "other_dice_rca_mean",
        "agreement_dice",
        "agreement_dice_rl",
        "agreement_dice_ll",
        "agreement_dice_h",
        "agreement_hausdorff_rl",
        "agreement_hausdorff_ll",
        "agreement_hausdorff_h",
    ]
    assert table[2].split()[-8:] == ["0.9000", "0.0000", "0.8889", "0.0000", "1.0000", "1.0000", "1.0000", "0.0000"]
    assert "agreement_dice" not in run("--model", "ours")  # the plain table is unchanged

    rows = list(csv.DictReader(io.StringIO(run("--compare-to", OFFICIAL, "--format", "csv"))))
    assert [(r["model_version"], r["agreement_dice"], r["agreement_dice_rl"][:6]) for r in rows] == [
        ("ours", "1.0", "1.0"),
        ("ours", "0.0", "0.8888"),
    ]
    plain = list(csv.DictReader(io.StringIO(run("--format", "csv"))))
    assert len(plain) == 4 and {r[k] for r in plain for k in AGREEMENT_FIELDS} == {""}  # empty, not 0

    found = json.loads(
        run("--model", "ours", "--compare-to", OFFICIAL, "--max-agreement-dice", "0.5", "--format", "json")
    )
    assert [(r["dataset_image_id"], r["agreement_dice_rl"], r["agreement_frame"]) for r in found] == [
        ("00000002_000.png", pytest.approx(0.8889, abs=1e-4), "original")
    ]
    assert {r["agreement_dice"] for r in json.loads(run("--format", "json"))} == {None}


def test_api_summaries_carry_the_agreement(compared, tmp_path):
    with client_for(compared, open_store((tmp_path / "store").as_uri())) as client:
        page = client.get(
            "/segmentations", params={"model": "ours", "compare_to": OFFICIAL, "sort": "dataset_image_id"}
        )
        assert page.status_code == 200, page.text
        bad = page.json()["items"][1]
        assert {k: bad[k] for k in DISAGREEING_VALUES} == DISAGREEING_VALUES
        plain = client.get("/segmentations", params={"model": "ours"}).json()["items"]
        assert {item[k] for item in plain for k in AGREEMENT_FIELDS} == {None}
        schema = client.get("/openapi.json").json()["components"]["schemas"]["SegmentationSummary"]
        for name in AGREEMENT_FIELDS:
            assert name in schema["properties"], name
        assert "compare_to" in schema["properties"]["agreement_dice"]["description"]


@pytest.fixture
def shrunk(index, tmp_path):
    """Six of our masks with agreement 0.95 down to 0.57 with the published ones, and
    one of ours never compared."""
    _published_and_ours(index, tmp_path, {name: rle_shrunk(pixels) for name, pixels in SHRUNK.items()})
    compare(index, "nih", "ours", OFFICIAL)
    ours = {r.dataset_image_id: r.id for r in index.query(QueryFilters(model="ours"))}
    from test_import_compare_scan import _add_ours

    ours["lonely.png"] = _add_ours(index, "lonely.png", AGREEING).id
    return index, ours


# SQLite walks the sort's index for a wide agreement range and reads a narrow one whole
# (browse._wide_agreement): both plans must give the same pages.
EITHER_PLAN = pytest.mark.parametrize("wide_from", [1, 1000], ids=["walk-sort-index", "read-range-and-sort"])


@EITHER_PLAN
def test_gallery_compare_filter_pages_and_combines_with_other_filters(shrunk, tmp_path, monkeypatch, wide_from):
    index, ours = shrunk
    monkeypatch.setattr(browse, "WIDE_RANGE", wide_from)
    store = open_store((tmp_path / "store").as_uri())
    with client_for(index, store) as client:
        html = client.get("/", params={"model": "ours"}).text
        assert re.findall(r'<select name="compare_to"[^>]*>(.*?)</select>', html, re.S)[0].count("<option") == 2
        assert ">hybridgnet-official</option>" in html  # the only model compared with ours
        assert browse.compared_models(index, "ours") == [OFFICIAL]
        assert browse.compared_models(index, OFFICIAL) == ["ours"]
        assert browse.compared_models(index) == [OFFICIAL, "ours"]
        assert browse.compared_models(index, "nobody") == []

        # the agreement range, walked two by two in id order, forward and back
        wanted = [ours[n] for n, pixels in SHRUNK.items() if expected_dice(pixels) <= 0.85]
        pages, url = [], "/?model=ours&compare_to=hybridgnet-official&max_agreement_dice=0.85&sort=id&limit=2"
        while url:
            html = client.get(url).text
            pages.append(card_ids(html))
            url = link(html, "next-page")
        assert [i for p in pages for i in p] == wanted and len(wanted) == 4 and len(pages) == 2
        assert card_ids(client.get(link(html, "prev-page")).text) == pages[0]
        # each card says its agreement
        html = client.get("/", params={"model": "ours", "compare_to": OFFICIAL, "max_agreement_dice": 0.85}).text
        for name, pixels in SHRUNK.items():
            said = f"agreement with {OFFICIAL}: Dice {expected_dice(pixels):.3f}" in html
            assert said == (expected_dice(pixels) <= 0.85), name

        def shown(**params) -> list[int]:
            response = client.get("/", params={"compare_to": OFFICIAL, **params})
            assert response.status_code == 200, response.text
            return sorted(card_ids(response.text))

        assert shown(model="ours", min_agreement_dice=0.8) == sorted(
            ours[n] for n, p in SHRUNK.items() if expected_dice(p) >= 0.8
        )
        assert shown(model="ours", id_pattern="00000003*") == [ours["00000003_000.png"]]
        assert shown(dataset="padchest") == []
        assert shown() == sorted(ours[n] for n in SHRUNK)  # rows whose other side is the published model
        assert ours["lonely.png"] not in shown(model="ours")  # never compared
        unbound = client.get("/", params={"max_agreement_dice": 0.8})
        assert unbound.status_code == 422 and "an agreement Dice bound needs compare_to" in unbound.text
        assert unbound.headers["content-type"].startswith("text/html")  # a page that says why, not JSON
        too_high = client.get("/", params={"compare_to": OFFICIAL, "max_agreement_dice": 2})
        assert (
            too_high.status_code == 422
            and "max_agreement_dice: Input should be less than or equal to 1" in too_high.text
        )

        # the image page: neighbours within the compare filter, the agreement values, the other's outline
        first = ours["00000001_000.png"]
        params = {"compare_to": OFFICIAL, "sort": "id", "max_agreement_dice": 0.85, "model": "ours"}
        page = client.get(f"/image/{ours['00000004_000.png']}", params=params)
        assert link(page.text, "prev").startswith(f"/image/{ours['00000003_000.png']}?")
        assert link(page.text, "next").startswith(f"/image/{ours['00000005_000.png']}?")
        page = client.get(f"/image/{first}").text
        section = page[page.index('id="agreement"') :]
        assert f"{expected_dice(45):.3f}" in section and "right lung" in section and 'id="other-organs"' in page
        assert client.get(f"/image/{ours['lonely.png']}").text.count('id="agreement"') == 0


def test_image_page_maps_an_original_resolution_import_onto_our_frame(index, tmp_path):
    """Published rows at the original resolution have no 1024 landmarks: their outline is
    placed with our own mask's frame (scale and padding fitted on our two landmark sets)."""
    from test_import_compare_scan import POINTS

    _published_and_ours(index, tmp_path, {"00000001_000.png": AGREEING})
    compare(index, "nih", "ours", OFFICIAL)
    ours = index.query(QueryFilters(model="ours"))[0]
    # Our mask: other landmarks than the published ones (shifted by 2 px), and a 1024 frame
    # that scales x by 51.2 with 256 px of padding and y by 102.4.
    shifted = [[x + 2, y + 2] for x, y in POINTS]
    with index.engine.begin() as connection:
        connection.execute(
            sa.update(Segmentation)
            .where(Segmentation.id == ours.id)
            .values(landmarks_original=shifted, landmarks_1024=[[x * 51.2 + 256, y * 102.4] for x, y in shifted])
        )
    (agreement,) = browse.agreements(index, ours.id)
    assert agreement["landmarks_1024"] == [] and agreement["landmarks_original"] == POINTS
    mapped = _other_landmarks(index.get_segmentation(ours.id), agreement)
    assert mapped is not None
    np.testing.assert_allclose(mapped, [[x * 51.2 + 256, y * 102.4] for x, y in POINTS], atol=0.05)


def plan(index, statement) -> str:
    """The database's plan of ``statement``, as text (PostgreSQL: with sequential scans
    priced out, as they would be at scale; these tables hold a few rows)."""
    compiled = statement.compile(dialect=index.engine.dialect, compile_kwargs={"literal_binds": True})
    with index.engine.begin() as connection:
        if index.dialect == "postgresql":
            connection.exec_driver_sql("SET LOCAL enable_seqscan = off")
            return "\n".join(row[0] for row in connection.exec_driver_sql(f"EXPLAIN {compiled}"))
        return "\n".join(row[-1] for row in connection.exec_driver_sql(f"EXPLAIN QUERY PLAN {compiled}"))


@EITHER_PLAN
def test_compare_filter_is_an_index_join_and_plain_pages_do_not_join(shrunk, monkeypatch, wide_from):
    index, _ = shrunk
    monkeypatch.setattr(browse, "WIDE_RANGE", wide_from)
    plain = browse._statement(index, browse.GalleryFilters(QueryFilters(model="ours")), "dice_rca_mean")
    assert "comparison" not in str(plain)
    for bounds in ({}, {"max_agreement_dice": 0.8}):
        filters = browse.GalleryFilters(QueryFilters(model="ours", compare_to=OFFICIAL, **bounds))
        statement = browse._statement(index, filters, "dice_rca_mean").order_by(Segmentation.dice_rca_mean).limit(49)
        text = plan(index, statement)
        if index.dialect == "sqlite":
            # every access to the comparison table is an index search, never a scan of it
            lines = [line for line in text.splitlines() if "agreement" in line or "comparison" in line]
            assert lines and all(line.strip().startswith("SEARCH") and "INDEX" in line for line in lines), text
        else:
            assert "Seq Scan on comparison" not in text and "Index" in text, text


def test_migration_0009_keeps_the_latest_comparison_and_gives_it_its_model(tmp_path):
    from alembic import command

    from chexmask.storage.engine import alembic_config
    from chexmask.storage.index import MaskIndex

    index = MaskIndex(f"sqlite:///{tmp_path / 'index.db'}")
    try:
        index.upgrade()
        _published_and_ours(index, tmp_path, {"00000001_000.png": AGREEING, "00000002_000.png": DISAGREEING})
        compare(index, "nih", "ours", OFFICIAL)
        config = alembic_config()
        with index.engine.begin() as connection:
            config.attributes["connection"] = connection
            command.downgrade(config, "0008")
        assert "model" not in {c["name"] for c in sa.inspect(index.engine).get_columns("comparison")}
        with index.engine.begin() as connection:
            # as 0008 allowed: an older pairing of our second mask with the published first one
            connection.exec_driver_sql(
                "INSERT INTO comparison (segmentation_id, other_segmentation_id, other_model, frame, dice_min,"
                " dice_right_lung, dice_left_lung, dice_heart, created_at)"
                " SELECT segmentation_id, (SELECT min(other_segmentation_id) FROM comparison), other_model, frame,"
                " 0.5, 0.5, 0.5, 0.5, '2000-01-01 00:00:00.000000' FROM comparison WHERE dice_min = 0"
                " AND other_model = 'hybridgnet-official'"
            )
        index.upgrade()
        with index.engine.connect() as connection:
            rows = connection.exec_driver_sql(
                "SELECT model, other_model, dice_min FROM comparison ORDER BY model, dice_min"
            ).all()
        assert [tuple(r) for r in rows] == [
            (OFFICIAL, "ours", 0.0),
            (OFFICIAL, "ours", 1.0),
            ("ours", OFFICIAL, 0.0),
            ("ours", OFFICIAL, 1.0),
        ]
        assert browse.compared_models(index, "ours") == [OFFICIAL]
    finally:
        index.close()
