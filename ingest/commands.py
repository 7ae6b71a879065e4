"""``chexmask serve|watch|listen|scan|reprocess``: thin click wrappers over the ingest library."""

from __future__ import annotations

import signal
import threading
from pathlib import Path

import click

from chexmask.config import Settings
from chexmask.ingest.watcher import DEFAULT_RECONCILE_S, DEFAULT_SETTLE_S


def _dataset_options(command):
    command = click.option("--release", help="Release tag recorded with every image.")(command)
    return click.option("--dataset", help="Dataset of every image (default: inferred from each path: "
                                          "ChestX-ray8, CheXpert, MIMIC-CXR-JPG, PadChest, VinDr-CXR, else generic).")(command)


def _watch_options(command):
    for option in reversed([
        click.option("--polling", is_flag=True, help="Poll the folder instead of using OS events (network mounts)."),
        click.option("--settle", type=float, default=DEFAULT_SETTLE_S, show_default=True,
                     help="Seconds a file's size and mtime must stay still before it counts as complete "
                          "(when no close event says so)."),
        click.option("--reconcile-every", type=float, default=DEFAULT_RECONCILE_S, show_default=True,
                     help="Seconds between full rescans that catch files whose events were missed."),
    ]):
        command = option(command)
    return command


def _wait_for_stop() -> None:
    """Block until SIGINT or SIGTERM."""
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        while not stop.wait(1.0):
            pass
    except KeyboardInterrupt:
        pass


def _intake(settings: Settings):
    from chexmask.ingest.queue import CeleryQueue, Intake
    from chexmask.ingest.registry import Registry
    from chexmask.storage.index import MaskIndex
    from chexmask.worker.celery_app import app

    index = MaskIndex(settings.database_url)
    index.upgrade()
    return Intake(Registry(index), CeleryQueue(app))


