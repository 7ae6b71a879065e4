"""The web app over HTTP (FastAPI's TestClient): keyset pages, filters, thumbnails,
token rules, grades and their export, the queue, refused/failed images, and the
CLI listings that carry the same fields."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re

import pytest
from click.testing import CliRunner
from PIL import Image
from test_storage_api import client_for

from chexmask.app.cli import cli
from chexmask.status import ImageStatus
from chexmask.storage import reviews
from chexmask.storage.auth import COOKIE, csrf_value
from chexmask.storage.browse import THUMB_NAME
from chexmask.storage.objectstore import segmentation_keys

pytest_plugins = ["services"]

TOKEN = "web-s3cret"
local_store_only = pytest.mark.parametrize("store", ["local"], indirect=True)
DICE = [0.91, 0.35, None, 0.62, 0.78, 0.35, 0.99]  # two equal values and a missing one


def overlay_jpeg(shade: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (1024, 1024), (shade, shade, shade)).save(buffer, "JPEG")
    return buffer.getvalue()


@pytest.fixture
def seeded(index, store, sample):
    """Seven segmentations with overlays in the store, one refused and one failed image."""
    ids = []
    for i, dice in enumerate(DICE):
        name = f"img_{i}.png"
        dataset = "padchest" if i % 2 else "chestx-ray8"
        keys = segmentation_keys(hashlib.sha256(f"{dataset}/{name}".encode()).hexdigest(), "hybridgnet-test")
        store.put(keys.overlay, overlay_jpeg(40 + 20 * i), "image/jpeg")
        _, seg = sample(
            name,
            dataset=dataset,
            dice_mean=dice,
            dice_max=None if dice is None else dice + 0.01,
            object_keys={"overlay": keys.overlay},
        )
        ids.append(seg.id)
    index.set_qc(ids[3], dice_rca_mean=0.62, dice_rca_max=0.63, flags=["lungs_swapped"])
    refused = index.register_image(uri="file:///data/x/ct.dcm", dataset="padchest", dataset_image_id="ct.dcm").image
    index.mark(refused.id, ImageStatus.REFUSED, code="wrong_modality", reason="The image is a CT, not an X-ray.")
    failed = index.register_image(uri="file:///data/x/bad.png", dataset="padchest", dataset_image_id="bad.png").image
    index.mark(failed.id, ImageStatus.FAILED, reason="decoder crashed")
    return index, store, ids


def card_ids(html: str) -> list[int]:
    return [int(i) for i in re.findall(r'data-id="(\d+)"', html)]


def link(html: str, element_id: str) -> str | None:
    found = re.search(rf'id="{element_id}"[^>]*href="([^"]+)"', html)
    return found.group(1).replace("&amp;", "&") if found else None


def expected_order(ids: list[int], descending: bool) -> list[int]:
    """NULL lowest, ties by id; descending reverses both."""
    key = [(d is not None, d or 0.0, i) for d, i in zip(DICE, ids, strict=True)]
    return [k[2] for k in sorted(key, reverse=descending)]


@local_store_only
@pytest.mark.parametrize("sort", ["dice_rca_mean", "-dice_rca_mean"])
def test_keyset_pages_walk_forward_and_back(seeded, sort):
    index, store, ids = seeded
    with client_for(index, store) as client:
        pages, url = [], f"/?sort={sort}&limit=3"
        while url:
            html = client.get(url).text
            pages.append(card_ids(html))
            url = link(html, "next-page")
        assert [i for p in pages for i in p] == expected_order(ids, sort.startswith("-"))
        assert [len(p) for p in pages] == [3, 3, 1]
        # and back again from the last page
        back = link(html, "prev-page")
        assert card_ids(client.get(back).text) == pages[1]


@local_store_only
def test_filters(seeded):
    index, store, ids = seeded
    with client_for(index, store) as client:

        def shown(**params) -> set[int]:
            response = client.get("/", params=params)
            assert response.status_code == 200, response.text
            return set(card_ids(response.text))

        assert shown(dataset="padchest") == {ids[1], ids[3], ids[5]}
        assert shown(min_dice_mean=0.6, max_dice_mean=0.8) == {ids[3], ids[4]}
        assert shown(min_dice_max=0.95) == {ids[6]}
        assert shown(flag="lungs_swapped") == {ids[3]} == shown(flag="*")
        assert shown(flag="lungs") == set()  # a whole flag name, not a substring
        assert shown(status="done") == set(ids) and shown(status="refused") == set()
        assert shown(id_pattern="img_[0-2]*") == set() and shown(id_pattern="img_1*") == {ids[1]}
        assert shown(created_after="2000-01-01") == set(ids) and shown(created_before="2000-01-01") == set()
        # empty form fields mean no constraint
        assert shown(dataset="", min_dice_mean="", reviewed="") == set(ids)
        reviews.add_review(index, ids[0], "ann", {"overall": 5})
        assert shown(reviewed="true") == {ids[0]}
        assert shown(reviewed="false") == set(ids) - {ids[0]}
        for bad in ({"min_dice_mean": "2"}, {"sort": "uri"}, {"status": "nope"}, {"limit": "0"}):
            assert client.get("/", params=bad).status_code == 422, bad


def test_thumbnail_made_once_stored_and_cached(seeded):
    index, store, ids = seeded
    with client_for(index, store) as client:
        first = client.get(f"/thumbs/{ids[0]}.jpg")
        assert first.status_code == 200 and first.headers["content-type"] == "image/jpeg"
        assert Image.open(io.BytesIO(first.content)).size == (256, 256)
        overlay = index.get_segmentation(ids[0]).object_keys["overlay"]
        stored = overlay.rsplit("/", 1)[0] + "/" + THUMB_NAME
        assert store.get(stored) == first.content  # beside the overlay, same prefix
        assert "max-age" in first.headers["cache-control"]
        again = client.get(f"/thumbs/{ids[0]}.jpg", headers={"If-None-Match": first.headers["etag"]})
        assert again.status_code == 304 and again.content == b""
        assert client.get(f"/thumbs/{ids[0]}.jpg").content == first.content
        assert client.get("/thumbs/999999.jpg").status_code == 404


@local_store_only
def test_image_page_neighbours_follow_the_filter(seeded):
    index, store, ids = seeded
    with client_for(index, store) as client:
        order = expected_order(ids, descending=False)
        middle = order[3]
        html = client.get(f"/image/{middle}", params={"sort": "dice_rca_mean"}).text
        assert link(html, "prev") == f"/image/{order[2]}?sort=dice_rca_mean"
        assert link(html, "next") == f"/image/{order[4]}?sort=dice_rca_mean"
        first = client.get(f"/image/{order[0]}", params={"sort": "dice_rca_mean"}).text
        assert link(first, "prev") is None
        padchest = client.get(f"/image/{ids[3]}", params={"dataset": "padchest", "sort": "id"}).text
        assert link(padchest, "prev") == f"/image/{ids[1]}?dataset=padchest&sort=id"
        assert link(padchest, "next") == f"/image/{ids[5]}?dataset=padchest&sort=id"
        assert "/objects/segmentations/" in padchest and "lungs_swapped" in padchest
        assert "file:///data/padchest/img_3.png" in padchest  # provenance
        assert client.get("/image/999999").status_code == 404


@local_store_only
def test_token_rules_for_pages_objects_and_writes(seeded):
    index, store, ids = seeded
    overlay = index.get_segmentation(ids[0]).object_keys["overlay"]
    with client_for(index, store, token=TOKEN) as client:
        for path in (
            "/",
            f"/image/{ids[0]}",
            f"/thumbs/{ids[0]}.jpg",
            "/problems",
            "/datasets/padchest",
            "/agreement",
            "/reviews.csv",
            "/queue",
            f"/objects/{overlay}",
        ):
            assert client.get(path).status_code == 401, path
        assert client.get("/?token=wrong").status_code == 401
        assert client.post(f"/review/{ids[0]}", data={"reviewer": "x", "overall": "3"}).status_code == 401
        # the token once in the address: a cookie, and a redirect that drops it
        response = client.get("/?dataset=padchest&token=" + TOKEN, follow_redirects=False)
        assert response.status_code == 303 and response.headers["location"] == "/?dataset=padchest"
        cookie = response.headers["set-cookie"]
        assert f"{COOKIE}={TOKEN}" in cookie and "HttpOnly" in cookie and "SameSite=Strict" in cookie
        assert client.get("/").status_code == 200  # the client keeps the cookie
        assert client.get(f"/objects/{overlay}").status_code == 200  # <img> requests carry it too
        # a cookie-borne write needs the page's form token
        no_form_token = client.post(f"/review/{ids[0]}", data={"reviewer": "x", "overall": "3"})
        assert no_form_token.status_code == 403
        ok = client.post(
            f"/review/{ids[0]}",
            data={"reviewer": "x", "overall": "3", "csrf": csrf_value(TOKEN)},
            follow_redirects=False,
        )
        assert ok.status_code == 303
    with client_for(index, store, token=TOKEN) as program:
        bearer = {"Authorization": f"Bearer {TOKEN}"}
        assert program.get("/", headers=bearer).status_code == 200
        assert (
            program.post(
                f"/review/{ids[1]}", data={"reviewer": "y", "overall": "2"}, headers=bearer, follow_redirects=False
            ).status_code
            == 303
        )
    assert [r.reviewer for r in reviews.reviews_of(index, ids[0])] == ["x"]


@local_store_only
def test_grade_validation_and_several_reviewers(seeded):
    index, store, ids = seeded
    with client_for(index, store) as client:

        def post(**form):
            return client.post(f"/review/{form.pop('seg', ids[0])}", data=form, follow_redirects=False)

        for bad in (
            {"overall": "0"},
            {"overall": "6"},
            {"overall": "x"},
            {"overall": ""},
            {"overall": "3", "heart": "9"},
            {"overall": "2.5"},
        ):
            assert post(reviewer="ann", **bad).status_code == 422, bad
        assert post(reviewer=" ", overall="3").status_code == 422
        assert post(seg=999999, reviewer="ann", overall="3").status_code == 422
        assert post(reviewer="ann", overall="3", next="https://evil.example/").headers["location"] == "/"
        response = post(
            reviewer="bob", overall="4", right_lung="5", heart="2", comment=" heart too small ", next=f"/image/{ids[1]}"
        )
        assert response.status_code == 303 and response.headers["location"] == f"/image/{ids[1]}"
        assert "chexmask_reviewer=bob" in response.headers["set-cookie"]
    grades = reviews.reviews_of(index, ids[0])
    assert [(r.reviewer, r.overall, r.right_lung, r.left_lung, r.heart, r.comment) for r in grades] == [
        ("ann", 3, None, None, None, None),
        ("bob", 4, 5, None, 2, "heart too small"),
    ]
    with pytest.raises(reviews.InvalidGrade):
        reviews.add_review(index, ids[0], "ann", {"overall": True})


@local_store_only
def test_review_export_and_agreement(seeded, tmp_path, monkeypatch):
    index, store, ids = seeded
    scored = [(i, d) for i, d in zip(ids, DICE, strict=True) if d is not None]
    for rank, (seg, _) in enumerate(sorted(scored, key=lambda p: p[1])):
        reviews.add_review(index, seg, "ann", {"overall": min(5, 1 + rank)})  # monotone in Dice
        reviews.add_review(index, seg, "bob", {"overall": 3})
    result = reviews.agreement(index)
    overall = result.with_dice[0]
    assert overall.n == 12 and overall.spearman is not None and 0 < overall.spearman < 1
    (pair,) = result.between_reviewers
    assert (pair.first, pair.second, pair.n) == ("ann", "bob", 6)
    assert pair.exact == pytest.approx(1 / 6) and pair.spearman is None  # bob is constant
    with client_for(index, store) as client:
        page = client.get("/agreement")
        assert page.status_code == 200 and "ann · bob" in page.text
        assert client.get("/agreement.png").content[:4] == b"\x89PNG"
        web_rows = list(csv.DictReader(io.StringIO(client.get("/reviews.csv").text)))
    monkeypatch.setenv("CHEXMASK_DATABASE_URL", index.engine.url.render_as_string(hide_password=False))
    out = tmp_path / "reviews.csv"
    result_cli = CliRunner().invoke(cli, ["reviews", "export", "--out", str(out)], catch_exceptions=False)
    assert result_cli.exit_code == 0, result_cli.output
    cli_rows = list(csv.DictReader(out.open()))
    assert cli_rows == web_rows and len(cli_rows) == 12
    assert list(cli_rows[0]) == list(reviews.EXPORT_COLUMNS)
    assert {r["reviewer"] for r in cli_rows} == {"ann", "bob"}


def test_queue_orders(seeded):
    index, store, ids = seeded
    queue = reviews.ReviewQueue(index)
    worst = reviews.QueueRequest("ann", "worst")
    assert queue.next(worst) == ids[2]  # the missing Dice first: nothing vouches for it
    reviews.add_review(index, ids[2], "ann", {"overall": 1})
    assert queue.next(worst) == ids[1]  # then 0.35, the lower id of the tie
    assert queue.next(reviews.QueueRequest("bob", "worst")) == ids[2]  # per reviewer
    sample = reviews.QueueRequest("ann", "random", dataset="chestx-ray8", seed=7)
    order = []
    for _ in range(4):
        found = queue.next(sample)
        if found is None:
            break
        order.append(found)
        reviews.add_review(index, found, "ann", {"overall": 3})
    assert set(order) | {ids[2]} == {ids[0], ids[2], ids[4], ids[6]}  # the dataset, each once
    assert queue.next(sample) is None
    again = reviews.ReviewQueue(index)._shuffled("chestx-ray8", 7)
    assert again == queue._shuffled("chestx-ray8", 7)  # the seed fixes the sample


@local_store_only
def test_queue_pages_and_grading_round_trip(seeded):
    index, store, ids = seeded
    with client_for(index, store) as client:
        assert 'id="reviewer-form"' in client.get("/queue").text  # asks who grades first
        client.post("/queue/reviewer", data={"reviewer": "ann", "next": "/queue?order=worst"})
        for expected in expected_order(ids, descending=False)[:3]:
            page = client.get("/queue?order=worst")
            assert f'action="/review/{expected}"' in page.text
            response = client.post(
                f"/review/{expected}", data={"reviewer": "ann", "overall": "4", "next": "/queue?order=worst"}
            )
            assert response.status_code == 200  # followed the redirect back to the queue
        assert client.get("/queue?order=sideways").status_code == 422


@local_store_only
def test_refused_and_failed_listed_with_codes(seeded, monkeypatch):
    index, store, _ = seeded
    with client_for(index, store) as client:
        refused = client.get("/problems", params={"status": "refused"}).text
        assert "wrong_modality" in refused and "The image is a CT, not an X-ray." in refused
        assert "ct.dcm" in refused and "bad.png" not in refused
        assert "decoder crashed" in client.get("/problems", params={"status": "failed"}).text
        assert "ct.dcm" not in client.get("/problems", params={"status": "refused", "code": "other"}).text
        assert client.get("/problems", params={"status": "done"}).status_code == 422
    monkeypatch.setenv("CHEXMASK_DATABASE_URL", index.engine.url.render_as_string(hide_password=False))
    runner = CliRunner()
    listed = json.loads(runner.invoke(cli, ["query", "--status", "refused", "--format", "json"]).output)
    assert [(r["dataset_image_id"], r["refusal_code"], r["reason"]) for r in listed] == [
        ("ct.dcm", "wrong_modality", "The image is a CT, not an X-ray.")
    ]
    table = runner.invoke(cli, ["query", "--status", "failed", "--format", "csv"]).output
    (row,) = list(csv.DictReader(io.StringIO(table)))
    assert set(row) == set(listed[0]) and row["reason"] == "decoder crashed"
    refused_usage = runner.invoke(cli, ["query", "--status", "refused", "--min-dice-mean", "0.5"])
    assert refused_usage.exit_code != 0 and "--min-dice-mean" in refused_usage.output


@local_store_only
def test_dataset_page_and_figures(seeded):
    index, store, _ = seeded
    with client_for(index, store) as client:
        page = client.get("/datasets/padchest").text
        assert "lungs_swapped" in page and "share ≥ 0.7" in page
        for figure in ("/datasets/padchest/dice.png", "/datasets/padchest/throughput.png"):
            response = client.get(figure)
            assert response.status_code == 200 and response.content[:4] == b"\x89PNG"
        assert "padchest" in client.get("/datasets").text


@local_store_only
@pytest.mark.parametrize("wide_from", [2, 1000], ids=["walk-time-index", "read-range-and-sort"])
def test_dice_range_under_a_time_sort_same_pages_either_plan(seeded, monkeypatch, wide_from):
    """SQLite walks the time index for a wide Dice range and reads a narrow one whole
    (browse._wide_ranges); both plans must list the same segmentations in the same order."""
    from chexmask.storage import browse
    from chexmask.storage.queries import QueryFilters

    index, _, ids = seeded
    monkeypatch.setattr(browse, "WIDE_RANGE", wide_from)
    filters = browse.GalleryFilters(QueryFilters(min_dice_mean=0.3, max_dice_mean=0.8))
    rows = [index.get_segmentation(i) for i in ids]
    expected = [
        r.id
        for r in sorted(rows, key=lambda r: (r.created_at, r.id), reverse=True)
        if r.dice_rca_mean in (0.35, 0.62, 0.78)
    ]
    assert len(expected) == 4
    walked, after = [], None
    while True:
        page = browse.page(index, filters, sort="-created_at", limit=3, after=after)
        walked += [item["id"] for item in page.items]
        if page.next_after is None:
            break
        after = page.next_after
    assert walked == expected
    assert browse.neighbours(index, filters, "-created_at", expected[1]) == (expected[0], expected[2])


@local_store_only
def test_datasets_listed_once_each_in_order(seeded):
    from chexmask.storage import browse

    index, _, _ = seeded
    assert browse.datasets(index) == ["chestx-ray8", "padchest"]


@local_store_only
def test_image_page_shows_the_measurements(index, store, sample):
    measured = {
        "ctr": 0.512,
        "right_lung_area_px": 90000,
        "left_lung_area_px": 80000,
        "heart_area_px": 40000,
        "heart_lung_area_ratio": 40000 / 170000,
        "right_lung_area_mm2": 90000 * 0.02,
        "left_lung_area_mm2": 80000 * 0.02,
        "heart_area_mm2": 40000 * 0.02,
        "pixel_spacing_row_mm": 0.1,
        "pixel_spacing_col_mm": 0.2,
        "pixel_spacing_source": "ImagerPixelSpacing",
    }
    _, with_spacing = sample("a.dcm", measurements=measured)
    no_spacing = {k: v for k, v in measured.items() if not k.endswith("_mm2") and "spacing" not in k}
    _, pixels_only = sample("b.png", measurements=no_spacing)
    _, unmeasured = sample("c.png")
    with client_for(index, store) as client:
        html = client.get(f"/image/{with_spacing.id}").text
        assert "0.512" in html and "0.235" in html and "1,800 mm²" in html and "ImagerPixelSpacing" in html
        html = client.get(f"/image/{pixels_only.id}").text
        assert "0.512" in html and "90,000 px" in html and "No pixel spacing known" in html
        assert "Measurements" not in client.get(f"/image/{unmeasured.id}").text
