"""Holding work, and taking up what its holder left: the lease heartbeat and the sweep.

Every process that works on images has an owner name, ``host:pid:nonce``. When
it starts on an image (or a QC) it takes a lease on it in the index for
``CHEXMASK_LEASE`` seconds, and a heartbeat thread renews its leases every third
of that. A sweep (``serve``'s background thread; a thread beside every Celery
worker) takes over whatever is held by nobody alive: a lease run out, or an
owner on this host whose process is gone (so a restart does not wait for the
lease), and hands it on again; it also hands on failed images whose automatic
retry is due. Taking over is compare-and-set on the holder, so two sweeps never
both win the same image; a stage run twice never makes two results either (the
index keys results by content and model).
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone

from chexmask.storage import pushes
from chexmask.storage.index import Lease, MaskIndex

log = logging.getLogger(__name__)

_owner: tuple[int, str] | None = None


def process_owner() -> str:
    """This process's owner name; a forked child gets its own."""
    global _owner
    if _owner is None or _owner[0] != os.getpid():
        _owner = (os.getpid(), f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}")
    return _owner[1]


def owner_gone(owner: str | None) -> bool:
    """Whether ``owner`` was a process on this host that no longer runs."""
    if owner is None:
        return False
    host, _, rest = owner.partition(":")
    pid = rest.partition(":")[0]
    if host != socket.gethostname() or not pid.isdigit() or owner == process_owner():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # someone else's process: alive
        return False
    return False


def stale(lease: Lease, now: datetime) -> bool:
    return lease.expires_at is None or lease.expires_at <= now or owner_gone(lease.owner)


class Heartbeat:
    """Renews this process's leases every third of the lease, in a daemon thread."""

    def __init__(self, index: MaskIndex, lease_s: float):
        self.index, self.lease_s = index, lease_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def ensure_started(self) -> None:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._stop.clear()
                self._thread = threading.Thread(target=self._run, name="chexmask-heartbeat", daemon=True)
                self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(self.lease_s / 3):
            try:
                self.index.renew_leases(process_owner(), self.lease_s)
            except Exception as exc:  # the database is away: the leases may lapse, which is safe
                log.warning("could not renew leases: %s", exc)


@dataclass
class Swept:
    resegment: int = 0
    requalify: int = 0
    retried: int = 0
    repushed: int = 0  # segmentations whose DICOM outputs are sent again (not in ``total``)

    @property
    def total(self) -> int:
        return self.resegment + self.requalify + self.retried


class Sweeper:
    """Hands on again what nobody alive holds. ``resegment(image_id)`` and
    ``requalify(segmentation_id)`` queue the work (threads of ``serve``, or Celery
    tasks), and ``repush(segmentation_id)`` the sending of DICOM outputs to
    ``push_to`` (the configured destinations) that failed or whose sender died; what
    is handed on stays held by this sweeper for ``handoff_s``, so it is not handed on
    twice while it waits in a queue."""

    def __init__(
        self,
        index: MaskIndex,
        resegment: Callable[[int], None],
        requalify: Callable[[int], None],
        handoff_s: float,
        repush: Callable[[int], None] = lambda segmentation_id: None,
        push_to: Sequence[str] = (),
    ):
        self.index, self.resegment, self.requalify, self.repush = index, resegment, requalify, repush
        self.handoff_s = handoff_s
        self.push_to = list(push_to)

    def sweep(self) -> Swept:
        now, owner, swept = datetime.now(timezone.utc), process_owner(), Swept()
        for lease in self.index.processing_leases():
            if stale(lease, now) and self.index.requeue(lease, owner, self.handoff_s):
                log.warning("image %d: its holder %s is gone; taking it up again", lease.id, lease.owner)
                self.resegment(lease.id)
                swept.resegment += 1
        for lease in self.index.due_retries():
            if self.index.requeue(lease, owner, self.handoff_s, reset_attempts=True):
                log.info("image %d: retrying after a transient failure", lease.id)
                self.resegment(lease.id)
                swept.retried += 1
        for lease in self.index.qc_leases():
            if stale(lease, now) and self.index.take_qc(lease, owner, self.handoff_s):
                log.warning("segmentation %d: QC left pending by %s; running it again", lease.id, lease.owner)
                self.requalify(lease.id)
                swept.requalify += 1
        for segmentation_id in pushes.due(self.index, self.push_to) if self.push_to else []:
            if pushes.take(self.index, segmentation_id, self.handoff_s):
                log.info("segmentation %d: sending its DICOM outputs again", segmentation_id)
                self.repush(segmentation_id)
                swept.repushed += 1
        return swept

    def run(self, stop: threading.Event, every_s: float) -> None:
        """Sweep every ``every_s`` seconds until ``stop`` is set (a thread's target)."""
        while not stop.wait(every_s):
            try:
                self.sweep()
            except Exception:  # the index is away: the next sweep tries again
                log.exception("sweep failed")
