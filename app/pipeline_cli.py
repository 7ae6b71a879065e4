"""``chexmask serve|worker|watch|listen|scan|reprocess``: the pipeline's programs,
thin click wrappers over the library."""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click

from chexmask.app.model_cli import reframe_option, uncertainty_option
from chexmask.config import Settings, mask_url
from chexmask.ingest.watcher import DEFAULT_RECONCILE_S, DEFAULT_SETTLE_S
from chexmask.queues import QUEUES, SEGMENT_QUEUE


def _dataset_options(command):
    command = click.option("--release", help="Release tag recorded with every image.")(command)
    return click.option(
        "--dataset",
        help="Dataset of every image (default: inferred from each path: "
        "ChestX-ray8, CheXpert, MIMIC-CXR-JPG, PadChest, VinDr-CXR, else generic).",
    )(command)


def _watch_options(command):
    for option in reversed(
        [
            click.option(
                "--polling", is_flag=True, help="Poll the folder instead of using OS events (network mounts)."
            ),
            click.option(
                "--settle",
                type=float,
                default=DEFAULT_SETTLE_S,
                show_default=True,
                help="Seconds a file's size and mtime must stay still before it counts as complete "
                "(when no close event says so).",
            ),
            click.option(
                "--reconcile-every",
                type=float,
                default=DEFAULT_RECONCILE_S,
                show_default=True,
                help="Seconds between full rescans that catch files whose events were missed.",
            ),
        ]
    ):
        command = option(command)
    return command


def _wait_for_stop(helpers: Sequence[multiprocessing.process.BaseProcess] = ()) -> None:
    """Block until SIGINT or SIGTERM, or until one of ``helpers`` (processes serving
    beside this one) has died: an error, the caller stops the rest."""
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        while not stop.wait(1.0):
            if dead := [helper for helper in helpers if not helper.is_alive()]:
                raise click.ClickException(f"{dead[0].name} ended with exit code {dead[0].exitcode}")
    except KeyboardInterrupt:
        pass


