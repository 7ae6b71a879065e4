"""DICOMweb STOW-RS (PS3.18 10.5): radiographs posted over HTTP, stored and queued
exactly as the C-STORE SCP stores and queues them (``dicom_intake``).

``POST /dicomweb/studies`` (and ``/dicomweb/studies/{StudyInstanceUID}``) takes a
``multipart/related; type="application/dicom"`` body, one Part-10 instance per part.
The body is streamed part by part to temporary files (python-multipart's streaming
parser; nothing held whole in memory), each hashed as it arrives; then every part
is checked (a Part-10 file of an accepted SOP class in a transfer syntax we
decode; of the study in the URL when one is given), stored by content and queued,
all before the answer. The answer is the Store Instances Response in DICOM JSON:
ReferencedSOPSequence for the stored instances, FailedSOPSequence with a Failure
Reason for the others; HTTP 200 when all were stored, 202 when some, 409 when
none. A body over the size limit is answered 413, another media type 415.
"""

from __future__ import annotations

import hashlib
import logging
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from http import HTTPStatus
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse
from pydicom.dataset import Dataset
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.concurrency import run_in_threadpool

from chexmask.ingest.dicom_intake import (
    CANNOT_UNDERSTAND,
    STUDY_MISMATCH,
    SUCCESS,
    DicomIntake,
    Unreadable,
    read_header,
    refusal,
)
from chexmask.storage.auth import api_guard
from chexmask.worker.push import DICOM_JSON_MEDIA_TYPE, DICOM_MEDIA_TYPE

if TYPE_CHECKING:
    from python_multipart.multipart import MultipartCallbacks

log = logging.getLogger(__name__)

STUDIES = "/dicomweb/studies"


@dataclass
class Part:
    """One part of the body, as received: its headers, and its bytes in a file."""

    path: Path
    headers: dict[str, str] = field(default_factory=dict)
    sha256: str = ""


@dataclass(frozen=True)
class Outcome:
    status: int
    sop_class_uid: str | None = None
    sop_instance_uid: str | None = None


def mount_stow(app: FastAPI, received: DicomIntake, token: str | None, max_bytes: int) -> None:
    """Add the STOW-RS routes to ``app`` (behind the API's bearer token), ``received``
    running for as long as the app does."""
    guarded = [Depends(api_guard(token))]
    _run_with_app(app, received)

    async def store(request: Request, study: str | None) -> JSONResponse:
        boundary = _boundary(request.headers.get("content-type"))
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > max_bytes:
            raise _too_large(max_bytes)
        sender = request.client.host if request.client else "?"
        with tempfile.TemporaryDirectory(prefix="chexmask-stow-") as folder:
            parts = await _receive_parts(request, boundary, Path(folder), max_bytes)
            outcomes = await run_in_threadpool(lambda: [_store_part(received, part, study, sender) for part in parts])
        return _response(outcomes)

    @app.post(STUDIES, dependencies=guarded, tags=["dicomweb"], summary="STOW-RS: store instances")
    async def store_instances(request: Request) -> JSONResponse:
        return await store(request, None)

    @app.post(STUDIES + "/{study}", dependencies=guarded, tags=["dicomweb"], summary="STOW-RS: store in a study")
    async def store_study_instances(study: str, request: Request) -> JSONResponse:
        return await store(request, study)


def _run_with_app(app: FastAPI, received: DicomIntake) -> None:
    """Start ``received`` with the app and close it (offering what waits) after it."""
    inner = app.router.lifespan_context

    @asynccontextmanager
    async def lifespan(app_: FastAPI) -> AsyncIterator[Any]:
        received.start()
        try:
            async with inner(app_) as state:
                yield state
        finally:
            received.close()

    app.router.lifespan_context = lifespan


def _boundary(content_type: str | None) -> bytes:
    media_type, params = parse_options_header(content_type)
    if media_type != b"multipart/related" or params.get(b"type", b"").lower() != DICOM_MEDIA_TYPE.encode():
        raise HTTPException(
            HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
            f'STOW-RS takes multipart/related; type="{DICOM_MEDIA_TYPE}", not {content_type or "no content type"}',
        )
    if not params.get(b"boundary"):
        raise HTTPException(HTTPStatus.BAD_REQUEST, "the multipart/related content type has no boundary")
    return params[b"boundary"]


def _too_large(max_bytes: int) -> HTTPException:
    return HTTPException(
        HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
        f"the body is larger than {max_bytes} bytes (CHEXMASK_STOW_MAX_BYTES); send fewer instances per request",
    )


