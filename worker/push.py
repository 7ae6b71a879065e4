"""Sending the DICOM SEG and SR of a DICOM input on to the hospital's systems: a
C-STORE SCP (``CHEXMASK_DICOM_DESTINATION=AET@host:port``, calling as
``CHEXMASK_DICOM_AE_TITLE``) and/or a STOW-RS URL (``CHEXMASK_STOW_DESTINATION``).

``send`` raises ``PushFailed`` with a reason a person can act on; the ``Service``
records every outcome in the index and a sweep tries failures again
(``storage/pushes.py``).
"""

from __future__ import annotations

import io
import logging
import secrets
from collections.abc import Sequence

import httpx
import pydicom
from pynetdicom import AE

from chexmask.config import DicomDestination, Settings
from chexmask.errors import PushFailed

log = logging.getLogger(__name__)

# How long a sender holds a push before a sweep may take it up: longer than the
# timeouts below add up to for two objects.
PUSH_HOLD_S = 300.0
CONNECT_TIMEOUT_S = 10.0
RESPONSE_TIMEOUT_S = 60.0
# C-STORE statuses that mean stored: success, and the warnings (PS3.4 Table B.2-1:
# coercion of data elements, elements discarded, data set does not match SOP class).
STORED = frozenset({0x0000, 0xB000, 0xB006, 0xB007})
# Media types of DICOMweb (PS3.18 8.7.3), here for the STOW-RS route of the ingest layer too.
DICOM_MEDIA_TYPE = "application/dicom"
DICOM_JSON_MEDIA_TYPE = "application/dicom+json"


class Pusher:
    """Sends Part-10 files to a destination as ``Settings.push_destinations`` names it."""

    def __init__(self, settings: Settings):
        self.calling_ae_title = settings.dicom_ae_title
        token = settings.stow_destination_token
        self.stow_headers = {"Authorization": f"Bearer {token.get_secret_value()}"} if token else {}

    def send(self, destination: str, files: Sequence[bytes]) -> None:
        """Deliver every file to ``destination``; ``PushFailed`` with the reason when not."""
        kind, _, address = destination.partition(":")
        if kind == "dicom":
            self._c_store(DicomDestination.parse(address), files)
        elif kind == "stow":
            self._stow(address, files)
        else:
            raise PushFailed(f"unknown kind of destination {destination!r}")

    def _c_store(self, destination: DicomDestination, files: Sequence[bytes]) -> None:
        datasets = [pydicom.dcmread(io.BytesIO(data)) for data in files]
        ae = AE(ae_title=self.calling_ae_title)
        ae.connection_timeout = CONNECT_TIMEOUT_S
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = RESPONSE_TIMEOUT_S
        for ds in datasets:
            ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
        where = f"{destination.ae_title}@{destination.host}:{destination.port}"
        assoc = ae.associate(destination.host, destination.port, ae_title=destination.ae_title)
        if not assoc.is_established:
            if assoc.is_rejected:
                raise PushFailed(f"{where} rejected the association (called AE title, or our {self.calling_ae_title})")
            raise PushFailed(f"no DICOM association with {where}: not reachable, or it aborted")
        try:
            for ds in datasets:
                answer = assoc.send_c_store(ds)
                status = int(answer.Status) if "Status" in answer else None
                if status not in STORED:
                    code = "no answer" if status is None else f"status 0x{status:04X}"
                    raise PushFailed(f"{where} did not store {_kind(ds)} {ds.SOPInstanceUID}: {code}")
        finally:
            if assoc.is_established:
                assoc.release()

    def _stow(self, url: str, files: Sequence[bytes]) -> None:
        boundary = secrets.token_hex(16)
        content_type = f'multipart/related; type="{DICOM_MEDIA_TYPE}"; boundary={boundary}'
        try:
            response = httpx.post(
                url,
                content=_multipart(files, boundary),
                headers={
                    **self.stow_headers,
                    "Content-Type": content_type,
                    "Accept": DICOM_JSON_MEDIA_TYPE,
                },
                timeout=httpx.Timeout(RESPONSE_TIMEOUT_S, connect=CONNECT_TIMEOUT_S),
            )
        except httpx.HTTPError as exc:
            raise PushFailed(f"no answer from {url}: {type(exc).__name__}: {exc}") from exc
        if response.status_code != 200:
            raise PushFailed(f"{url} answered {response.status_code}: {_failures(response)}")


def _multipart(files: Sequence[bytes], boundary: str) -> bytes:
    """A multipart/related body, one Part-10 file per part (PS3.18 8.6.1.2)."""
    head = f"--{boundary}\r\nContent-Type: {DICOM_MEDIA_TYPE}\r\n\r\n".encode()
    return b"".join(head + data + b"\r\n" for data in files) + f"--{boundary}--\r\n".encode()


def _failures(response: httpx.Response) -> str:
    """The Failure Reasons of a Store Instances Response, else the start of its body."""
    try:
        answer = pydicom.Dataset.from_json(response.json())
        failed = answer.get("FailedSOPSequence", [])
        reasons = [f"{item.get('ReferencedSOPInstanceUID', '?')} 0x{int(item.FailureReason):04X}" for item in failed]
    except (ValueError, TypeError, KeyError, AttributeError):
        reasons = []
    return "failed " + ", ".join(reasons) if reasons else response.text[:300]


def _kind(ds: pydicom.Dataset) -> str:
    return "SEG" if ds.get("Modality") == "SEG" else "SR" if ds.get("Modality") == "SR" else "instance"
