"""Sending the DICOM SEG and SR of a DICOM input on (worker/push.py, Service.push):
to a real pynetdicom storage SCP on loopback, and to STOW-RS servers on loopback (one
written here with the stdlib's MIME parser, and our own STOW-RS route, which refuses
them). A destination that is down is recorded with the reason and delivered by the
sweep once it is up; ``chexmask push`` sends what was not delivered."""

from __future__ import annotations

import email
import email.policy
import io
import shutil
import threading
from collections.abc import Iterator
from datetime import timedelta

import click
import pydicom
import pytest
import sqlalchemy as sa
from click.testing import CliRunner
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydicom.uid import Comprehensive3DSRStorage, ExplicitVRLittleEndian, SegmentationStorage, generate_uid
from pynetdicom import AE, evt
from services import embedded_service, free_port
from test_dicom_listener import ListQueue
from test_dicomweb import http_server

from chexmask.app.api import create_api
from chexmask.app.cli import cli
from chexmask.config import Settings
from chexmask.ingest.queue import Intake
from chexmask.ingest.registry import Registry
from chexmask.messages import Arrival
from chexmask.status import ImageStatus, PushStatus, QCStatus
from chexmask.storage import pushes
from chexmask.storage.index import MaskIndex
from chexmask.storage.models import DicomPush, utcnow
from chexmask.storage.queries import QueryFilters
from chexmask.worker.leases import Sweeper

SOURCE = "sitk_cxr_ExplicitLE.dcm"
TOKEN = "destination-token"


class StorageSCP:
    """A PACS on loopback taking SEG and Comprehensive 3D SR, keeping what it received."""

    def __init__(self, port: int, ae_title: str = "PACS"):
        self.port = port
        self.received: list[pydicom.Dataset] = []
        self.ae = AE(ae_title=ae_title)
        for sop_class in (SegmentationStorage, Comprehensive3DSRStorage):
            self.ae.add_supported_context(sop_class, ExplicitVRLittleEndian)
        self._server = None
        self._lock = threading.Lock()

    def __enter__(self) -> StorageSCP:
        handlers = [(evt.EVT_C_STORE, self._on_store)]
        self._server = self.ae.start_server(("127.0.0.1", self.port), block=False, evt_handlers=handlers)
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.shutdown()

    def _on_store(self, event) -> int:
        ds = event.dataset
        ds.file_meta = event.file_meta
        with self._lock:
            self.received.append(ds)
        return 0x0000


def segment(service, samples_dir, folder, new_uid: bool = False):
    """The sample DICOM admitted, segmented and QC'd by ``service`` (QC sends the
    outputs on); (source dataset, segmentation row after QC, QC status)."""
    source = folder / SOURCE
    ds = pydicom.dcmread(samples_dir / SOURCE)
    if new_uid:  # other bytes: a segmentation of its own
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.save_as(source)
    else:
        shutil.copyfile(samples_dir / SOURCE, source)
    ingested = Registry(service.index).admit(Arrival.for_file(source))
    result = service.segment(ingested.image_id)
    assert result.status is ImageStatus.DONE
    status = service.qc(result.segmentation_id, result.prepared.image)
    return ds, service.index.get_segmentation(result.segmentation_id), status


def referenced_source(ds: pydicom.Dataset) -> str:
    """The SOP Instance UID of the image a SEG segments, or the SR's image evidence."""
    if ds.SOPClassUID == SegmentationStorage:
        return ds.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0].ReferencedSOPInstanceUID
    evidence = [
        sop
        for study in ds.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for sop in series.ReferencedSOPSequence
    ]
    [image] = [sop for sop in evidence if sop.ReferencedSOPClassUID != SegmentationStorage]
    return image.ReferencedSOPInstanceUID


def stored(service, row, kind: str) -> pydicom.Dataset:
    return pydicom.dcmread(io.BytesIO(service.store.get(row.object_keys[kind])))


@pytest.fixture(scope="module")
def pacs() -> Iterator[StorageSCP]:
    with StorageSCP(free_port()) as scp:
        yield scp


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    return tmp_path_factory.mktemp("home")


