"""DICOMweb STOW-RS (``ingest/dicomweb.py``) through a real HTTP server: the API app
with the STOW routes, served by uvicorn on a loopback port, receiving the radiographs
of ../shared/data/samples and pydicom's test files as multipart/related bodies
written here by hand (not by our own client)."""

from __future__ import annotations

import hashlib
import io
import re
import secrets
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pydicom
import pytest
import uvicorn
from fastapi import FastAPI
from pydicom.encaps import encapsulate
from pydicom.uid import MPEG2MPML, CTImageStorage
from services import free_port
from test_dicom_listener import ListQueue
from test_e2e_celery import Process, wait_for
from test_e2e_embedded import embedded_env

from chexmask.app.api import create_api
from chexmask.config import Settings
from chexmask.ingest.dicom_intake import (
    CANNOT_UNDERSTAND,
    OUT_OF_RESOURCES,
    SOP_CLASS_NOT_SUPPORTED,
    STUDY_MISMATCH,
    TRANSFER_SYNTAX_NOT_SUPPORTED,
    received_key,
)
from chexmask.ingest.queue import Intake
from chexmask.ingest.registry import Registry
from chexmask.status import ImageStatus
from chexmask.storage.index import MaskIndex
from chexmask.storage.objectstore import LocalStore

# The Part-10 radiographs among the samples (the ACR-NEMA one has no file meta).
SAMPLES = (
    "siim_cr_jpeg_baseline_mono2.dcm",
    "Fake_MONOHR1.dcm",
    "cr_jpeg_lossless_mono1_inverse.dcm",
    "sitk_cxr_ExplicitLE.dcm",
    "sitk_cxr_JPEGLS.dcm",
    "sitk_cxr_RLE.dcm",
)
TOKEN = "stow-s3cret"
STORED, FAILED, REASON = "00081199", "00081198", "00081197"
CLASS_UID, INSTANCE_UID = "00081150", "00081155"