def _ae_title(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    if value is not None and not 0 < len(value.strip()) <= 16:
        raise click.BadParameter("a DICOM AE title has 1 to 16 characters")
    return value


def _dicom_options(command):
    command = click.option(
        "--ae-title",
        callback=_ae_title,
        help="Our DICOM AE title, 1-16 characters (default: CHEXMASK_DICOM_AE_TITLE, else CHEXMASK).",
    )(command)
    return click.option(
        "--dicom-port",
        type=click.IntRange(0, 65535),
        help="Receive DICOM C-STORE (and C-ECHO) on this port (default: CHEXMASK_DICOM_PORT).",
    )(command)


def _keep_our_logging(fmt: str) -> None:
    """Celery configures logging itself unless someone answers its ``setup_logging``
    signal: answer it with ours (CHEXMASK_LOG_FORMAT, the image context on every line)
    at the worker's --loglevel."""
    from celery.signals import setup_logging

    from chexmask import logs

    def configure(loglevel: int | str | None = None, **_: object) -> None:
        logs.configure(fmt=fmt, level=loglevel if loglevel is not None else "INFO")

    setup_logging.connect(configure, weak=False)


def open_intake(settings: Settings):
    """The producers' door (``Intake``): the index, and the broker of CHEXMASK_BROKER_URL
    (its embedded default too, whose queued images ``serve`` also takes up from the index)."""
    from chexmask.ingest.queue import CeleryQueue, Intake
    from chexmask.ingest.registry import Registry
    from chexmask.storage.index import MaskIndex
    from chexmask.worker.celery_app import create_app, declare_queues

    index = MaskIndex(settings.database_url)
    index.upgrade()
    app = create_app(settings)
    declare_queues(app)
    return Intake(Registry(index), CeleryQueue(app))


@click.command("serve")
@click.option(
    "--inbox",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Folder to watch (created if missing); subfolders included.",
)
@click.option("--once", is_flag=True, help="Process what is in the inbox now, then exit.")
@_dataset_options
@_watch_options
@click.option("--threads", type=int, help="Images in flight (default: twice CHEXMASK_BATCH_SIZE).")
@_dicom_options
@uncertainty_option
@reframe_option
def serve_command(
    inbox: Path,
    once: bool,
    dataset: str | None,
    release: str | None,
    polling: bool,
    settle: float,
    reconcile_every: float,
    threads: int | None,
    dicom_port: int | None,
    ae_title: str | None,
    uncertainty: int | None,
    reframe: bool | None,
) -> int:
    """Segment every chest X-ray that lands in INBOX, all in this process.

    No server needed: the index (CHEXMASK_DATABASE_URL, default SQLite) and the
    store (CHEXMASK_STORE_URL, default a folder) live under CHEXMASK_HOME
    (./.chexmask). Prints one line per image; images left unfinished by a
    previous run are taken up again. Exit status 1 when an image failed.
    """
    from chexmask.app.serve import Done, Server

    settings = Settings.from_env()
    dicom_port = dicom_port if dicom_port is not None else settings.dicom_port
    if once and dicom_port is not None:
        raise click.UsageError("--once processes the inbox and exits; it cannot listen on --dicom-port")
    if uncertainty is not None:
        settings = settings.model_copy(update={"uncertainty_samples": uncertainty})
    if reframe is not None:
        settings = settings.model_copy(update={"reframe": reframe})
    lock = threading.Lock()
    server: Server

    def report(done: Done) -> None:
        with lock:
            finished = sum(server.tally.counts.values())
            click.echo(f"[{finished}] {done.line()}")

    server = Server(
        settings,
        inbox,
        dataset=dataset,
        release=release,
        polling=polling,
        threads=threads,
        settle=settle,
        reconcile_every=reconcile_every,
        on_done=report,
        dicom_port=dicom_port,
        dicom_ae_title=ae_title,
    )
    finished = True
    try:
        info = server.start()
        click.echo(
            f"model {info.version}; index {mask_url(settings.database_url)}; store {mask_url(settings.store_url)}"
        )
        click.echo(server.service.qc_state)
        if once:
            server.run_once()
        else:
            if server.dicom is not None:  # first: a taken port stops the start with one line
                server.dicom.start()
                click.echo(f"receiving DICOM on port {server.dicom.port} as {server.dicom.ae.ae_title}")
            server.watcher.start()
            server.start_sweeping()
            click.echo(f"watching {server.watcher.root} (Ctrl-C to stop)")
            _wait_for_stop()
            if server.dicom is not None:
                server.dicom.stop()
            server.watcher.stop()
            finished = server.stop()
    finally:
        if finished:
            server.close()
    click.echo(server.tally.summary())
    status = 1 if server.tally.counts.get("failed") else 0
    if not finished:
        # Threads still on an image would hold the interpreter's exit: leave them. The
        # index says where each image stands; the next start takes them up.
        click.echo("stopped with images in hand; they are taken up at the next start")
        sys.stdout.flush()
        os._exit(status)
    return status


@click.command("watch")
@click.argument("folder", type=click.Path(file_okay=False, path_type=Path))
@_dataset_options
@_watch_options
def watch_command(
    folder: Path, dataset: str | None, release: str | None, polling: bool, settle: float, reconcile_every: float
) -> None:
    """Watch FOLDER and queue each complete image for the workers (CHEXMASK_BROKER_URL).

    Workers read the files by path, so FOLDER must be mounted at the same path
    for them. Files already in the index unchanged are not queued again.
    """
    from chexmask.ingest.watcher import FolderWatcher
    from chexmask.messages import Arrival

    intake = open_intake(Settings.from_env())

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
@click.option(
    "--redis-url",
    help="Redis holding --redis-list (default: CHEXMASK_EVENTS_REDIS_URL, else redis://localhost:6379/0).",
)
@click.option("--webhook-port", type=int, help="Serve POST /events for MinIO's webhook target on this port.")
@click.option("--webhook-host", default="0.0.0.0", show_default=True)
@click.option("--webhook-token", help="Token MinIO sends (its webhook auth_token; default: CHEXMASK_WEBHOOK_TOKEN).")
@_dicom_options
@click.option(
    "--dicom-processes",
    type=click.IntRange(min=1),
    help="Listener processes sharing --dicom-port, one core each at most (default: CHEXMASK_DICOM_PROCESSES, else 1).",
)
@_dataset_options
def listen_command(
    sqs_queue_url: str | None,
    redis_list: str | None,
    redis_url: str | None,
    webhook_port: int | None,
    webhook_host: str,
    webhook_token: str | None,
    dicom_port: int | None,
    ae_title: str | None,
    dicom_processes: int | None,
    dataset: str | None,
    release: str | None,
) -> None:
    """Queue objects announced by bucket notifications (S3 via SQS, or MinIO), or
    DICOM instances pushed by a PACS or modality (C-STORE).

    Give exactly one of --sqs-queue-url, --redis-list, --webhook-port,
    --dicom-port. Only ObjectCreated events are used; repeats of a notification
    and objects the index already has unchanged are dropped. A notification is
    acknowledged only once its objects are queued; a DICOM instance once it is in
    the store (CHEXMASK_STORE_URL) and queued.
    """
    from chexmask.ingest import s3events

    settings = Settings.from_env()
    if dicom_port is None and not (sqs_queue_url or redis_list or webhook_port is not None):
        dicom_port = settings.dicom_port
    if sum(x is not None for x in (sqs_queue_url, redis_list, webhook_port, dicom_port)) != 1:
        raise click.UsageError("give exactly one of --sqs-queue-url, --redis-list, --webhook-port, --dicom-port")
    if dicom_port is not None:
        processes = dicom_processes or settings.dicom_processes
        _listen_dicom(settings, dicom_port, ae_title or settings.dicom_ae_title, dataset, release, processes)
        return
    listener = s3events.Listener(open_intake(settings), dataset=dataset, release=release)
    if webhook_port is not None:
        import uvicorn

        if webhook_token is None and settings.webhook_token is not None:
            webhook_token = settings.webhook_token.get_secret_value()
        uvicorn.run(s3events.webhook_app(listener, webhook_token), host=webhook_host, port=webhook_port)
        return
    source: s3events.SqsListener | s3events.RedisListListener
    if sqs_queue_url:
        source = s3events.SqsListener(listener, sqs_queue_url)
        click.echo(f"listening to {sqs_queue_url}")
    else:
        import redis

        assert redis_list is not None  # exactly one source was given
        redis_url = redis_url or settings.events_redis_url
        source = s3events.RedisListListener(listener, redis.Redis.from_url(redis_url), redis_list)
        click.echo(f"listening to {redis_list} on {mask_url(redis_url)}")
    stop = threading.Event()
    thread = threading.Thread(target=source.run, args=(stop,), name="chexmask-listen", daemon=True)
    thread.start()
    _wait_for_stop()
    stop.set()
    thread.join()


def _listen_dicom(
    settings: Settings, port: int, ae_title: str, dataset: str | None, release: str | None, processes: int
) -> None:
    """The listener in this process and, with ``processes`` > 1, in as many others on
    the same port: one SCP process holds one core at most (its interpreter lock)."""
    context = multiprocessing.get_context("spawn")
    listener = _dicom_listener(settings, port, ae_title, dataset, release, shared_port=processes > 1)
    with listener:
        others = []
        for _ in range(processes - 1):
            ready = context.Event()
            options = (listener.port, ae_title, dataset, release, os.getpid(), ready)
            others.append((context.Process(target=_listen_dicom_beside, args=options, daemon=True), ready))
            others[-1][0].start()
        try:
            for other, ready in others:  # all listening before we say so
                while not ready.wait(1.0):
                    if not other.is_alive():
                        raise click.ClickException(f"a DICOM listener process ended with exit code {other.exitcode}")
            click.echo(
                f"receiving DICOM on port {listener.port} as {ae_title} ({processes} process(es)); "
                f"store {mask_url(settings.store_url)}"
            )
            _wait_for_stop([other for other, _ in others])
        finally:
            for other, _ in others:
                other.terminate()
            for other, _ in others:
                other.join()


def _listen_dicom_beside(
    port: int, ae_title: str, dataset: str | None, release: str | None, parent: int, ready: Any
) -> None:
    """Another listener process on the parent's port, until it is told to stop or the
    parent is gone."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the parent, which stops us
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with _dicom_listener(Settings.from_env(), port, ae_title, dataset, release, shared_port=True):
        ready.set()
        while not stop.wait(1.0) and os.getppid() == parent:
            pass


def _dicom_listener(
    settings: Settings, port: int, ae_title: str, dataset: str | None, release: str | None, shared_port: bool
):
    from chexmask.ingest.dicom_listener import DicomListener
    from chexmask.storage.objectstore import open_store

    store = open_store(settings.store_url, settings.s3_endpoint_url)
    intake = open_intake(settings)
    return DicomListener(
        intake, store, port=port, ae_title=ae_title, dataset=dataset, release=release, shared_port=shared_port
    )


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
    scanner = ReleaseScanner(open_intake(settings), dataset=dataset, release=release, state_dir=settings.home / "scans")
    counts = scanner.scan(uri, resume=not restart)
    click.echo(
        f"{counts.seen} seen, {counts.new} new, {counts.changed} changed, {counts.skipped} skipped, "
        f"{counts.covered} already in an imported CheXmask set"
    )


@click.command("reprocess")
@click.option(
    "--model", help="Model version to complete (default: the one of CHEXMASK_WEIGHTS or the bundled weights)."
)
@_dataset_options
@click.option(
    "--sample",
    type=click.IntRange(min=1),
    help="Queue only a random sample of this many (e.g. to compare with an imported set).",
)
def reprocess_command(model: str | None, dataset: str | None, release: str | None, sample: int | None) -> None:
    """Queue segmentation of every image lacking a result from the model (refused ones excepted).

    Workers segment with their configured weights, so --model must be theirs.
    Also takes up images left queued, processing or failed by earlier runs.
    Without CHEXMASK_BROKER_URL the images go back to queued in the index for
    `chexmask serve`; with a broker, segment tasks are sent to the workers.
    """
    from chexmask.app.reprocess import reprocess
    from chexmask.errors import WeightsError
    from chexmask.worker.weights import resolve_weights

    settings = Settings.from_env()
    try:
        configured = resolve_weights(None, settings)[1].version
    except WeightsError:
        configured = None
    if model and configured and model != configured:
        raise click.UsageError(
            f"workers segment with {configured}, not {model}; set CHEXMASK_WEIGHTS to its weights "
            "(and CHEXMASK_REFRAME=false for the bundled model without re-framing)"
        )
    model = model or configured
    if not model:
        raise click.UsageError("no weights configured: give --model")
    queued = reprocess(settings, model, dataset=dataset, release=release, sample=sample)
    click.echo(f"{queued} image(s) queued for {model}")


@click.command("retry")
@click.option("--failed", is_flag=True, help="Also every failed image now, whatever its cause (attempts reset).")
@click.option("--dataset", help="Only failed images of this dataset.")
def retry_command(failed: bool, dataset: str | None) -> None:
    """Queue again what nobody alive holds: images and QCs of crashed workers, and failed
    images whose automatic retry is due; with --failed, every failed image.

    Without CHEXMASK_BROKER_URL (the embedded mode) they go back to queued in the
    index, and a running `chexmask serve` (or the next one) takes them up; with a
    broker, segment and QC tasks are sent to the Celery workers.
    """
    from chexmask.app.reprocess import retry

    queued = retry(Settings.from_env(), failed=failed, dataset=dataset)
    click.echo(f"{queued} image(s) and QC(s) queued again")


@click.command("push")
@click.option("--dataset", help="Only segmentations of this dataset.")
@click.option("--release", help="Only images of this release.")
@click.option("--model", help="Only segmentations by this model version.")
@click.option("--again", is_flag=True, help="Also send what a destination already took.")
def push_command(dataset: str | None, release: str | None, model: str | None, again: bool) -> int:
    """Send the DICOM SEG and SR of DICOM inputs to the configured destinations
    (CHEXMASK_DICOM_DESTINATION, CHEXMASK_STOW_DESTINATION) now, in this process:
    each one a destination has not taken yet (failed, given up, or never tried),
    with --again every one. Exit status 1 when a push failed.
    """
    from chexmask.status import PushStatus
    from chexmask.storage.pushes import dicom_segmentations
    from chexmask.storage.queries import QueryFilters
    from chexmask.worker.service import Service

    settings = Settings.from_env()
    if not settings.push_destinations:
        raise click.UsageError("no destination: set CHEXMASK_DICOM_DESTINATION and/or CHEXMASK_STOW_DESTINATION")
    service = Service(settings)
    counts = {status: 0 for status in PushStatus}
    try:
        service.index.upgrade()
        dicom = dicom_segmentations(service.index, QueryFilters(dataset=dataset, release=release, model=model))
        for segmentation_id in dicom:
            for pushed in service.push(segmentation_id, again=again):
                counts[pushed.status] += 1
                if pushed.status is not PushStatus.DONE:
                    click.echo(f"segmentation {segmentation_id} -> {pushed.destination}: {pushed.reason}", err=True)
    finally:
        service.close()
    click.echo(
        f"{len(dicom)} DICOM segmentation(s): {counts[PushStatus.DONE]} sent, {counts[PushStatus.FAILED]} failed"
    )
    return 1 if counts[PushStatus.FAILED] else 0


@click.command("worker")
@click.option(
    "--queues",
    "-Q",
    default=",".join(QUEUES),
    show_default=True,
    help="Comma-separated queues to consume: ingest, segment, qc.",
)
@click.option(
    "--concurrency",
    "-c",
    type=click.IntRange(min=1),
    help="Tasks at once (default: twice CHEXMASK_BATCH_SIZE, so images wait ready while others are segmented).",
)
@click.option(
    "--pool",
    type=click.Choice(["threads", "prefork", "solo"]),
    default="threads",
    show_default=True,
    help="threads: one model per worker, shared by all tasks; "
    "prefork: one model per child process (no batching across children).",
)
@click.option("--beat", is_flag=True, help="Also run the scheduler for CHEXMASK_SCAN_PREFIXES (one per deployment).")
@click.option("--loglevel", "-l", default="info", show_default=True)
@click.option("--hostname", "-n", help="Worker name (default: celery@<host>).")
def worker_command(
    queues: str, concurrency: int | None, pool: str, beat: bool, loglevel: str, hostname: str | None
) -> int:
    """Consume the ingest, segment and QC queues of CHEXMASK_BROKER_URL.

    Tasks are acknowledged only when done, so the work of a worker that dies is
    delivered again; results go to CHEXMASK_DATABASE_URL and CHEXMASK_STORE_URL.
    Segmentation uses CHEXMASK_WEIGHTS on CHEXMASK_DEVICE (GPU when present),
    CHEXMASK_MODEL_THREADS images at a time (default one per core), each in the
    thread of its task.
    """
    import chexmask.ingest.tasks  # noqa: F401  (registers the ingest and scan tasks)
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
        _ = service().segmenter  # load the model now: bad weights stop the worker, not every image
    _keep_our_logging(settings.log_format)
    stop_sweeping = _start_celery_sweeper(settings, app)
    worker = app.Worker(
        queues=names,
        concurrency=concurrency or 2 * settings.batch_size,
        pool=pool,
        beat=beat,
        loglevel=loglevel,
        hostname=_expand_hostname(hostname),
    )
    try:
        worker.start()
    finally:
        stop_sweeping.set()
    return worker.exitcode or 0


def _expand_hostname(hostname: str | None) -> str | None:
    """``%h``, ``%n`` and ``%d`` in a worker name, as ``celery worker -n`` expands them."""
    if hostname is None:
        return None
    from celery.utils.nodenames import default_nodename, host_format

    return host_format(default_nodename(hostname))


def _start_celery_sweeper(settings: Settings, app) -> threading.Event:
    """A thread beside the worker that sends again the segment and QC tasks of images and
    QCs whose holder is gone, of failed images whose retry is due, and the push tasks of
    DICOM outputs whose sending is due again."""
    from chexmask.queues import PUSH_TASK, QC_QUEUE, QC_TASK, SEGMENT_TASK
    from chexmask.storage.index import MaskIndex
    from chexmask.worker.leases import Sweeper

    index = MaskIndex(settings.database_url)
    sweeper = Sweeper(
        index,
        resegment=lambda image_id: app.send_task(SEGMENT_TASK, args=[image_id], queue=SEGMENT_QUEUE),
        requalify=lambda segmentation_id: app.send_task(QC_TASK, args=[segmentation_id], queue=QC_QUEUE),
        handoff_s=settings.visibility_timeout_s,
        repush=lambda segmentation_id: app.send_task(PUSH_TASK, args=[segmentation_id], queue=QC_QUEUE),
        push_to=settings.push_destinations,
    )
    stop = threading.Event()
    threading.Thread(
        target=sweeper.run, args=(stop, max(1.0, settings.lease_s / 2)), name="chexmask-sweep", daemon=True
    ).start()
    return stop
