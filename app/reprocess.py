"""Backfill: queue segmentation of every image that lacks a result from a model."""

from __future__ import annotations

from tqdm import tqdm

from chexmask.config import Settings
from chexmask.queues import SEGMENT_QUEUE, SEGMENT_TASK
from chexmask.storage.index import MaskIndex
from chexmask.storage.queries import QueryFilters
from chexmask.worker.celery_app import create_app


def reprocess(settings: Settings, model: str, *, dataset: str | None = None, release: str | None = None) -> int:
    """Queue every image of the filter without a segmentation by ``model`` (refused ones
    excepted; images left queued, processing or failed by earlier runs included).
    Workers segment with their configured weights, so ``model`` must be theirs.
    Returns how many were queued."""
    index = MaskIndex(settings.database_url)
    index.upgrade()
    app = create_app(settings)
    queued = 0
    try:
        with app.producer_or_acquire() as producer:
            images = index.images_missing_model(model, QueryFilters(dataset=dataset, release=release))
            for image in tqdm(images, desc=f"reprocess {model}", unit=" image"):
                app.send_task(SEGMENT_TASK, args=[image.id], queue=SEGMENT_QUEUE, producer=producer)
                queued += 1
    finally:
        index.close()
    return queued
