"""The DICOM C-STORE SCP (``ingest/dicom_listener.py``) with real DICOM traffic on
loopback: pynetdicom's SCU sends the chest radiographs of ../shared/data/samples and
pydicom-data to a listener on a port the system picked for the test."""

from __future__ import annotations

import hashlib
import re
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.dsutils import encode, split_dataset
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    CTImageStorage,
    DigitalXRayImageStorageForPresentation,
    DigitalXRayImageStorageForProcessing,
    Verification,
)
from test_e2e_celery import Process, wait_for
from test_e2e_embedded import embedded_env

from chexmask.config import Settings
from chexmask.errors import ConfigError
from chexmask.ingest.dicom_intake import OUT_OF_RESOURCES, SUCCESS, received_key
from chexmask.ingest.dicom_listener import DicomListener
from chexmask.ingest.queue import Intake
from chexmask.ingest.registry import Registry
from chexmask.messages import Arrival
from chexmask.status import ImageStatus
from chexmask.storage.index import MaskIndex
from chexmask.storage.objectstore import LocalStore, ObjectStore

# Every radiograph sample with a SOP class a modality sends (the ACR-NEMA file has
# no file meta: it is sent in the implicit VR it was read in).
SAMPLES = (
    "siim_cr_jpeg_baseline_mono2.dcm",
    "Fake_MONOHR1.dcm",
    "cr_jpeg_lossless_mono1_inverse.dcm",
    "cr_mono1_acr_nema_no_preamble.dcm",
    "sitk_cxr_ExplicitLE.dcm",
    "sitk_cxr_JPEGLS.dcm",
    "sitk_cxr_RLE.dcm",
)
PYDICOM_SAMPLES = ("RG1_UNCR.dcm", "RG1_J2KR.dcm")
# dcmtk storescu's option proposing a compressed transfer syntax family
DCMTK_PROPOSALS = {
    "1.2.840.10008.1.2.4.50": ["--propose-jpeg8"],
    "1.2.840.10008.1.2.4.70": ["--propose-lossless"],
    "1.2.840.10008.1.2.4.80": ["--propose-jls-lossless"],
    "1.2.840.10008.1.2.5": ["--propose-rle"],
}


class ListQueue:
    """An IngestQueue keeping what it was given, and in which groups; fails while
    ``broken``; once ``held``, a put waits until the event is set."""

    def __init__(self) -> None:
        self.arrivals: list[Arrival] = []
        self.groups: list[int] = []
        self.broken = False
        self.held: threading.Event | None = None

    def put(self, arrivals) -> None:
        if self.held is not None:
            self.held.wait(30)
        if self.broken:
            raise ConnectionError("broker down")
        self.arrivals += arrivals
        self.groups.append(len(arrivals))


@pytest.fixture
def queue() -> ListQueue:
    return ListQueue()


@pytest.fixture
def index(tmp_path) -> Iterator[MaskIndex]:
    """SQLite only: the listener hands arrivals to ``Intake``, whose index work the
    ingest tests run on both databases."""
    index = MaskIndex(f"sqlite:///{tmp_path / 'index.db'}")
    index.upgrade()
    yield index
    index.close()


@pytest.fixture
def store(tmp_path) -> LocalStore:
    return LocalStore(tmp_path / "store")


@pytest.fixture
def scp(index: MaskIndex, store: ObjectStore, queue: ListQueue) -> Iterator[DicomListener]:
    listener = DicomListener(
        Intake(Registry(index), queue), store, port=0, host="127.0.0.1", ae_title="CHEXMASK", dataset="pacs"
    )
    with listener:
        yield listener


def read_sample(path: Path) -> Dataset:
    ds = pydicom.dcmread(path, force=True)
    if "TransferSyntaxUID" not in getattr(ds, "file_meta", {}):  # ACR-NEMA: as read
        implicit_vr, _ = ds.original_encoding
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian if implicit_vr else ExplicitVRLittleEndian
    return ds


def associate(port: int, *datasets: Dataset) -> Association:
    """An association from a modality-like SCU proposing each dataset's SOP class in
    the transfer syntax it is encoded in (and Verification)."""
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(Verification)
    for ds in datasets:
        ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", port, ae_title="CHEXMASK")
    assert assoc.is_established
    return assoc


