"""The read-only HTTP API, through FastAPI's TestClient, on every index and store backend."""

from __future__ import annotations

import hashlib
import json

import pytest
from fastapi.testclient import TestClient

from chexmask.config import Settings
from chexmask.storage.api import create_app
from chexmask.storage.objectstore import LocalStore, segmentation_keys

TOKEN = "s3cret-token"
# The object routes run on both stores; the rest need only one.
local_store_only = pytest.mark.parametrize("store", ["local"], indirect=True)


def store_url(store) -> str:
    if isinstance(store, LocalStore):
        return store.root.as_uri()
    return f"s3://{store.bucket}/{store.prefix}"


def client_for(index, store, token: str | None = None) -> TestClient:
    settings = Settings(
        database_url=index.engine.url.render_as_string(hide_password=False),
        store_url=store_url(store),
        api_token=token,
    )
    return TestClient(create_app(settings))


@pytest.fixture
def seeded(index, store, sample):
    """Five segmentations; the best one has its artefacts in the store."""
    for i in range(5):
        name = f"img_{i}.png"
        keys = segmentation_keys(hashlib.sha256(name.encode()).hexdigest(), "hybridgnet-test")
        objects = {"record": keys.record, "heart": keys.heart} if i == 4 else None
        sample(name, dataset="padchest", dice_mean=0.6 + i / 10, dice_max=0.95, object_keys=objects)
    store.put(keys.record, json.dumps({"id": "img_4.png"}).encode(), "application/json")
    store.put(keys.heart, b"\x89PNG\r\n\x1a\nfake", "image/png")
    store.put("sources/img_4.png", b"the patient's x-ray")
    return index, store


@local_store_only
def test_list_filter_and_paginate(seeded):
    with client_for(*seeded) as client:
        page = client.get(
            "/segmentations",
            params={"dataset": "padchest", "min_dice_mean": 0.75, "sort": "-dice_rca_mean", "limit": 2},
        ).json()
        assert [i["dataset_image_id"] for i in page["items"]] == ["img_4.png", "img_3.png"]
        assert (page["limit"], page["offset"], page["next_offset"]) == (2, 0, 2)
        last = client.get(
            "/segmentations",
            params={"dataset": "padchest", "min_dice_mean": 0.75, "sort": "-dice_rca_mean", "limit": 2, "offset": 2},
        ).json()
        assert [i["dataset_image_id"] for i in last["items"]] == ["img_2.png"]
        assert last["next_offset"] is None
        item = last["items"][0]
        assert (item["status"], item["qc_status"], item["dice_rca_mean"]) == ("done", "done", 0.8)

        assert client.get("/segmentations", params={"id_pattern": "img_[!]*"}).json()["items"] == []
        assert len(client.get("/segmentations", params={"status": "done"}).json()["items"]) == 5
        assert client.get("/segmentations", params={"sort": "uri"}).status_code == 422
        assert client.get("/segmentations", params={"limit": 0}).status_code == 422
        assert client.get("/segmentations", params={"status": "nope"}).status_code == 422


def test_record_links_to_stored_objects(seeded):
    with client_for(*seeded) as client:
        best = client.get("/segmentations", params={"sort": "-dice_rca_mean", "limit": 1}).json()
        record = client.get(f"/segmentations/{best['items'][0]['id']}").json()
        assert record["dice_rca_mean"] == pytest.approx(1.0)
        assert len(record["landmarks_1024"]) == 120 and record["rle_heart"] == "20 4"
        assert set(record["objects"]) == {"record", "heart"}

        heart = client.get(record["objects"]["heart"])
        assert heart.status_code == 200 and heart.content == b"\x89PNG\r\n\x1a\nfake"
        assert heart.headers["content-type"] == "image/png"
        assert client.get(record["objects"]["record"]).json() == {"id": "img_4.png"}

        assert client.get("/segmentations/999999").status_code == 404
        assert client.get("/objects/segmentations/nothing.png").status_code == 404
        # only segmentation artefacts are served, never whatever else shares the store
        assert client.get("/objects/sources/img_4.png").status_code == 404
        assert client.get("/objects/segmentations/../sources/img_4.png").status_code == 404


@local_store_only
def test_stats(seeded):
    with client_for(*seeded) as client:
        (padchest,) = client.get("/stats").json()
        assert padchest["dataset"] == "padchest" and padchest["segmentations"] == 5
        assert padchest["dice_rca_mean"]["mean"] == pytest.approx(0.8)
        assert padchest["dice_rca_mean"]["frac_good"] == pytest.approx(0.8)
        assert client.get("/stats", params={"dataset": "nih"}).json() == []


@local_store_only
def test_token_required_when_configured(seeded):
    with client_for(*seeded, token=TOKEN) as client:
        assert client.get("/health").json()["status"] == "ok"  # probes need no token
        assert client.get("/openapi.json").status_code == 200
        for path in ("/segmentations", "/segmentations/1", "/stats", "/objects/segmentations/x.png"):
            response = client.get(path)
            assert response.status_code == 401, path
            assert response.headers["www-authenticate"] == "Bearer"
            wrong = client.get(path, headers={"Authorization": "Bearer wrong"})
            assert wrong.status_code == 401
        good = {"Authorization": f"Bearer {TOKEN}"}
        assert len(client.get("/segmentations", headers=good).json()["items"]) == 5
        assert client.get("/stats", headers=good).status_code == 200


@local_store_only
def test_open_without_token(seeded):
    index, _ = seeded
    with client_for(*seeded) as client:
        assert client.get("/segmentations").status_code == 200
        assert client.get("/health").json() == {"status": "ok", "schema_revision": index.head_revision()}


@local_store_only
def test_openapi_documents_the_routes(seeded):
    with client_for(*seeded) as client:
        paths = client.get("/openapi.json").json()["paths"]
        assert {"/segmentations", "/segmentations/{segmentation_id}", "/objects/{key}", "/stats", "/health"} <= set(
            paths
        )
        parameters = {p["name"] for p in paths["/segmentations"]["get"]["parameters"]}
        assert {"dataset", "min_dice_mean", "sort", "limit", "offset"} <= parameters


def test_health_fails_when_index_is_unreachable(tmp_path, unused_port):
    nobody_listens = f"postgresql://postgres@127.0.0.1:{unused_port}/none"
    settings = Settings(database_url=nobody_listens, store_url=tmp_path.as_uri())
    with TestClient(create_app(settings)) as client:
        assert client.get("/health").status_code == 503


@local_store_only
def test_out_of_range_numbers_and_huge_keys_are_client_errors(index, store):
    client = client_for(index, store)
    assert client.get("/segmentations", params={"offset": "99999999999999999999"}).status_code == 422
    assert client.get("/segmentations/9223372036854775808").status_code == 422
    assert client.get("/objects/segmentations/" + "k" * 60_000).status_code == 404


def test_health_names_no_database_detail(tmp_path):
    settings = Settings(
        database_url="postgresql+psycopg://u:pw@db.internal.example:6543/x", store_url=tmp_path.as_uri()
    )
    response = TestClient(create_app(settings)).get("/health")
    assert response.status_code == 503
    assert "db.internal.example" not in response.text and "6543" not in response.text
