"""The DIMSE listener: a pynetdicom C-STORE SCP with C-ECHO, started with the server when MEDZERO_DICOM_PORT is set.

Each received instance goes through the same `IngestService.receive` as STOW-RS (checked, routed, written to the
durable inbox) before the store is answered, so a Success status means the instance survives a crash. What the
listener accepts:

- calling AE titles: MEDZERO_DICOM_ALLOWED_AE_TITLES (any when empty); others are rejected at association;
- SOP classes: CR, DX (for presentation and for processing), secondary capture (single and multi-frame),
  ultrasound (single and multi-frame), ophthalmic photography (8 and 16 bit), VL photographic; others are refused
  at negotiation (the presentation context is rejected);
- transfer syntaxes: uncompressed (implicit / explicit little endian, big endian, deflated) and the compressed ones
  pydicom can decode here: JPEG baseline / extended / lossless, JPEG-LS, JPEG 2000, HTJ2K, RLE.

pynetdicom holds a whole data set in memory before the handler sees it (a store over MEDZERO_MAX_UPLOAD_BYTES is
then refused); at most MAX_ASSOCIATIONS associations are served at once, which bounds that memory.

A store that cannot be used is answered with a failure status and a reason (ErrorComment), never a dropped
association; the handler catches everything, so the listener keeps serving (pynetdicom's own pattern: the
handler's return value is the status, see pynetdicom/service_class.py).
"""
import logging
from collections.abc import Iterable

from pydicom.dataset import Dataset
from pydicom.uid import (
    HTJ2K,
    JPEG2000,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pynetdicom import AE, evt
from pynetdicom import sop_class as sop
from pynetdicom.events import Event
from pynetdicom.transport import ThreadedAssociationServer

from app import metrics
from app.errors import MedzeroError, PayloadTooLarge, UnsupportedDicom
from app.services.ingest import SUPPORTED_SOP_CLASSES, IngestService, decodable

log = logging.getLogger(__name__)

UNCOMPRESSED = (ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian)
COMPRESSED = (JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLossless, JPEGLosslessSV1, JPEGLSLossless, JPEGLSNearLossless,
              JPEG2000Lossless, JPEG2000, HTJ2KLossless, HTJ2KLosslessRPCL, HTJ2K, RLELossless)

# C-STORE statuses (PS3.4 Annex B.2.3) and the ErrorComment's VR limit
SUCCESS, OUT_OF_RESOURCES, DOES_NOT_MATCH_SOP_CLASS, CANNOT_UNDERSTAND = 0x0000, 0xA700, 0xA900, 0xC000
ERROR_COMMENT_CHARS = 64
MAX_ASSOCIATIONS = 8


class StoreSCP:
    def __init__(self, ingest: IngestService, *, ae_title: str, allowed_ae_titles: Iterable[str],
                 timeout_seconds: float, max_instance_bytes: int) -> None:
        self._ingest = ingest
        self._max_instance_bytes = max_instance_bytes
        self._server: ThreadedAssociationServer | None = None
        self.ae = AE(ae_title=ae_title)
        self.ae.require_calling_aet = list(allowed_ae_titles)
        self.ae.maximum_associations = MAX_ASSOCIATIONS
        self.ae.network_timeout = self.ae.acse_timeout = self.ae.dimse_timeout = timeout_seconds
        transfer_syntaxes = [uid for uid in UNCOMPRESSED + COMPRESSED if decodable(uid)]   # what pydicom reads here
        for sop_class in SUPPORTED_SOP_CLASSES:
            self.ae.add_supported_context(sop_class, transfer_syntaxes)
        self.ae.add_supported_context(sop.Verification, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])

    @property
    def port(self) -> int | None:
        """The bound port (the real one when 0 was asked for), or None when not listening."""
        return self._server.server_address[1] if self._server else None

    def start(self, host: str, port: int) -> None:
        handlers = [(evt.EVT_C_STORE, self.handle_store), (evt.EVT_C_ECHO, self.handle_echo)]
        try:
            self._server = self.ae.start_server((host, port), block=False, evt_handlers=handlers)
        except OSError as exc:
            raise MedzeroError(f"cannot listen for DICOM on {host}:{port}: {exc.strerror or exc}") from exc
        callers = ", ".join(self.ae.require_calling_aet) or "any calling AE title"
        log.info("DICOM SCP %s listening on %s:%d (C-STORE, C-ECHO; accepting %s)", self.ae.ae_title, host,
                 self.port, callers)

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None
        self.ae.shutdown()

    def handle_echo(self, event: Event) -> int:
        return SUCCESS

    def handle_store(self, event: Event) -> int | Dataset:
        calling = event.assoc.requestor.ae_title.strip()
        try:
            dataset = event.dataset
            if str(dataset.get("SOPClassUID", "")) != event.context.abstract_syntax:
                metrics.DICOM_RECEIVED.labels(source="c-store", outcome="refused").inc()
                return failure(DOES_NOT_MATCH_SOP_CLASS, "SOP Class UID differs from the presentation context's")
            data = event.encoded_dataset(include_meta=True)
            if len(data) > self._max_instance_bytes:
                raise PayloadTooLarge(f"instance over {self._max_instance_bytes} bytes")
            self._ingest.receive(data, source=f"c-store:{calling}")
        except UnsupportedDicom as exc:
            return failure(CANNOT_UNDERSTAND, str(exc))
        except MedzeroError as exc:   # too large, or the store busy: the sender may try again later
            metrics.DICOM_RECEIVED.labels(source="c-store", outcome="refused").inc()
            return failure(OUT_OF_RESOURCES, str(exc))
        except Exception as exc:  # noqa: BLE001 -- a data set pydicom cannot parse, or worse: never the listener
            log.warning("C-STORE from %s could not be read (%s)", calling, type(exc).__name__)
            metrics.DICOM_RECEIVED.labels(source="c-store", outcome="refused").inc()
            return failure(CANNOT_UNDERSTAND, f"the data set cannot be read ({type(exc).__name__})")
        return SUCCESS


def failure(status: int, reason: str) -> Dataset:
    answer = Dataset()
    answer.Status = status
    answer.ErrorComment = reason[:ERROR_COMMENT_CHARS]
    return answer
