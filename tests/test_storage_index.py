"""MaskIndex on SQLite and PostgreSQL: registration, lifecycle, idempotency, queries."""

from __future__ import annotations

import hashlib
import threading
from datetime import datetime, timedelta, timezone

import pytest

from chexmask.errors import ConfigError, NotFound
from chexmask.status import ImageStatus, QCStatus
from chexmask.storage.queries import QueryFilters

POINTS = [[i, i + 1] for i in range(120)]
RLE = {"right_lung": "1 5", "left_lung": "11 5", "heart": "21 5"}


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def segmentation_args(image, digest: str, model: str = "m1", weights: str = "aa" * 32) -> dict:
    return dict(
        image_id=image.id,
        image_sha256=digest,
        model_version=model,
        weights_sha256=weights,
        landmarks_1024=POINTS,
        landmarks_original=POINTS,
        height=100,
        width=80,
        rle=RLE,
        rle_1024=RLE,
        latent=[0.5] * 64,
        object_keys={"record": "r.json"},
        timings={"forward_s": 0.1},
    )


def test_register_image_is_an_upsert(index):
    first = index.register_image(uri="s3://b/x.png", dataset="NIH", etag_or_version="e1", dataset_image_id="x.png")
    assert first.created and not first.changed and first.needs_processing
    assert first.image.dataset == "chestx-ray8" and first.image.status is ImageStatus.QUEUED

    again = index.register_image(uri="s3://b/x.png", dataset="nih", etag_or_version="e1", release="2017")
    assert not again.created and not again.changed and not again.needs_processing
    assert again.image.id == first.image.id
    assert (again.image.release, again.image.dataset_image_id) == ("2017", "x.png")

    index.update_image(first.image.id, sha256=sha("v1"), height=10, width=20)
    index.mark(first.image.id, ImageStatus.PROCESSING)
    index.mark(first.image.id, ImageStatus.DONE)
    changed = index.register_image(uri="s3://b/x.png", dataset="nih", etag_or_version="e2")
    assert changed.changed and changed.needs_processing
    image = changed.image
    assert (image.status, image.attempts, image.etag_or_version) == (ImageStatus.QUEUED, 0, "e2")
    # facts about the old bytes are gone; descriptive metadata stays
    assert (image.sha256, image.height, image.width) == (None, None, None)
    assert (image.release, image.dataset_image_id) == ("2017", "x.png")
    assert len(index.images()) == 1


def test_register_image_detects_new_sha_or_size(index):
    index.register_image(uri="file:///a.png", dataset="padchest", sha256=sha("1"), size=10)
    assert not index.register_image(uri="file:///a.png", dataset="padchest", sha256=sha("1")).changed
    assert index.register_image(uri="file:///a.png", dataset="padchest", sha256=sha("2")).changed
    assert not index.register_image(uri="file:///a.png", dataset="padchest", size=10).changed
    assert index.register_image(uri="file:///a.png", dataset="padchest", size=11).changed


def test_images_by_uri(index):
    uris = [f"file:///{i}.png" for i in range(1200)]
    for uri in uris[::100]:
        index.register_image(uri=uri, dataset="nih")
    found = index.images_by_uri(uris + uris[:5])
    assert sorted(found) == sorted(uris[::100])  # found across the 500-URI chunks
    assert all(found[uri].uri == uri for uri in found)
    assert index.images_by_uri([]) == {}