def send(port: int, *datasets: Dataset) -> list[int]:
    """C-STORE every dataset in one association; their status codes."""
    assoc = associate(port, *datasets)
    try:
        return [int(assoc.send_c_store(ds).Status) for ds in datasets]
    finally:
        assoc.release()


def without_group_lengths(ds: Dataset) -> Dataset:
    """The dataset less its (gggg,0000) group lengths: retired outside the file meta,
    and not sent by pynetdicom's SCU (old ACR-NEMA files carry them)."""
    for tag in [element.tag for element in ds if element.tag.element == 0]:
        del ds[tag]
    return ds


def stored_keys(store: ObjectStore) -> list[str]:
    return list(store.list("received/"))


def test_answers_c_echo(scp):
    assoc = associate(scp.port)
    try:
        assert assoc.send_c_echo().Status == SUCCESS
    finally:
        assoc.release()


def test_samples_are_stored_by_content_then_queued(samples_dir, scp, store, index, queue):
    """Every sample in one association, as a modality sends a study: each is a Part-10
    file in the store under the sha256 of its bytes, and a queued image in the index."""
    sent = [read_sample(samples_dir / name) for name in SAMPLES]
    assert send(scp.port, *sent) == [SUCCESS] * len(sent)

    images = index.images()
    assert len(images) == len(sent) == len(stored_keys(store)) == len(queue.arrivals)
    # Fake_MONOHR1 is the SIIM image re-tagged under the same SOP Instance UID: other
    # bytes, so another object and another image (content decides, as everywhere).
    stored = {}
    for image in images:
        assert image.dataset == "pacs" and image.status is ImageStatus.QUEUED
        key = image.uri.removeprefix(store.root.as_uri() + "/")
        data = store.get(key)
        assert key == received_key(hashlib.sha256(data).hexdigest()) and image.size == len(data)
        assert data[128:132] == b"DICM"  # a Part-10 file: preamble, then the file meta
        ds = pydicom.dcmread(store.url(key).removeprefix("file://"))
        assert image.dataset_image_id == ds.SOPInstanceUID == ds.file_meta.MediaStorageSOPInstanceUID
        stored[ds.file_meta.TransferSyntaxUID, ds.PhotometricInterpretation, ds.SOPInstanceUID] = ds
    for ds in sent:
        received = stored[ds.file_meta.TransferSyntaxUID, ds.PhotometricInterpretation, ds.SOPInstanceUID]
        assert without_group_lengths(received) == without_group_lengths(ds)  # the dataset as sent
    assert {a.uri for a in queue.arrivals} == {image.uri for image in images}


