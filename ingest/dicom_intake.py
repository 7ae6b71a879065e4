"""DICOM instances received over the network, whatever carried them: what we accept,
storing each by its content, and offering it to ``Intake``.

The C-STORE SCP (``dicom_listener``) and the STOW-RS route (``dicomweb``) share this
path, so an instance is accepted, stored and queued the same way whichever protocol
brought it: the radiograph storage SOP classes in the transfer syntaxes the decoder
reads here; the Part-10 file written to the object store under the sha256 of its
bytes (fsynced, by a hard link where the received file is on the store's
filesystem); then offered to ``Intake`` with the SOP Instance UID as the dataset
image id. A store or queue failure answers 0xA700 (out of resources), so the sender
keeps the instance and sends it again; an instance sent twice is the same object
under the same key, which the index already has, so it is queued once.
"""

from __future__ import annotations

import hashlib
import logging
import queue
import threading
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.uid import (
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
    DigitalXRayImageStorageForProcessing,
    SecondaryCaptureImageStorage,
)

from chexmask.datasets import GENERIC, canonical
from chexmask.ingest.queue import Intake
from chexmask.messages import Arrival
from chexmask.storage.objectstore import ObjectStore
from chexmask.worker.decode import decodable_transfer_syntaxes
from chexmask.worker.push import DICOM_MEDIA_TYPE

log = logging.getLogger(__name__)

STORAGE_SOP_CLASSES = (
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
    DigitalXRayImageStorageForProcessing,
    SecondaryCaptureImageStorage,
)

# Statuses of a stored or refused instance: C-STORE's (PS3.4 Table B.2-1) and STOW-RS's
# Failure Reason (PS3.18 Table I.2-2) share these codes.
SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700  # store or queue failed: the sender keeps the instance and retries
SOP_CLASS_NOT_SUPPORTED = 0x0122
TRANSFER_SYNTAX_NOT_SUPPORTED = 0xC122
CANNOT_UNDERSTAND = 0xC000  # not a Part-10 file, or no SOP Class / Instance UID
# An instance posted to /studies/{uid} of another study (a "cannot understand" code,
# as dcm4chee answers it: PS3.18 names no code of its own for this).
STUDY_MISMATCH = 0xC409


def received_key(sha256: str) -> str:
    """Where a received instance lives in the store: named by its content, fanned out
    by the first two hex digits like the segmentations."""
    return f"received/dicom/{sha256[:2]}/{sha256}.dcm"


@dataclass(frozen=True)
class InstanceHeader:
    """What a received Part-10 file says it is, read from its header (no pixel data)."""

    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax_uid: str
    study_instance_uid: str | None


class Unreadable(Exception):
    """A received file that is not a Part-10 DICOM file we can identify."""


def read_header(path: Path) -> InstanceHeader:
    """The identity of a received Part-10 file; ``Unreadable`` when it has none."""
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        meta = ds.file_meta
        return InstanceHeader(
            str(meta.get("MediaStorageSOPClassUID") or ds.SOPClassUID),
            str(meta.get("MediaStorageSOPInstanceUID") or ds.SOPInstanceUID),
            str(meta.TransferSyntaxUID),
            str(ds.StudyInstanceUID) if "StudyInstanceUID" in ds else None,
        )
    except (InvalidDicomError, AttributeError, KeyError, ValueError, EOFError, OSError) as exc:
        raise Unreadable(f"{type(exc).__name__}: {exc}") from exc


def refusal(sop_class_uid: str, transfer_syntax_uid: str) -> int | None:
    """Why an instance of this SOP class in this transfer syntax is refused (a status
    code), or None when it is accepted: what the C-STORE SCP negotiates."""
    if sop_class_uid not in STORAGE_SOP_CLASSES:
        return SOP_CLASS_NOT_SUPPORTED
    if transfer_syntax_uid not in decodable_transfer_syntaxes():
        return TRANSFER_SYNTAX_NOT_SUPPORTED
    return None


class GroupOffer:
    """Arrivals from concurrent senders offered to ``intake`` together (a group
    commit): one thread offers everything that gathered while its previous offer was
    committing, so parallel senders share the index's and the broker's transactions
    instead of queueing for SQLite's write lock one by one."""

    def __init__(self, intake: Intake):
        self.intake = intake
        self._waiting: queue.SimpleQueue[tuple[Arrival, Future[None]] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="chexmask-dicom-intake", daemon=True)
        self._thread.start()

    def offer(self, arrival: Arrival) -> None:
        """Returns once ``arrival`` is queued; raises what its group's offer raised."""
        if not self._thread.is_alive():
            raise RuntimeError("DICOM intake is stopping")
        done: Future[None] = Future()
        self._waiting.put((arrival, done))
        done.result()

    def close(self) -> None:
        """Offer what is waiting, then stop the thread."""
        self._waiting.put(None)
        self._thread.join()

    def _run(self) -> None:
        closing = False
        while not closing:
            group = [self._waiting.get()]
            while not self._waiting.empty():
                group.append(self._waiting.get())
            closing = None in group
            self._offer([entry for entry in group if entry is not None])

    def _offer(self, group: list[tuple[Arrival, Future[None]]]) -> None:
        try:
            self.intake.offer([arrival for arrival, _ in group])
        except Exception as exc:
            for _, done in group:
                done.set_exception(exc)
        else:
            for _, done in group:
                done.set_result(None)


class DicomIntake:
    """Stores received Part-10 files by content and offers them to ``intake``
    (``start`` before the first ``receive``, ``close`` after the last)."""

    def __init__(self, intake: Intake, store: ObjectStore, *, dataset: str | None = None, release: str | None = None):
        self.intake = intake
        self.store = store
        self.dataset = canonical(dataset) if dataset else GENERIC
        self.release = release
        self._group: GroupOffer | None = None

    def start(self) -> DicomIntake:
        self._group = GroupOffer(self.intake)
        return self

    def close(self) -> None:
        if self._group is not None:
            self._group.close()
            self._group = None

    def receive(self, path: Path, sop_instance_uid: str, sender: str, sha256: str | None = None) -> int:
        """Store the Part-10 file at ``path`` and queue it; the status to answer
        (``SUCCESS`` or ``OUT_OF_RESOURCES``). ``sha256``: of the file, when the caller
        hashed it as it arrived."""
        try:
            if sha256 is None:
                with path.open("rb") as f:
                    sha256 = hashlib.file_digest(f, "sha256").hexdigest()
            size = path.stat().st_size
            key = received_key(sha256)
            if not self.store.exists(key):
                self.store.put_file(key, path, DICOM_MEDIA_TYPE)
        except Exception:
            log.exception("could not store DICOM instance %s; answering out of resources", sop_instance_uid)
            return OUT_OF_RESOURCES
        arrival = Arrival(self.store.url(key), self.dataset, sop_instance_uid, self.release, sha256, size)
        try:
            assert self._group is not None, "not started"
            self._group.offer(arrival)
        except Exception:
            # Stored but not queued: the sender retries, and the same key is offered again.
            log.exception("could not queue DICOM instance %s; answering out of resources", sop_instance_uid)
            return OUT_OF_RESOURCES
        log.info("received %s from %s as %s", sop_instance_uid, sender, key)
        return SUCCESS