async def _receive_parts(request: Request, boundary: bytes, folder: Path, max_bytes: int) -> list[Part]:
    """The body split into parts, each streamed to its own file in ``folder``."""
    parts: list[Part] = []
    writer = _PartWriter(folder, parts)
    parser = MultipartParser(boundary, writer.callbacks())
    received = 0
    try:
        async for chunk in request.stream():
            received += len(chunk)
            if received > max_bytes:
                raise _too_large(max_bytes)
            parser.write(chunk)
    except MultipartParseError as exc:
        raise HTTPException(HTTPStatus.BAD_REQUEST, f"the multipart body could not be parsed: {exc}") from None
    finally:
        writer.close()
    if not writer.complete:
        raise HTTPException(HTTPStatus.BAD_REQUEST, "the multipart body ends before its closing boundary")
    if not parts:
        raise HTTPException(HTTPStatus.BAD_REQUEST, "the multipart body has no parts")
    return parts


class _PartWriter:
    """python-multipart callbacks writing each part to a file and hashing it."""

    def __init__(self, folder: Path, parts: list[Part]):
        self.folder, self.parts = folder, parts
        self.complete = False
        self._part: Part | None = None
        self._file: BinaryIO | None = None
        self._hash = hashlib.sha256()
        self._field = self._value = b""

    def callbacks(self) -> MultipartCallbacks:
        return {
            "on_part_begin": self._begin,
            "on_header_field": self._header_field,
            "on_header_value": self._header_value,
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
            "on_part_data": self._data,
            "on_part_end": self._end,
            "on_end": self._finished,
        }

    def close(self) -> None:
        if self._file is not None:
            self._file.close()

    def _begin(self) -> None:
        self._part = Part(self.folder / f"{len(self.parts)}.dcm")
        self._hash = hashlib.sha256()

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._field += data[start:end]

    def _header_value(self, data: bytes, start: int, end: int) -> None:
        self._value += data[start:end]

    def _header_end(self) -> None:
        assert self._part is not None
        self._part.headers[self._field.decode("latin-1").strip().lower()] = self._value.decode("latin-1").strip()
        self._field = self._value = b""

    def _headers_finished(self) -> None:
        assert self._part is not None
        self._file = self._part.path.open("wb")

    def _data(self, data: bytes, start: int, end: int) -> None:
        assert self._file is not None
        chunk = data[start:end]
        self._file.write(chunk)
        self._hash.update(chunk)

    def _end(self) -> None:
        assert self._part is not None
        if self._file is None:  # a part with no headers: its data callback never opened a file
            self._part.path.touch()
        else:
            self._file.close()
            self._file = None
        self._part.sha256 = self._hash.hexdigest()
        self.parts.append(self._part)

    def _finished(self) -> None:
        self.complete = True


def _store_part(received: DicomIntake, part: Part, study: str | None, sender: str) -> Outcome:
    """Check one part as the C-STORE SCP's negotiation would, then store and queue it."""
    media_type, _ = parse_options_header(part.headers.get("content-type"))
    if media_type != DICOM_MEDIA_TYPE.encode():
        log.info("STOW-RS part from %s refused: content type %r", sender, part.headers.get("content-type"))
        return Outcome(CANNOT_UNDERSTAND)
    try:
        header = read_header(part.path)
    except Unreadable as exc:
        log.info("STOW-RS part from %s refused: not a DICOM Part-10 file: %s", sender, exc)
        return Outcome(CANNOT_UNDERSTAND)
    status = refusal(header.sop_class_uid, header.transfer_syntax_uid)
    if status is None and study is not None and header.study_instance_uid != study:
        status = STUDY_MISMATCH
    if status is None:
        status = received.receive(part.path, header.sop_instance_uid, sender, sha256=part.sha256)
    else:
        log.info("STOW-RS instance %s from %s refused: 0x%04X", header.sop_instance_uid, sender, status)
    return Outcome(status, header.sop_class_uid, header.sop_instance_uid)


def _response(outcomes: list[Outcome]) -> JSONResponse:
    """The Store Instances Response (PS3.18 Annex I) in DICOM JSON, with its HTTP status."""
    response = Dataset()
    stored = [o for o in outcomes if o.status == SUCCESS]
    failed = [o for o in outcomes if o.status != SUCCESS]
    if stored:
        response.ReferencedSOPSequence = [_reference(o) for o in stored]
    if failed:
        response.FailedSOPSequence = [_reference(o) for o in failed]
    if not failed:
        status = HTTPStatus.OK
    elif stored:
        status = HTTPStatus.ACCEPTED
    else:
        status = HTTPStatus.CONFLICT
    return JSONResponse(response.to_json_dict(), status_code=status, media_type=DICOM_JSON_MEDIA_TYPE)


def _reference(outcome: Outcome) -> Dataset:
    item = Dataset()
    if outcome.sop_class_uid is not None:
        item.ReferencedSOPClassUID = outcome.sop_class_uid
    if outcome.sop_instance_uid is not None:
        item.ReferencedSOPInstanceUID = outcome.sop_instance_uid
    if outcome.status != SUCCESS:
        item.FailureReason = outcome.status
    return item