@contextmanager
def http_server(app: FastAPI) -> Iterator[str]:
    """``app`` served by uvicorn on a free loopback port, in a thread; its base URL."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    wait_for("uvicorn to start", lambda: server.started or not thread.is_alive(), timeout=30)
    assert server.started
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)


class Stow:
    """A running API with STOW-RS over an index, a store and a queue of the test's."""

    def __init__(self, url: str, index: MaskIndex, store: LocalStore, queue: ListQueue):
        self.url, self.index, self.store, self.queue = url, index, store, queue

    def post(self, *parts: bytes, study: str | None = None, token: str | None = None, **kwargs) -> httpx.Response:
        boundary, body = multipart(parts)
        headers = {"Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}'}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        path = "/dicomweb/studies" + (f"/{study}" if study else "")
        return httpx.post(self.url + path, content=body, headers={**headers, **kwargs.pop("headers", {})}, **kwargs)

    def stored_keys(self) -> list[str]:
        return list(self.store.list("received/"))


def multipart(parts: tuple[bytes, ...], content_type: str = "application/dicom") -> tuple[str, bytes]:
    """A multipart/related body as RFC 2046 frames it: each part after a boundary
    line and its headers, the last boundary closed with ``--``."""
    boundary = "b-" + secrets.token_hex(8)
    body = b"".join(f"--{boundary}\r\nContent-Type: {content_type}\r\n\r\n".encode() + part + b"\r\n" for part in parts)
    return boundary, body + f"--{boundary}--\r\n".encode()


@pytest.fixture
def index(tmp_path) -> Iterator[MaskIndex]:
    index = MaskIndex(f"sqlite:///{tmp_path / 'index.db'}")
    index.upgrade()
    yield index
    index.close()


@contextmanager
def running_stow(tmp_path: Path, index: MaskIndex, **settings: object) -> Iterator[Stow]:
    store, queue = LocalStore(tmp_path / "store"), ListQueue()
    config = Settings(
        home=tmp_path, database_url=str(index.engine.url), store_url=store.root.as_uri(), broker_url="", **settings
    )
    app = create_api(config, Intake(Registry(index), queue), dataset="pacs", release="2024")
    with http_server(app) as url:
        yield Stow(url, index, store, queue)


@pytest.fixture
def stow(tmp_path, index) -> Iterator[Stow]:
    with running_stow(tmp_path, index) as stow:
        yield stow


def references(answer: dict, sequence: str) -> list[tuple[str | None, str | None, int | None]]:
    """(SOP Class UID, SOP Instance UID, Failure Reason) of each item of a sequence of
    the DICOM JSON Store Instances Response."""
    items = answer.get(sequence, {}).get("Value", [])

    def value(item: dict, tag: str):
        return item[tag]["Value"][0] if tag in item else None

    return [(value(i, CLASS_UID), value(i, INSTANCE_UID), value(i, REASON)) for i in items]


def test_posted_instances_are_stored_by_content_and_queued(samples_dir, pydicom_file, stow):
    files = [samples_dir / name for name in SAMPLES] + [pydicom_file("RG1_UNCR.dcm")]
    datasets = [pydicom.dcmread(path, stop_before_pixels=True) for path in files]

    response = stow.post(*(path.read_bytes() for path in files))

    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/dicom+json"
    answer = response.json()
    assert FAILED not in answer
    assert references(answer, STORED) == [(ds.SOPClassUID, ds.SOPInstanceUID, None) for ds in datasets]
    # Each file byte for byte in the store under its sha256, and an image queued for it.
    keys = {received_key(hashlib.sha256(path.read_bytes()).hexdigest()): path for path in files}
    assert sorted(stow.stored_keys()) == sorted(keys)
    for key, path in keys.items():
        assert stow.store.get(key) == path.read_bytes()
    images = stow.index.images()
    assert {image.uri for image in images} == {stow.store.url(key) for key in keys}
    assert {a.uri for a in stow.queue.arrivals} == {image.uri for image in images}
    for image in images:
        assert (image.dataset, image.release, image.status) == ("pacs", "2024", ImageStatus.QUEUED)
    # Fake_MONOHR1 re-tags the SIIM image under the same SOP Instance UID: two images.
    assert sorted(image.dataset_image_id for image in images) == sorted(ds.SOPInstanceUID for ds in datasets)


def test_an_instance_sent_twice_is_one_image_queued_once(samples_dir, stow):
    data = (samples_dir / "sitk_cxr_JPEGLS.dcm").read_bytes()
    first = stow.post(data, data)  # twice in one request
    again = stow.post(data)  # and in another one
    assert (first.status_code, again.status_code) == (200, 200)
    assert len(references(first.json(), STORED)) == 2
    assert len(stow.stored_keys()) == 1 and len(stow.index.images()) == 1 and len(stow.queue.arrivals) == 1


def test_refused_parts_fail_with_their_reason_while_the_others_are_stored(samples_dir, pydicom_file, stow):
    good = pydicom.dcmread(samples_dir / "sitk_cxr_RLE.dcm")
    ct = pydicom.dcmread(pydicom_file("CT_small.dcm"))
    assert ct.SOPClassUID == CTImageStorage
    corrupt = b"\0" * 128 + b"DICM" + secrets.token_bytes(300)
    acr_nema = (samples_dir / "cr_mono1_acr_nema_no_preamble.dcm").read_bytes()  # no Part-10 header
    undecodable = pydicom.dcmread(samples_dir / "sitk_cxr_ExplicitLE.dcm")
    undecodable.file_meta.TransferSyntaxUID = MPEG2MPML  # a syntax we cannot decode
    undecodable.PixelData = encapsulate([undecodable.PixelData])
    undecodable.SOPInstanceUID = undecodable.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()

    response = stow.post(
        (samples_dir / "sitk_cxr_RLE.dcm").read_bytes(),
        corrupt,
        pydicom_file("CT_small.dcm").read_bytes(),
        acr_nema,
        encode(undecodable),
    )

    assert response.status_code == 202, response.text
    answer = response.json()
    assert references(answer, STORED) == [(good.SOPClassUID, good.SOPInstanceUID, None)]
    assert references(answer, FAILED) == [
        (None, None, CANNOT_UNDERSTAND),
        (CTImageStorage, ct.SOPInstanceUID, SOP_CLASS_NOT_SUPPORTED),
        (None, None, CANNOT_UNDERSTAND),
        (undecodable.SOPClassUID, undecodable.SOPInstanceUID, TRANSFER_SYNTAX_NOT_SUPPORTED),
    ]
    [image] = stow.index.images()
    assert image.dataset_image_id == good.SOPInstanceUID and len(stow.stored_keys()) == 1


def test_a_part_of_another_media_type_is_refused(samples_dir, stow):
    boundary, body = multipart(((samples_dir / "sitk_cxr_RLE.dcm").read_bytes(),), content_type="image/png")
    response = httpx.post(
        stow.url + "/dicomweb/studies",
        content=body,
        headers={"Content-Type": f'multipart/related; type="application/dicom"; boundary="{boundary}"'},
    )
    assert response.status_code == 409
    assert references(response.json(), FAILED) == [(None, None, CANNOT_UNDERSTAND)]
    assert stow.stored_keys() == []


def test_instances_of_another_study_than_the_url_names_are_refused(samples_dir, stow):
    data = (samples_dir / "sitk_cxr_ExplicitLE.dcm").read_bytes()
    ds = pydicom.dcmread(samples_dir / "sitk_cxr_ExplicitLE.dcm", stop_before_pixels=True)
    elsewhere = stow.post(data, study=pydicom.uid.generate_uid())
    assert elsewhere.status_code == 409
    assert references(elsewhere.json(), FAILED) == [(ds.SOPClassUID, ds.SOPInstanceUID, STUDY_MISMATCH)]
    assert stow.stored_keys() == [] and stow.index.images() == []
    assert stow.post(data, study=ds.StudyInstanceUID).status_code == 200
    assert len(stow.index.images()) == 1


@pytest.mark.parametrize(
    "content_type",
    [
        "application/dicom",
        "application/json",
        'multipart/related; type="application/dicom+json"; boundary=x',
        "multipart/form-data; boundary=x",
        None,
    ],
)
def test_other_media_types_are_unsupported(content_type, samples_dir, stow):
    headers = {"Content-Type": content_type} if content_type else {}
    response = httpx.post(
        stow.url + "/dicomweb/studies", content=(samples_dir / "sitk_cxr_RLE.dcm").read_bytes(), headers=headers
    )
    assert response.status_code == 415
    assert "multipart/related" in response.json()["detail"]
    assert stow.stored_keys() == []


def test_a_body_without_its_closing_boundary_is_a_bad_request(samples_dir, stow):
    boundary, body = multipart(((samples_dir / "sitk_cxr_RLE.dcm").read_bytes(),))
    response = httpx.post(
        stow.url + "/dicomweb/studies",
        content=body[: -len(f"--{boundary}--\r\n")],
        headers={"Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}'},
    )
    assert response.status_code == 400 and "closing boundary" in response.json()["detail"]
    assert stow.stored_keys() == []


def test_a_body_over_the_limit_is_refused_declared_or_streamed(samples_dir, tmp_path, index):
    data = (samples_dir / "sitk_cxr_RLE.dcm").read_bytes()
    with running_stow(tmp_path, index, stow_max_bytes=len(data)) as stow:
        declared = stow.post(data)  # Content-Length says it: refused before the body is read
        assert declared.status_code == 413 and "CHEXMASK_STOW_MAX_BYTES" in declared.json()["detail"]
        boundary, body = multipart((data,))
        streamed = httpx.post(  # chunked, no length: refused once the limit is passed
            stow.url + "/dicomweb/studies",
            content=iter([body[i : i + 65536] for i in range(0, len(body), 65536)]),
            headers={"Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}'},
        )
        assert "content-length" not in streamed.request.headers
        assert streamed.status_code == 413
        assert stow.stored_keys() == [] and stow.index.images() == []


def test_the_api_token_is_required_when_set(samples_dir, tmp_path, index):
    data = (samples_dir / "sitk_cxr_RLE.dcm").read_bytes()
    with running_stow(tmp_path, index, api_token=TOKEN) as stow:
        assert stow.post(data).status_code == 401
        assert stow.post(data, token="wrong").status_code == 401
        assert stow.stored_keys() == []
        assert stow.post(data, token=TOKEN).status_code == 200
        assert len(stow.index.images()) == 1


def test_a_store_or_queue_failure_answers_out_of_resources(samples_dir, stow):
    """A file where the store's folder must be (a real OS error on every write), then a
    queue that is down: the sender hears 0xA700 and keeps the instance; its retry is
    stored and queued once."""
    data = (samples_dir / "sitk_cxr_ExplicitLE.dcm").read_bytes()
    ds = pydicom.dcmread(samples_dir / "sitk_cxr_ExplicitLE.dcm", stop_before_pixels=True)
    blocker = stow.store.root / "received"
    blocker.parent.mkdir(parents=True, exist_ok=True)
    blocker.write_bytes(b"not a folder")
    unstored = stow.post(data)
    assert unstored.status_code == 409
    assert references(unstored.json(), FAILED) == [(ds.SOPClassUID, ds.SOPInstanceUID, OUT_OF_RESOURCES)]
    assert stow.index.images() == []
    blocker.unlink()

    stow.queue.broken = True
    unqueued = stow.post(data)
    assert references(unqueued.json(), FAILED) == [(ds.SOPClassUID, ds.SOPInstanceUID, OUT_OF_RESOURCES)]
    assert stow.index.images() == [] and stow.queue.arrivals == []
    stow.queue.broken = False

    assert stow.post(data).status_code == 200  # the sender's retry
    assert len(stow.stored_keys()) == 1 and len(stow.index.images()) == 1 and len(stow.queue.arrivals) == 1


def test_api_command_takes_stow_into_the_store_and_queue(tmp_path, samples_dir):
    """``chexmask api`` as a user starts it, on the embedded broker: a posted instance
    lands in the store and the index, queued (for a worker, or ``serve``)."""
    home, port = tmp_path / "home", free_port()
    api = Process.cli(["api", "--port", str(port), "--dataset", "pacs"], embedded_env(home), tmp_path / "api.log")
    try:
        api.wait_output("Uvicorn running", timeout=90)
        data = (samples_dir / "sitk_cxr_RLE.dcm").read_bytes()
        boundary, body = multipart((data,))
        response = httpx.post(
            f"http://127.0.0.1:{port}/dicomweb/studies",
            content=body,
            headers={"Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}'},
        )
        assert response.status_code == 200, response.text
    finally:
        # uvicorn shuts down cleanly, then re-raises the SIGTERM it caught
        assert api.stop() in (0, -15), api.output()
        assert "Application shutdown complete" in api.output()
    index = MaskIndex(Settings(home=home).database_url)
    try:
        [image] = index.images()
        assert image.dataset == "pacs" and image.status is ImageStatus.QUEUED
        assert re.fullmatch(r".*/received/dicom/[0-9a-f]{2}/[0-9a-f]{64}\.dcm", image.uri)
    finally:
        index.close()


def encode(ds: pydicom.Dataset) -> bytes:
    """A Part-10 file's bytes."""
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()
