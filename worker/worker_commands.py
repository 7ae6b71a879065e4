"""``chexmask worker``: a Celery worker for the scaled-out setup."""

from __future__ import annotations

import click

from chexmask.worker.celery_app import QUEUES, SEGMENT_QUEUE


@click.command("worker")
@click.option("--queues", "-Q", default=",".join(QUEUES), show_default=True,
              help="Comma-separated queues to consume: ingest, segment, qc.")
@click.option("--concurrency", "-c", type=click.IntRange(min=1),
              help="Tasks at once (default: twice CHEXMASK_BATCH_SIZE, so a batch fills while one is inferred).")
@click.option("--pool", type=click.Choice(["threads", "prefork", "solo"]), default="threads", show_default=True,
              help="threads: one model per worker, shared by all tasks, which batch together; "
                   "prefork: one model per child process (no batching across children).")
@click.option("--beat", is_flag=True, help="Also run the scheduler for CHEXMASK_SCAN_PREFIXES (one per deployment).")
@click.option("--loglevel", "-l", default="info", show_default=True)
@click.option("--hostname", "-n", help="Worker name (default: celery@<host>).")
def worker_command(queues: str, concurrency: int | None, pool: str, beat: bool, loglevel: str,
                   hostname: str | None) -> int:
    """Consume the ingest, segment and QC queues of CHEXMASK_BROKER_URL.

    Tasks are acknowledged only when done, so the work of a worker that dies is
    delivered again; results go to CHEXMASK_DATABASE_URL and CHEXMASK_STORE_URL.
    Segmentation uses CHEXMASK_WEIGHTS on CHEXMASK_DEVICE (GPU when present),
    in CHEXMASK_MODEL_THREADS threads (default one per core) that share up to
    CHEXMASK_BATCH_SIZE images, each waiting at most CHEXMASK_BATCH_WAIT_MS
    (default 0) for its batch to fill.
    """
    from chexmask.config import Settings
    from chexmask.storage.index import MaskIndex
    from chexmask.worker.celery_app import app, prune_sqlite_broker

    settings = Settings.from_env()
    names = [q.strip() for q in queues.split(",") if q.strip()]
    if unknown := set(names) - set(QUEUES):
        raise click.UsageError(f"unknown queue(s): {', '.join(sorted(unknown))}")
    prune_sqlite_broker(settings.broker_url)
    index = MaskIndex(settings.database_url)
    index.upgrade()  # a no-op when current; a fresh embedded home gets its schema
    index.close()
    from chexmask.worker.tasks import service

    click.echo(service().qc_state)  # reads the QC bank now: a bad one stops the worker, not every image
    if SEGMENT_QUEUE in names and pool != "prefork":
        service().runner  # load the model now: bad weights stop the worker, not every image
    worker = app.Worker(queues=names, concurrency=concurrency or 2 * settings.batch_size, pool=pool,
                        beat=beat, loglevel=loglevel, hostname=hostname)
    worker.start()
    return worker.exitcode or 0