def test_status_lifecycle(index):
    image = index.register_image(uri="file:///a.png", dataset="vindr").image
    assert (image.status, image.attempts) == (ImageStatus.QUEUED, 0)

    image = index.mark(image.id, ImageStatus.PROCESSING)
    assert (image.status, image.attempts) == (ImageStatus.PROCESSING, 1)
    image = index.mark(image.id, ImageStatus.FAILED, code="timeout", reason="worker lost")
    assert (image.status, image.refusal_code, image.reason) == (ImageStatus.FAILED, "timeout", "worker lost")
    image = index.mark(image.id, "processing")
    assert (image.status, image.attempts, image.reason) == (ImageStatus.PROCESSING, 2, None)
    image = index.mark(image.id, ImageStatus.REFUSED, code="wrong_modality", reason="a CT slice")
    assert (image.status, image.refusal_code) == (ImageStatus.REFUSED, "wrong_modality")
    assert index.get_image(image.id).status is ImageStatus.REFUSED
    assert index.get_image(image.id).updated_at >= image.first_seen

    with pytest.raises(ValueError, match="refusal code"):
        index.mark(image.id, ImageStatus.REFUSED)
    with pytest.raises(NotFound):
        index.mark(9999, ImageStatus.DONE)


def test_concurrent_processing_marks_count_every_attempt(index):
    image = index.register_image(uri="file:///a.png", dataset="vindr").image
    threads = [threading.Thread(target=index.mark, args=(image.id, ImageStatus.PROCESSING)) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert index.get_image(image.id).attempts == 8


def test_same_sha_and_model_make_one_segmentation(index):
    digest = sha("bytes")
    a = index.register_image(uri="file:///a.png", dataset="mimic", sha256=digest).image
    b = index.register_image(uri="file:///copy-of-a.png", dataset="mimic", sha256=digest).image
    first, created = index.add_segmentation(**segmentation_args(a, digest))
    assert created and first.qc_status is QCStatus.PENDING
    again, created = index.add_segmentation(**segmentation_args(b, digest))
    assert not created and again.id == first.id and again.image_id == a.id
    other_model, created = index.add_segmentation(**segmentation_args(a, digest, model="m2"))
    assert created and other_model.id != first.id

    assert index.has_segmentation(digest, "m1") and not index.has_segmentation(digest, "m3")
    stored = index.get_segmentation(first.id)
    assert stored.landmarks_1024 == POINTS and stored.latent == [0.5] * 64
    assert stored.rle() == RLE and stored.rle("1024") == RLE
    assert stored.object_keys == {"record": "r.json"} and stored.timings == {"forward_s": 0.1}
    assert stored.created_at.tzinfo is not None
    # listed once, with the image it was made for
    assert [r.uri for r in index.query(QueryFilters(model="m1"))] == ["file:///a.png"]
    assert index.get_segmentation(12345) is None
    with pytest.raises(NotFound):
        index.add_segmentation(**{**segmentation_args(a, digest), "image_id": 12345})


def test_changed_image_hides_its_old_segmentation(index):
    image = index.register_image(uri="file:///a.png", dataset="nih", etag_or_version="1", sha256=sha("old")).image
    index.add_segmentation(**segmentation_args(image, sha("old")))
    assert len(index.query()) == 1
    index.register_image(uri="file:///a.png", dataset="nih", etag_or_version="2")
    assert index.query() == []  # the stored masks are of bytes the image no longer has
    index.update_image(image.id, sha256=sha("new"))
    new, _ = index.add_segmentation(**segmentation_args(image, sha("new")))
    assert [r.id for r in index.query()] == [new.id]


def test_dataset_of_segmentations_follows_their_image(index):
    image = index.register_image(uri="file:///a.png", dataset="nih", sha256=sha("a")).image
    index.add_segmentation(**segmentation_args(image, sha("a")))
    index.register_image(uri="file:///a.png", dataset="padchest")
    assert index.query(QueryFilters(dataset="nih")) == []
    (row,) = index.query(QueryFilters(dataset="padchest"))
    assert row.dataset == "padchest" and index.get_segmentation(row.id).dataset == "padchest"


def test_concurrent_add_segmentation_makes_one_row(index):
    digest = sha("bytes")
    image = index.register_image(uri="file:///a.png", dataset="mimic", sha256=digest).image
    results = []

    def add() -> None:
        results.append(index.add_segmentation(**segmentation_args(image, digest)))

    threads = [threading.Thread(target=add) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len({seg.id for seg, _ in results}) == 1
    assert sum(created for _, created in results) == 1


def test_model_versions_are_pinned_to_weights(index):
    model = index.register_model("m1", "aa" * 32, "first")
    assert index.register_model("m1", "aa" * 32).id == model.id
    with pytest.raises(ConfigError, match="new version name"):
        index.register_model("m1", "bb" * 32)
    digest = sha("x")
    image = index.register_image(uri="file:///x.png", dataset="nih", sha256=digest).image
    with pytest.raises(ConfigError):
        index.add_segmentation(**segmentation_args(image, digest, weights="bb" * 32))
    assert [m.name for m in index.models()] == ["m1"]


def test_add_segmentation_validates_shapes(index):
    digest = sha("x")
    image = index.register_image(uri="file:///x.png", dataset="nih", sha256=digest).image
    with pytest.raises(ValueError, match="120 landmarks"):
        index.add_segmentation(**{**segmentation_args(image, digest), "landmarks_1024": POINTS[:-1]})
    with pytest.raises(ValueError, match="heart"):
        index.add_segmentation(**{**segmentation_args(image, digest), "rle": {"right_lung": ""}})


def test_set_qc_replaces_results(index, sample):
    _, seg = sample("a")
    seg = index.set_qc(
        seg.id,
        dice_rca_mean=0.8,
        dice_rca_max=0.9,
        dice_rca_mean_rl=0.7,
        dice_rca_max_h=0.95,
        shape_outlier_score=1.5,
        flags=["low_heart"],
    )
    assert (seg.qc_status, seg.dice_rca_mean, seg.dice_rca_max_h, seg.qc_flags) == (
        QCStatus.DONE,
        0.8,
        0.95,
        ["low_heart"],
    )
    seg = index.set_qc(seg.id, status=QCStatus.SKIPPED)
    assert (seg.qc_status, seg.dice_rca_mean, seg.qc_flags) == (QCStatus.SKIPPED, None, None)
    with pytest.raises(NotFound):
        index.set_qc(999, dice_rca_mean=0.5)


@pytest.fixture
def populated(index, sample):
    """12 segmentations over three datasets, with Dice 0.50 ... 0.94."""
    for i in range(12):
        dataset = ["chestx-ray8", "padchest", "vindr-cxr"][i % 3]
        sample(
            f"img_{i:02d}.png",
            dataset=dataset,
            release="r1" if i < 6 else "r2",
            dice_mean=round(0.5 + 0.04 * i, 2),
            dice_max=round(0.6 + 0.03 * i, 2),
        )
    image = index.register_image(uri="file:///pending.png", dataset="nih").image
    index.mark(image.id, ImageStatus.PROCESSING)
    return index


def ids(rows) -> list[str]:
    return [row.dataset_image_id for row in rows]


def test_filters(populated):
    query = populated.query
    assert len(query()) == 12
    assert ids(query(QueryFilters(dataset="NIH"))) == ["img_00.png", "img_03.png", "img_06.png", "img_09.png"]
    assert ids(query(QueryFilters(dataset="padchest", release="r2"))) == ["img_07.png", "img_10.png"]
    assert ids(query(QueryFilters(min_dice_mean=0.85))) == ["img_09.png", "img_10.png", "img_11.png"]
    assert ids(query(QueryFilters(max_dice_mean=0.55))) == ["img_00.png", "img_01.png"]
    assert ids(query(QueryFilters(min_dice_max=0.9, max_dice_max=0.93))) == ["img_10.png", "img_11.png"]
    assert ids(query(QueryFilters(model="hybridgnet-test", dataset="vindr", min_dice_mean=0.6))) == [
        "img_05.png",
        "img_08.png",
        "img_11.png",
    ]
    assert query(QueryFilters(model="other")) == []
    assert len(query(QueryFilters(status=ImageStatus.DONE))) == 12
    assert query(QueryFilters(status=ImageStatus.PROCESSING)) == []


def test_id_patterns_exact_glob_like(populated):
    query = populated.query
    assert ids(query(QueryFilters(id_pattern="img_01.png"))) == ["img_01.png"]
    assert ids(query(QueryFilters(id_pattern="img_1?.png"))) == ["img_10.png", "img_11.png"]
    assert ids(query(QueryFilters(id_pattern="*_0[!]*"))) == []
    assert len(query(QueryFilters(id_pattern="img_0*"))) == 10
    assert ids(query(QueryFilters(id_pattern="%1_.png"))) == ["img_10.png", "img_11.png"]
    assert query(QueryFilters(id_pattern="IMG_0*")) == []  # case sensitive on every backend
    assert ids(query(QueryFilters(id_pattern="img_?1.png"))) == ["img_01.png", "img_11.png"]
    assert query(QueryFilters(id_pattern="im__0*")) == []  # in a glob "_" is literal


def test_created_window(index, sample):
    sample("early.png")
    middle = datetime.now(timezone.utc)
    sample("late.png")
    assert ids(index.query(QueryFilters(created_before=middle))) == ["early.png"]
    assert ids(index.query(QueryFilters(created_after=middle))) == ["late.png"]
    naive_future = datetime.utcnow() + timedelta(hours=1)
    assert index.query(QueryFilters(created_after=naive_future)) == []


def test_sort_and_pagination(populated):
    query = populated.query
    best_first = ids(query(sort="-dice_rca_mean", limit=100))
    assert best_first == [f"img_{i:02d}.png" for i in reversed(range(12))]
    pages = [ids(query(sort="-dice_rca_mean", limit=5, offset=o)) for o in (0, 5, 10)]
    assert [name for page in pages for name in page] == best_first
    assert [len(page) for page in pages] == [5, 5, 2]
    assert ids(query(sort="dataset_image_id", limit=2, offset=3)) == ["img_03.png", "img_04.png"]
    assert ids(query(sort="-id", limit=1)) == ["img_11.png"]
    with pytest.raises(ValueError, match="cannot sort"):
        query(sort="uri")


def test_missing_dice_sorts_lowest(populated, sample):
    sample("no_qc.png")
    assert ids(populated.query(sort="-dice_rca_mean"))[-1] == "no_qc.png"
    assert ids(populated.query(sort="dice_rca_mean"))[0] == "no_qc.png"


def test_images_and_status_counts(populated):
    processing = populated.images(QueryFilters(status=ImageStatus.PROCESSING))
    assert [i.uri for i in processing] == ["file:///pending.png"]
    assert len(populated.images(QueryFilters(dataset="padchest"), limit=3, offset=2)) == 2
    with pytest.raises(ValueError):
        populated.images(QueryFilters(min_dice_mean=0.5))
    counts = populated.status_counts()
    assert counts[("chestx-ray8", "r1")] == {ImageStatus.DONE: 2}
    assert counts[("chestx-ray8", None)] == {ImageStatus.PROCESSING: 1}
    assert populated.status_counts(QueryFilters(dataset="vindr")).keys() == {("vindr-cxr", "r1"), ("vindr-cxr", "r2")}


def test_images_missing_model(populated):
    assert [i.uri for i in populated.images_missing_model("hybridgnet-test")] == ["file:///pending.png"]
    refused = populated.register_image(uri="file:///refused.png", dataset="nih").image
    populated.mark(refused.id, ImageStatus.REFUSED, code="not_an_image")
    missing = list(populated.images_missing_model("hybridgnet-2", QueryFilters(dataset="padchest")))
    assert len(missing) == 4 and all(i.dataset == "padchest" for i in missing)
    assert len(list(populated.images_missing_model("hybridgnet-2", batch_size=2))) == 13
