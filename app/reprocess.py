"""Backfill and retries: queue again images that lack a result.

In the embedded mode (no ``CHEXMASK_BROKER_URL`` set) the index is the queue:
images go back to ``queued`` and the next ``serve`` run, or a running one at its
next sweep, takes them up. With Celery workers, segment tasks are sent as well.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from typing import TypeVar

from tqdm import tqdm

from chexmask.config import Settings
from chexmask.queues import QC_QUEUE, QC_TASK, SEGMENT_QUEUE, SEGMENT_TASK
from chexmask.storage.index import MaskIndex
from chexmask.storage.models import SourceImage
from chexmask.storage.queries import QueryFilters
from chexmask.worker.celery_app import create_app
from chexmask.worker.leases import Sweeper


def reprocess(
    settings: Settings,
    model: str,
    *,
    dataset: str | None = None,
    release: str | None = None,
    sample: int | None = None,
    seed: int = 0,
) -> int:
    """Queue every image of the filter without a segmentation by ``model`` (refused ones
    excepted; images left queued, processing or failed by earlier runs included).
    Workers segment with their configured weights, so ``model`` must be theirs.
    With ``sample``, a random ``sample`` of them (seeded, so a rerun picks the same).
    Imported images are never queued themselves (no bytes); the files a scan
    linked to them are, when ``model`` is not the imported one (see
    ``MaskIndex.images_missing_model``). Returns how many were queued."""
    index = MaskIndex(settings.database_url)
    index.upgrade()
    try:
        images: Iterable[SourceImage] = index.images_missing_model(
            model, QueryFilters(dataset=dataset, release=release)
        )
        if sample is not None:
            images = reservoir(images, sample, random.Random(seed))
        ids = [image.id for image in tqdm(images, desc=f"reprocess {model}", unit=" image")]
        index.requeue_ids(ids)
        if settings.broker_configured:
            _send(settings, ids)
    finally:
        index.close()
    return len(ids)


def retry(settings: Settings, *, failed: bool, dataset: str | None = None) -> int:
    """Queue again what nobody alive holds (images and QCs of crashed workers, failed
    images whose automatic retry is due) and, with ``failed``, every failed image of
    the filter now; how many images and QCs were queued."""
    index = MaskIndex(settings.database_url)
    index.upgrade()
    app = create_app(settings) if settings.broker_configured else None
    try:
        ids: list[int] = index.retry_failed(QueryFilters(dataset=dataset)) if failed else []
        qcs: list[int] = []
        sweeper = Sweeper(index, ids.append, qcs.append, settings.visibility_timeout_s if app else 0)
        sweeper.sweep()
        if app is not None:
            _send(settings, ids, app)
            for segmentation_id in qcs:
                app.send_task(QC_TASK, args=[segmentation_id], queue=QC_QUEUE)
    finally:
        index.close()
    return len(set(ids)) + len(qcs)


def _send(settings: Settings, ids: list[int], app=None) -> None:
    app = app or create_app(settings)
    with app.producer_or_acquire() as producer:
        for image_id in ids:
            app.send_task(SEGMENT_TASK, args=[image_id], queue=SEGMENT_QUEUE, producer=producer)


T = TypeVar("T")


def reservoir(items: Iterable[T], size: int, rng: random.Random) -> list[T]:
    """A uniform random sample of ``size`` items of a stream of unknown length, in
    stream order, holding only ``size`` items at a time (Algorithm R)."""
    kept: list[tuple[int, T]] = []
    for seen, item in enumerate(items):
        if seen < size:
            kept.append((seen, item))
        elif (slot := rng.randrange(seen + 1)) < size:
            kept[slot] = (seen, item)
    return [item for _, item in sorted(kept, key=lambda pair: pair[0])]