@pytest.fixture(scope="module")
def pushed(home, pacs, samples_dir, tmp_path_factory):
    """A DICOM input segmented with CHEXMASK_DICOM_DESTINATION set and the PACS up:
    (service, source dataset, segmentation row after QC, QC status)."""
    destination = f"PACS@127.0.0.1:{pacs.port}"
    with embedded_service(home, qc_bank="none", dicom_destination=destination, dicom_ae_title="CXR_AI") as service:
        yield (service, *segment(service, samples_dir, tmp_path_factory.mktemp("in")))


def test_seg_and_sr_reach_the_destination_once_qc_has_run(pushed, pacs):
    service, source, row, status = pushed
    assert status is QCStatus.SKIPPED and {"seg", "sr"} <= set(row.object_keys)
    by_class = {ds.SOPClassUID: ds for ds in pacs.received}
    assert sorted(by_class) == sorted([SegmentationStorage, Comprehensive3DSRStorage]) and len(pacs.received) == 2
    for kind, sop_class in (("seg", SegmentationStorage), ("sr", Comprehensive3DSRStorage)):
        received = by_class[sop_class]
        assert received.SOPInstanceUID == stored(service, row, kind).SOPInstanceUID
        assert referenced_source(received) == source.SOPInstanceUID
    [push] = pushes.of(service.index, row.id)
    assert push.destination == f"dicom:PACS@127.0.0.1:{pacs.port}"
    assert (push.status, push.reason, push.attempts, push.retry_at) == (PushStatus.DONE, None, 1, None)
    assert push.pushed_at is not None


def test_a_destination_down_is_recorded_then_delivered_by_the_sweep(home, samples_dir, tmp_path):
    """Nothing listens on the port: QC ends as usual with the segmentation and its SEG
    and SR stored, the push failed with the reason and a retry time; once the PACS is
    up and the retry due, the sweep sends them."""
    port = free_port()
    with embedded_service(home, qc_bank="none", dicom_destination=f"PACS@127.0.0.1:{port}") as service:
        source, row, status = segment(service, samples_dir, tmp_path, new_uid=True)
        assert status is QCStatus.SKIPPED and {"seg", "sr"} <= set(row.object_keys)
        assert service.index.get_image(row.image_id).status is ImageStatus.DONE
        [push] = pushes.of(service.index, row.id)
        assert push.status is PushStatus.FAILED and push.attempts == 1
        assert f"PACS@127.0.0.1:{port}" in push.reason and "not reachable" in push.reason
        assert push.failing_since is not None
        assert push.retry_at - push.updated_at >= timedelta(seconds=59)  # next_failed_retry's first wait

        handed_on: list[int] = []
        repushed: list[int] = []
        settings = service.settings
        sweeper = Sweeper(
            service.index,
            handed_on.append,
            handed_on.append,
            60,
            repush=repushed.append,
            push_to=settings.push_destinations,
        )
        with StorageSCP(port) as scp:
            assert sweeper.sweep().repushed == 0 and repushed == []  # not due yet
            with service.index.engine.begin() as connection:  # the wait has passed
                connection.execute(sa.update(DicomPush).values(retry_at=utcnow() - timedelta(seconds=1)))
            assert sweeper.sweep().repushed == 1 and repushed == [row.id]
            assert sweeper.sweep().repushed == 0  # taken: not handed on twice
            [delivered] = service.push(row.id)
            assert {ds.SOPClassUID for ds in scp.received} == {SegmentationStorage, Comprehensive3DSRStorage}
            assert {referenced_source(ds) for ds in scp.received} == {source.SOPInstanceUID}
        assert (delivered.status, delivered.reason, delivered.attempts) == (PushStatus.DONE, None, 2)
        assert delivered.failing_since is None and delivered.retry_at is None
        assert pushes.due(service.index, settings.push_destinations) == [] and handed_on == []


