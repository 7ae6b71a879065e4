"""Backfill and retries: queue again images that lack a result.

In the embedded mode (no ``CHEXMASK_BROKER_URL`` set) the index is the queue:
images go back to ``queued`` and the next ``serve`` run, or a running one at its
next sweep, takes them up. With Celery workers, segment tasks are sent as well.
"""

from __future__ import annotations

from tqdm import tqdm

from chexmask.config import Settings
from chexmask.queues import QC_QUEUE, QC_TASK, SEGMENT_QUEUE, SEGMENT_TASK
from chexmask.storage.index import MaskIndex
from chexmask.storage.queries import QueryFilters
from chexmask.worker.celery_app import create_app
from chexmask.worker.leases import Sweeper


def reprocess(settings: Settings, model: str, *, dataset: str | None = None, release: str | None = None) -> int:
    """Queue every image of the filter without a segmentation by ``model`` (refused ones
    excepted; images left queued, processing or failed by earlier runs included).
    Workers segment with their configured weights, so ``model`` must be theirs.
    Returns how many were queued."""
    index = MaskIndex(settings.database_url)
    index.upgrade()
    try:
        images = index.images_missing_model(model, QueryFilters(dataset=dataset, release=release))
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
