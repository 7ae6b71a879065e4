"""Radiographs pushed over the network by a PACS or a modality: a DICOM C-STORE SCP.

The listener accepts the radiograph storage SOP classes (CR, DX for
presentation and for processing, Secondary Capture) in every transfer syntax
the decoder reads here (``decodable_transfer_syntaxes``), and answers C-ECHO.
Other SOP classes and syntaxes are refused when the association is negotiated,
so a sender never hears "stored" for something we would refuse to decode.

Each received instance is written as a DICOM Part-10 file (the file meta built
from the association, then the dataset exactly as it was sent) and handed to
``DicomIntake`` (``dicom_intake``, shared with STOW-RS), which stores it by
content and queues it before the sender hears success. pynetdicom writes that
file to a temporary folder while the fragments arrive
(``STORE_RECV_CHUNKED_DATASET``: nothing assembled in memory or decoded), and the
store takes it by a hard link where the temporary folder (``TMPDIR``) is on the
store's filesystem, so the bytes reach the disk once.
"""

from __future__ import annotations

import logging
import socket
import threading
from pathlib import Path
from typing import Any

from pynetdicom import AE, _config, evt
from pynetdicom.events import EventHandlerType
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]  # generated at import
from pynetdicom.transport import AssociationSocket, RequestHandler, ThreadedAssociationServer

from chexmask.errors import ConfigError
from chexmask.ingest.dicom_intake import STORAGE_SOP_CLASSES, DicomIntake
from chexmask.ingest.queue import Intake
from chexmask.storage.objectstore import ObjectStore
from chexmask.worker.decode import decodable_transfer_syntaxes

log = logging.getLogger(__name__)

# The largest PDU we tell senders we take. pynetdicom copies a PDU whole a few times
# over, so very large PDUs cost more CPU than they save in per-PDU work: 256 KiB took
# 35-41 ms of CPU per 8 MB instance, against 65 at pynetdicom's default 16 KiB and
# 67-70 at 4 MiB (benchmarks/bench_dicom.py, measured with pynetdicom's 4 KiB reads,
# before ``_WholeReadSocket``).
MAX_PDU_BYTES = 256 << 10
# Received datasets go straight to a temporary Part-10 file (``event.dataset_path``).
# A process-wide pynetdicom setting: this SCP is the only one receiving C-STOREs here.
_config.STORE_RECV_CHUNKED_DATASET = True


class _WholeReadSocket(AssociationSocket):
    """Reads a PDU with as few large reads as the kernel allows. pynetdicom reads
    4 KiB at a time: about 2,000 reads and Python loop turns per 8 MB instance."""

    def recv(self, nr_bytes: int) -> bytearray:
        assert self.socket is not None
        received = bytearray(nr_bytes)
        view, read = memoryview(received), 0
        while read < nr_bytes:
            count = self.socket.recv_into(view[read:])
            if not count:  # the peer closed: what arrived, as pynetdicom's own recv returns
                del view
                return received[:read]
            read += count
        return received


class _RequestHandler(RequestHandler):
    def _create_association(self) -> Any:
        association = super()._create_association()
        # the socket pynetdicom made for this connection, given the whole-PDU reads
        association.dul.socket.__class__ = _WholeReadSocket
        return association


class _SharedPortServer(ThreadedAssociationServer):
    """Binds with SO_REUSEPORT: listener processes bound to one port share its
    connections, spread over them by the kernel (one interpreter lock each)."""

    def server_bind(self) -> None:
        assert self.socket is not None
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()


class DicomListener:
    """A C-STORE SCP that stores every instance, then hands it to ``intake``.
    ``shared_port``: other processes may listen on the same port (``_SharedPortServer``)."""

    def __init__(
        self,
        intake: Intake,
        store: ObjectStore,
        *,
        port: int,
        ae_title: str,
        host: str = "0.0.0.0",
        dataset: str | None = None,
        release: str | None = None,
        shared_port: bool = False,
    ):
        self.received = DicomIntake(intake, store, dataset=dataset, release=release)
        self.shared_port = shared_port
        self.address = (host, port)
        self.ae = AE(ae_title=ae_title)
        self.ae.maximum_pdu_size = MAX_PDU_BYTES
        syntaxes = decodable_transfer_syntaxes()
        for sop_class in STORAGE_SOP_CLASSES:
            self.ae.add_supported_context(sop_class, syntaxes)
        self.ae.add_supported_context(Verification)  # C-ECHO: pynetdicom answers success itself
        self._server: ThreadedAssociationServer | None = None

    @property
    def port(self) -> int:
        """The port listened on (the one the system chose when asked for port 0)."""
        assert self._server is not None, "not started"
        return int(self._server.server_address[1])

    def start(self) -> DicomListener:
        handlers: list[EventHandlerType] = [(evt.EVT_C_STORE, self._on_store)]
        self.received.start()
        server_class = _SharedPortServer if self.shared_port else ThreadedAssociationServer
        try:
            server = self.ae.make_server(
                self.address, evt_handlers=handlers, server_class=server_class, request_handler=_RequestHandler
            )
        except OSError as exc:  # the port is taken, or needs privileges
            self.received.close()
            raise ConfigError(f"cannot listen for DICOM on {self.address[0]}:{self.address[1]}: {exc}") from exc
        # as AE.start_server(block=False) does, with our server and request handler classes:
        # AE.shutdown() and the server's own shutdown find it among the AE's servers
        self.ae._servers.append(server)
        threading.Thread(target=server.serve_forever, name="chexmask-dicom-server", daemon=True).start()
        self._server = server
        return self

    def stop(self) -> None:
        """Stop listening; associations in progress are aborted (their senders retry
        what they did not hear acknowledged)."""
        if self._server is not None:
            self._server.shutdown()
            self._server = None
        self.received.close()
        self.ae.shutdown()

    def __enter__(self) -> DicomListener:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _on_store(self, event: Any) -> int:
        # The bytes as received, with the file meta of the association: nothing decoded.
        sop_instance_uid = str(event.request.AffectedSOPInstanceUID)
        return self.received.receive(Path(event.dataset_path), sop_instance_uid, event.assoc.requestor.ae_title)