@click.command("serve")
@click.option("--inbox", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Folder to watch (created if missing); subfolders included.")
@click.option("--once", is_flag=True, help="Process what is in the inbox now, then exit.")
@_dataset_options
@_watch_options
@click.option("--threads", type=int, help="Images in flight (default: twice CHEXMASK_BATCH_SIZE).")
def serve_command(inbox: Path, once: bool, dataset: str | None, release: str | None, polling: bool,
                  settle: float, reconcile_every: float, threads: int | None) -> int:
    """Segment every chest X-ray that lands in INBOX, all in this process.

    No server needed: the index (CHEXMASK_DATABASE_URL, default SQLite) and the
    store (CHEXMASK_STORE_URL, default a folder) live under CHEXMASK_HOME
    (./.chexmask). Prints one line per image; images left unfinished by a
    previous run are taken up again. Exit status 1 when an image failed.
    """
    from chexmask.ingest.serve import Done, Server

    settings = Settings.from_env()
    lock = threading.Lock()
    server: Server

    def report(done: Done) -> None:
        with lock:
            finished = sum(server.tally.counts.values())
            click.echo(f"[{finished}] {done.line()}")

    server = Server(settings, inbox, dataset=dataset, release=release, polling=polling, threads=threads,
                    settle=settle, reconcile_every=reconcile_every, on_done=report)
    try:
        info = server.start()
        click.echo(f"model {info.version}; index {settings.database_url}; store {settings.store_url}")
        click.echo(server.service.qc_state)
        if once:
            server.run_once()
        else:
            server.watcher.start()
            click.echo(f"watching {server.watcher.root} (Ctrl-C to stop)")
            _wait_for_stop()
            server.watcher.stop()
            server.wait()
    finally:
        server.close()
    click.echo(server.tally.summary())
    return 1 if server.tally.counts.get("failed") else 0


@click.command("watch")
@click.argument("folder", type=click.Path(file_okay=False, path_type=Path))
@_dataset_options
@_watch_options
def watch_command(folder: Path, dataset: str | None, release: str | None, polling: bool, settle: float,
                  reconcile_every: float) -> None:
    """Watch FOLDER and queue each complete image for the workers (CHEXMASK_BROKER_URL).

    Workers read the files by path, so FOLDER must be mounted at the same path
    for them. Files already in the index unchanged are not queued again.
    """
    from chexmask.ingest.arrival import Arrival
    from chexmask.ingest.watcher import FolderWatcher

    intake = _intake(Settings.from_env())

    def on_files(paths: list[Path]) -> None:
        arrivals = [Arrival.for_file(p, dataset, release) for p in paths if p.exists()]
        offered = intake.offer(arrivals)
        click.echo(f"{offered.new} new, {offered.changed} changed, {offered.skipped} unchanged")

    with FolderWatcher(folder, on_files, polling=polling, settle=settle, reconcile_every=reconcile_every) as watcher:
        click.echo(f"watching {watcher.root} (Ctrl-C to stop)")
        _wait_for_stop()


@click.command("listen")
@click.option("--sqs-queue-url", help="SQS queue receiving the bucket's S3 event notifications.")
@click.option("--redis-list", metavar="KEY", help="Redis list of MinIO's Redis notification target (format=access).")
@click.option("--redis-url", envvar="CHEXMASK_EVENTS_REDIS_URL", default="redis://localhost:6379/0",
              show_default=True, help="Redis holding --redis-list (env CHEXMASK_EVENTS_REDIS_URL).")
@click.option("--webhook-port", type=int, help="Serve POST /events for MinIO's webhook target on this port.")
@click.option("--webhook-host", default="0.0.0.0", show_default=True)
@click.option("--webhook-token", envvar="CHEXMASK_WEBHOOK_TOKEN",
              help="Token MinIO sends (its webhook auth_token; env CHEXMASK_WEBHOOK_TOKEN).")
@_dataset_options
def listen_command(sqs_queue_url: str | None, redis_list: str | None, redis_url: str, webhook_port: int | None,
                   webhook_host: str, webhook_token: str | None, dataset: str | None, release: str | None) -> None:
    """Queue objects announced by bucket notifications (S3 via SQS, or MinIO).

    Give exactly one of --sqs-queue-url, --redis-list, --webhook-port. Only
    ObjectCreated events are used; repeats of a notification and objects the
    index already has unchanged are dropped. A notification is acknowledged
    only once its objects are queued.
    """
    from chexmask.ingest import s3events

    if sum(x is not None for x in (sqs_queue_url, redis_list, webhook_port)) != 1:
        raise click.UsageError("give exactly one of --sqs-queue-url, --redis-list, --webhook-port")
    listener = s3events.Listener(_intake(Settings.from_env()), dataset=dataset, release=release)
    if webhook_port is not None:
        import uvicorn

        uvicorn.run(s3events.webhook_app(listener, webhook_token), host=webhook_host, port=webhook_port)
        return
    if sqs_queue_url:
        source = s3events.SqsListener(listener, sqs_queue_url)
        click.echo(f"listening to {sqs_queue_url}")
    else:
        import redis

        source = s3events.RedisListListener(listener, redis.Redis.from_url(redis_url), redis_list)
        click.echo(f"listening to {redis_list} on {redis_url}")
    stop = threading.Event()
    thread = threading.Thread(target=source.run, args=(stop,), name="chexmask-listen", daemon=True)
    thread.start()
    _wait_for_stop()
    stop.set()
    thread.join()


@click.command("scan")
@click.argument("uri")
@_dataset_options
@click.option("--restart", is_flag=True, help="Ignore where an interrupted scan stopped; list from the start.")
def scan_command(uri: str, dataset: str | None, release: str | None, restart: bool) -> None:
    """Queue the new and changed images of a release: URI is s3://bucket/prefix or a folder.

    Compares each object with the index (URI and ETag, or mtime and size for
    files), so a second scan queues nothing already known; an interrupted scan
    resumes after the last key it handed on.
    """
    from chexmask.ingest.scanner import ReleaseScanner

    settings = Settings.from_env()
    scanner = ReleaseScanner(_intake(settings), dataset=dataset, release=release, state_dir=settings.home / "scans")
    counts = scanner.scan(uri, resume=not restart)
    click.echo(f"{counts.seen} seen, {counts.new} new, {counts.changed} changed, {counts.skipped} skipped")


@click.command("reprocess")
@click.option("--model", help="Model version to complete (default: the one of CHEXMASK_WEIGHTS or the bundled weights).")
@_dataset_options
def reprocess_command(model: str | None, dataset: str | None, release: str | None) -> None:
    """Queue segmentation of every image lacking a result from the model (refused ones excepted).

    Workers segment with their configured weights, so --model must be theirs.
    Also takes up images left queued, processing or failed by earlier runs.
    """
    from tqdm import tqdm

    from chexmask.errors import WeightsError
    from chexmask.storage.index import MaskIndex, QueryFilters
    from chexmask.worker.celery_app import SEGMENT_QUEUE, SEGMENT_TASK, app
    from chexmask.worker.weights import resolve_weights

    settings = Settings.from_env()
    try:
        configured = resolve_weights(None, settings)[1].version
    except WeightsError:
        configured = None
    if model and configured and model != configured:
        raise click.UsageError(f"workers segment with {configured}, not {model}; set CHEXMASK_WEIGHTS to its weights")
    model = model or configured
    if not model:
        raise click.UsageError("no weights configured: give --model")
    index = MaskIndex(settings.database_url)
    index.upgrade()
    queued = 0
    with app.producer_or_acquire() as producer:
        images = index.images_missing_model(model, QueryFilters(dataset=dataset, release=release))
        for image in tqdm(images, desc=f"reprocess {model}", unit=" image"):
            app.send_task(SEGMENT_TASK, args=[image.id], queue=SEGMENT_QUEUE, producer=producer)
            queued += 1
    click.echo(f"{queued} image(s) queued for {model}")