def stow_receiver() -> tuple[FastAPI, list[tuple[str | None, list[bytes]]]]:
    """A STOW-RS server splitting the body with the stdlib's MIME parser; it keeps the
    Authorization header and the parts of each request."""
    app, received = FastAPI(), []

    @app.post("/dicom-web/studies")
    async def studies(request: Request) -> JSONResponse:
        head = f"Content-Type: {request.headers['content-type']}\r\n\r\n".encode()
        message = email.message_from_bytes(head + await request.body(), policy=email.policy.HTTP)
        assert message.get_content_type() == "multipart/related" and message.get_param("type") == "application/dicom"
        parts = [part.get_payload(decode=True) for part in message.iter_parts()]
        received.append((request.headers.get("authorization"), parts))
        return JSONResponse({}, media_type="application/dicom+json")

    return app, received


def test_a_stow_destination_receives_the_part_10_files(pushed, home):
    service, _, row, _ = pushed
    app, received = stow_receiver()
    with http_server(app) as url:
        destination = f"{url}/dicom-web/studies"
        with embedded_service(home, stow_destination=destination, stow_destination_token=TOKEN) as stow:
            [push] = stow.push(row.id)
    assert (push.destination, push.status) == (f"stow:{destination}", PushStatus.DONE)
    [(authorization, parts)] = received
    assert authorization == f"Bearer {TOKEN}"
    assert parts == [service.store.get(row.object_keys["seg"]), service.store.get(row.object_keys["sr"])]


def test_a_stow_destination_that_refuses_is_recorded_with_its_reasons(pushed, home, tmp_path):
    """Our own STOW-RS route takes radiographs only: it answers 409 with 0x0122 for
    both, and the push records that."""
    service, _, row, _ = pushed
    settings = Settings(home=tmp_path, database_url=f"sqlite:///{tmp_path / 'other.db'}", broker_url="")
    index = MaskIndex(settings.database_url)
    index.upgrade()
    try:
        app = create_api(settings, Intake(Registry(index), ListQueue()))
        with http_server(app) as url, embedded_service(home, stow_destination=f"{url}/dicomweb/studies") as stow:
            [push] = stow.push(row.id)
        assert index.images() == []
    finally:
        index.close()
    seg, sr = stored(service, row, "seg"), stored(service, row, "sr")
    assert push.status is PushStatus.FAILED and push.retry_at is not None
    assert push.reason.startswith(f"{url}/dicomweb/studies answered 409: failed ")
    assert f"{seg.SOPInstanceUID} 0x0122" in push.reason and f"{sr.SOPInstanceUID} 0x0122" in push.reason


def test_push_command_sends_what_a_destination_has_not_taken(pushed, home):
    service, _, row, _ = pushed
    env = {"CHEXMASK_HOME": str(home), "CHEXMASK_QC_BANK": "none"}

    def push(*args: str):
        """``chexmask push ARGS`` as ``main`` runs it: its return value is the exit status."""
        return CliRunner().invoke(cli, ["push", *args], env=env, standalone_mode=False)

    with StorageSCP(free_port(), ae_title="ARCHIVE") as archive:
        env["CHEXMASK_DICOM_DESTINATION"] = f"ARCHIVE@127.0.0.1:{archive.port}"
        dicom = len(pushes.dicom_segmentations(service.index, QueryFilters()))
        assert dicom >= 1
        first = push()
        assert first.return_value == 0, first.output
        assert f"{dicom} DICOM segmentation(s): {dicom} sent, 0 failed" in first.output
        assert len(archive.received) == 2 * dicom
        again = push()  # all taken: nothing to send
        assert "0 sent, 0 failed" in again.output and len(archive.received) == 2 * dicom
        resent = push("--again", "--dataset", "generic")
        assert f"{dicom} sent" in resent.output and len(archive.received) == 4 * dicom
    down = push("--again")  # the archive has gone
    assert down.return_value == 1 and f"0 sent, {dicom} failed" in down.output
    assert f"segmentation {row.id} -> dicom:ARCHIVE@127.0.0.1:" in down.output and "not reachable" in down.output
    env.pop("CHEXMASK_DICOM_DESTINATION")
    unset = push()
    assert isinstance(unset.exception, click.UsageError) and "CHEXMASK_DICOM_DESTINATION" in str(unset.exception)