@pytest.mark.skipif(shutil.which("storescu") is None, reason="dcmtk's storescu is not installed")
def test_dcmtk_storescu_sends_the_samples(samples_dir, scp, store, index, queue):
    """A C sender as PACS use (dcmtk), in its own process: other PDU sizes and pacing
    than pynetdicom's; every file arrives whole, its dataset as it was on disk."""
    paths = [samples_dir / name for name in SAMPLES if name != "cr_mono1_acr_nema_no_preamble.dcm"]
    for path in paths:
        # storescu proposes the uncompressed syntaxes and, when told, one compressed family:
        # the one each file is in, so it goes as it is (no conversion on the way)
        family = DCMTK_PROPOSALS.get(pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID, [])
        sender = subprocess.run(
            ["storescu", "-aec", "CHEXMASK", *family, "127.0.0.1", str(scp.port), str(path)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert sender.returncode == 0, sender.stderr
    assert len(queue.arrivals) == len(paths) == len(index.images())
    received = {}
    for key in stored_keys(store):
        ds = pydicom.dcmread(store.url(key).removeprefix("file://"))
        received[ds.file_meta.TransferSyntaxUID, ds.PhotometricInterpretation, ds.SOPInstanceUID] = ds
    for path in paths:
        sent = pydicom.dcmread(path)
        key = sent.file_meta.TransferSyntaxUID, sent.PhotometricInterpretation, sent.SOPInstanceUID
        assert without_group_lengths(received[key]) == without_group_lengths(sent)  # as it was on disk


@pytest.mark.parametrize("name", PYDICOM_SAMPLES)
def test_pydicom_data_radiographs(name, pydicom_file, scp, store, index, queue):
    ds = read_sample(pydicom_file(name))
    assert send(scp.port, ds) == [SUCCESS]
    [key] = stored_keys(store)
    assert without_group_lengths(pydicom.dcmread(store.url(key).removeprefix("file://"))) == ds
    [image] = index.images()
    assert image.dataset_image_id == ds.SOPInstanceUID and len(queue.arrivals) == 1


@pytest.mark.parametrize("sop_class", [DigitalXRayImageStorageForPresentation, DigitalXRayImageStorageForProcessing])
def test_digital_x_ray_classes_are_accepted(sop_class, samples_dir, scp, store, queue):
    """The SimpleITK CR re-labelled as a DX modality would label it."""
    ds = read_sample(samples_dir / "sitk_cxr_ExplicitLE.dcm")
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.Modality = "DX"
    assert send(scp.port, ds) == [SUCCESS]
    [key] = stored_keys(store)
    stored = pydicom.dcmread(store.url(key).removeprefix("file://"))
    assert stored.SOPClassUID == stored.file_meta.MediaStorageSOPClassUID == sop_class
    assert len(queue.arrivals) == 1


def test_stored_file_is_the_file_meta_then_the_bytes_sent(samples_dir, scp, store):
    """Received in chunks straight to a file, stored by a link: the object is the
    preamble and file meta of the association, then the dataset byte for byte as the
    SCU encoded it, and named by the sha256 of exactly that."""
    ds = read_sample(samples_dir / "sitk_cxr_ExplicitLE.dcm")
    assert send(scp.port, ds) == [SUCCESS]
    [key] = stored_keys(store)
    path = Path(store.url(key).removeprefix("file://"))
    data = path.read_bytes()
    assert key == received_key(hashlib.sha256(data).hexdigest())
    meta, offset = split_dataset(path)
    assert data[:132] == b"\0" * 128 + b"DICM"
    assert (meta.MediaStorageSOPInstanceUID, meta.TransferSyntaxUID) == (ds.SOPInstanceUID, ExplicitVRLittleEndian)
    assert data[offset:] == encode(ds, is_implicit_vr=False, is_little_endian=True)
    assert path.stat().st_nlink == 1  # pynetdicom's temporary name is gone


def test_an_instance_sent_twice_is_one_image(samples_dir, scp, store, index, queue):
    ds = read_sample(samples_dir / "sitk_cxr_JPEGLS.dcm")
    assert send(scp.port, ds, ds) == [SUCCESS, SUCCESS]  # twice in one association
    assert send(scp.port, ds) == [SUCCESS]  # and again in another one
    assert len(stored_keys(store)) == 1
    assert len(index.images()) == 1 and len(queue.arrivals) == 1


def test_unwritable_store_answers_failure_and_queues_nothing(samples_dir, scp, store, index, queue):
    """A file where the store's folder must be: every write fails with a real OS error
    (permission bits would not stop root). The sender hears out-of-resources and
    retries; once the store is writable again the instance goes through."""
    blocker = Path(store.root) / "received"
    blocker.parent.mkdir(parents=True, exist_ok=True)
    blocker.write_bytes(b"not a folder")
    ds = read_sample(samples_dir / "sitk_cxr_RLE.dcm")

    assert send(scp.port, ds) == [OUT_OF_RESOURCES]
    assert queue.arrivals == [] and index.images() == []

    blocker.unlink()
    assert send(scp.port, ds) == [SUCCESS]
    assert len(stored_keys(store)) == 1 and len(queue.arrivals) == 1


def test_queue_down_answers_failure_and_the_retry_is_queued_once(samples_dir, scp, store, index, queue):
    ds = read_sample(samples_dir / "sitk_cxr_ExplicitLE.dcm")
    queue.broken = True
    assert send(scp.port, ds) == [OUT_OF_RESOURCES]
    assert index.images() == []
    queue.broken = False
    assert send(scp.port, ds) == [SUCCESS]  # the sender's retry: same key, queued now
    assert len(stored_keys(store)) == 1 and len(queue.arrivals) == 1 and len(index.images()) == 1


def test_instances_arriving_during_an_offer_are_queued_together(samples_dir, scp, store, index, queue):
    """Parallel associations: while the first instance's offer waits on the queue, the
    others are stored and gather; they go in one offer once it returns (a group
    commit), and every sender hears success only after its instance is queued."""
    datasets = [read_sample(samples_dir / name) for name in SAMPLES[:4]]
    queue.held = threading.Event()
    with ThreadPoolExecutor(len(datasets)) as pool:
        first = pool.submit(send, scp.port, datasets[0])
        wait_for("the first offer", lambda: len(stored_keys(store)) == 1, timeout=30)
        others = [pool.submit(send, scp.port, ds) for ds in datasets[1:]]
        wait_for("the others stored", lambda: len(stored_keys(store)) == len(datasets), timeout=30)
        time.sleep(0.5)  # from stored to waiting for the offer: microseconds
        assert queue.arrivals == [] and not any(f.done() for f in [first, *others])  # none acknowledged yet
        queue.held.set()
        assert [f.result() for f in [first, *others]] == [[SUCCESS]] * len(datasets)
    assert queue.groups == [1, len(datasets) - 1]
    assert len(index.images()) == len(datasets)


def test_a_failed_group_offer_fails_every_instance_in_it(samples_dir, scp, store, index, queue):
    datasets = [read_sample(samples_dir / name) for name in SAMPLES[4:7]]
    queue.broken = True
    with ThreadPoolExecutor(len(datasets)) as pool:
        statuses = list(pool.map(lambda ds: send(scp.port, ds), datasets))
    assert statuses == [[OUT_OF_RESOURCES]] * len(datasets) and index.images() == []
    queue.broken = False
    assert send(scp.port, *datasets) == [SUCCESS] * len(datasets)  # the senders' retries
    assert len(index.images()) == len(datasets) == len(queue.arrivals)


def test_other_sop_classes_are_refused_at_negotiation(scp, pydicom_file, index):
    ct = pydicom.dcmread(pydicom_file("CT_small.dcm"))
    assert ct.SOPClassUID == CTImageStorage
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(CTImageStorage, ct.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", scp.port, ae_title="CHEXMASK")
    # The SCP rejects the CT context; with nothing accepted the SCU gives up.
    assert [context.abstract_syntax for context in assoc.rejected_contexts] == [CTImageStorage]
    assert not assoc.is_established and assoc.accepted_contexts == []
    assert index.images() == []


def test_a_taken_port_is_one_clear_error(scp, index, store, queue):
    second = DicomListener(Intake(Registry(index), queue), store, port=scp.port, host="127.0.0.1", ae_title="X")
    with pytest.raises(ConfigError, match=f"cannot listen for DICOM on 127.0.0.1:{scp.port}"):
        second.start()
    second.stop()


def test_ae_title_setting_is_checked():
    assert Settings(dicom_ae_title="CXR_SCP", dicom_port=104).dicom_ae_title == "CXR_SCP"
    with pytest.raises(ConfigError, match="CHEXMASK_DICOM_AE_TITLE"):
        Settings(dicom_ae_title="A_TITLE_LONGER_THAN_16")


def test_listen_command_receives_into_the_store_and_queues(tmp_path, samples_dir):
    """``chexmask listen --dicom-port`` as its own process (the scaled-out listener),
    on the embedded broker: the instance lands in the store and the index, queued."""
    home = tmp_path / "home"
    env = {**embedded_env(home), "CHEXMASK_DICOM_AE_TITLE": "CXR_SCP"}
    listener = Process.ingest_command("listen", ["--dicom-port", "0", "--dataset", "pacs"], env, tmp_path / "l.log")
    try:
        listener.wait_output("receiving DICOM on port", timeout=60)
        match = re.search(r"receiving DICOM on port (\d+) as CXR_SCP", listener.output())
        assert match, listener.output()
        ds = read_sample(samples_dir / "sitk_cxr_RLE.dcm")
        assert send(int(match[1]), ds) == [SUCCESS]
    finally:
        assert listener.stop() == 0, listener.output()
    settings = Settings(home=home)
    index = MaskIndex(settings.database_url)
    try:
        [image] = index.images()
        assert image.dataset == "pacs" and image.status is ImageStatus.QUEUED
        assert image.uri.startswith((home / "store" / "received" / "dicom").as_uri())
    finally:
        index.close()


def test_listener_processes_share_the_port(tmp_path, samples_dir):
    """``--dicom-processes 2``: two SCP processes on one port, the kernel spreading the
    associations; parallel senders on a new broker file are all stored and queued once,
    and stopping the command stops both (the port is free again)."""
    home = tmp_path / "home"
    command = ["--dicom-port", "0", "--dicom-processes", "2"]
    listener = Process.ingest_command("listen", command, embedded_env(home), tmp_path / "l.log")
    try:
        listener.wait_output("receiving DICOM on port", timeout=60)
        match = re.search(r"receiving DICOM on port (\d+) as \S+ \(2 process\(es\)\)", listener.output())
        assert match, listener.output()
        port = int(match[1])
        sent = [read_sample(samples_dir / name) for name in SAMPLES]
        with ThreadPoolExecutor(len(sent)) as senders:  # an association each, at once
            statuses = list(senders.map(lambda ds: send(port, ds), sent))
        assert statuses == [[SUCCESS]] * len(sent), listener.output()
    finally:
        assert listener.stop() == 0, listener.output()
    index = MaskIndex(Settings(home=home).database_url)
    try:
        images = index.images()
        assert len(images) == len(sent) and {i.status for i in images} == {ImageStatus.QUEUED}
    finally:
        index.close()
    with socket.socket() as probe:  # nobody listens there any more (closed associations may linger)
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind(("0.0.0.0", port))
        probe.listen()


def test_serve_segments_what_it_receives(tmp_path, samples_dir, random_weights):
    """The embedded server with its DICOM listener: a C-STORE ends as a segmentation in
    the index, on the server's own threads (no broker)."""
    from chexmask.app.serve import Server

    settings = Settings(home=tmp_path / "home", weights=str(random_weights), broker_url="", qc_bank="none")
    server = Server(settings, tmp_path / "inbox", settle=0.0, threads=2, dicom_port=0)
    assert server.dicom is not None
    try:
        model = server.start()
        server.dicom.start()
        ds = read_sample(samples_dir / "siim_cr_jpeg_baseline_mono2.dcm")
        acknowledged = time.monotonic()
        assert send(server.dicom.port, ds) == [SUCCESS]
        index = server.service.index
        done = wait_for(
            "the segmentation",
            lambda: [i for i in index.images() if i.status is ImageStatus.DONE],
            timeout=120,
        )
        seconds = time.monotonic() - acknowledged
        [image] = done
        assert image.dataset_image_id == ds.SOPInstanceUID and image.dataset == "generic"
        segmentation = index.segmentation_for(image.sha256, model.version)
        assert segmentation is not None and segmentation.image_id == image.id
        assert seconds < 60
    finally:
        if server.dicom is not None:
            server.dicom.stop()
        server.stop()
        server.close()


@pytest.mark.slow
def test_serve_command_with_dicom_port_until_sigterm(tmp_path, samples_dir, random_weights):
    """``chexmask serve --dicom-port`` as a user starts it: storescu-like pushes are
    segmented, and SIGTERM stops the listener with the rest (exit 0)."""
    home = tmp_path / "home"
    args = ["serve", "--inbox", str(tmp_path / "inbox"), "--dicom-port", "0", "--ae-title", "CXR_SCP"]
    server = Process.cli(args, embedded_env(home, random_weights), tmp_path / "serve.log")
    try:
        server.wait_output("watching")
        match = re.search(r"receiving DICOM on port (\d+) as CXR_SCP", server.output())
        assert match, server.output()
        ds = read_sample(samples_dir / "sitk_cxr_JPEGLS.dcm")
        assert send(int(match[1]), ds) == [SUCCESS]
        server.wait_output("[1] segmented")
    finally:
        assert server.stop() == 0, server.output()
    assert server.output().splitlines()[-1].startswith("1 segmented in")
