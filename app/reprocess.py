"""Backfill: queue segmentation of every image that lacks a result from a model."""

from __future__ import annotations

import random
from collections.abc import Iterable
from typing import TypeVar

from tqdm import tqdm

from chexmask.config import Settings
from chexmask.queues import SEGMENT_QUEUE, SEGMENT_TASK
from chexmask.storage.index import MaskIndex
from chexmask.storage.models import SourceImage
from chexmask.storage.queries import QueryFilters
from chexmask.worker.celery_app import create_app


def reprocess(settings: Settings, model: str, *, dataset: str | None = None, release: str | None = None,
              sample: int | None = None, seed: int = 0) -> int:
    """Queue every image of the filter without a segmentation by ``model`` (refused ones
    excepted; images left queued, processing or failed by earlier runs included).
    Workers segment with their configured weights, so ``model`` must be theirs.
    With ``sample``, a random ``sample`` of them (seeded, so a rerun picks the same).
    Imported images are never queued themselves (no bytes); the files a scan
    linked to them are, when ``model`` is not the imported one (see
    ``MaskIndex.images_missing_model``). Returns how many were queued."""
    index = MaskIndex(settings.database_url)
    index.upgrade()
    app = create_app(settings)
    queued = 0
    try:
        with app.producer_or_acquire() as producer:
            images: Iterable[SourceImage] = index.images_missing_model(
                model, QueryFilters(dataset=dataset, release=release))
            if sample is not None:
                images = reservoir(images, sample, random.Random(seed))
            for image in tqdm(images, desc=f"reprocess {model}", unit=" image"):
                app.send_task(SEGMENT_TASK, args=[image.id], queue=SEGMENT_QUEUE, producer=producer)
                queued += 1
    finally:
        index.close()
    return queued


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
