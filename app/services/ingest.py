"""DICOM ingestion: a received instance is checked, routed and written to the durable inbox before the sender is
answered; a worker task classifies queued instances through the /classify path and stores one result each.

What is refused at receipt (the sender gets a failure status with the reason): bytes that are not DICOM, an
instance without its Study / Series / SOP Instance or SOP Class UID, one without pixel data, pixel data in a
transfer syntax no installed decoder reads. Everything else is acknowledged: routed (label set + method) and
queued, or recorded as skipped with the routing reason. A classified instance's result is written together with
its pending deliveries (the SR, the webhook), which the delivery worker sends. Reasons and logs carry codes and
UIDs, never patient data.
"""
import asyncio
import io
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.pixels.decoders.base import get_decoder
from pydicom.pixels.utils import get_expected_length
from pydicom.uid import UID
from pynetdicom import sop_class as sop

from app import metrics
from app.dicom.routing import Skip
from app.errors import MedzeroError, UnsupportedDicom, UnsupportedSOPClass, WrongStudy
from app.services.classify import UNCERTAIN, Classification, Classifier
from app.services.routing import RoutingService
from app.services.uploads import UploadedFile
from app.storage.inbox import InboxEntry, InboxRepository, Received

log = logging.getLogger(__name__)
# the 2-D image storage classes the classifiers are for; the SCP negotiates exactly these
SUPPORTED_SOP_CLASSES: tuple[UID, ...] = (
    sop.ComputedRadiographyImageStorage,
    sop.DigitalXRayImageStorageForPresentation,
    sop.DigitalXRayImageStorageForProcessing,
    sop.SecondaryCaptureImageStorage,
    sop.MultiFrameGrayscaleByteSecondaryCaptureImageStorage,
    sop.MultiFrameGrayscaleWordSecondaryCaptureImageStorage,
    sop.MultiFrameTrueColorSecondaryCaptureImageStorage,
    sop.UltrasoundImageStorage,
    sop.UltrasoundMultiFrameImageStorage,
    sop.OphthalmicPhotography8BitImageStorage,
    sop.OphthalmicPhotography16BitImageStorage,
    sop.VLPhotographicImageStorage,
)
REQUIRED_UIDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID")


@dataclass(frozen=True)
class Receipt:
    entry: InboxEntry
    new: bool                          # False: this SOP Instance UID was received before (not queued again)


class IngestService:
    def __init__(self, inbox: InboxRepository, routing: RoutingService, classifier: Classifier, *,
                 deliveries: Sequence[tuple[str, str]] = (), on_result: Callable[[], None] = lambda: None,
                 lease_seconds: float = 300.0, max_attempts: int = 3, workers: int = 4,
                 idle_seconds: float = 0.5) -> None:
        self._inbox = inbox
        self._routing = routing
        self._classifier = classifier
        self._deliveries = tuple(deliveries)          # (target, destination) each result is sent to
        self._on_result = on_result
        self._lease_seconds = lease_seconds
        self._max_attempts = max_attempts
        self._workers = workers
        self._idle_seconds = idle_seconds
        self._wake = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None

    def receive(self, data: bytes, source: str, study: str | None = None) -> Receipt:
        """Check, route and queue one Part 10 instance (durable on return); UnsupportedDicom (or WrongStudy when
        `study` is given and the instance belongs to another) says why not, with `.uids` where they are known.
        Called from any thread (the STOW-RS thread pool, the SCP's association threads)."""
        path = source.split(":", 1)[0]                # stow-rs | c-store (the calling AE title is not a label)
        try:
            receipt = self._receive(data, source, study)
        except MedzeroError as exc:
            if exc.status_code < 500:
                metrics.DICOM_RECEIVED.labels(source=path, outcome="refused").inc()
            raise
        outcome = "duplicate" if not receipt.new else "skipped" if receipt.entry.state == "skipped" else "queued"
        metrics.DICOM_RECEIVED.labels(source=path, outcome=outcome).inc()
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._wake.set)
        return receipt

    def _receive(self, data: bytes, source: str, study: str | None) -> Receipt:
        try:
            dataset = pydicom.dcmread(io.BytesIO(data))
        except (InvalidDicomError, EOFError, ValueError, TypeError, OSError, KeyError) as exc:
            raise UnsupportedDicom(f"not a readable DICOM Part 10 instance ({type(exc).__name__})") from exc
        missing = [keyword for keyword in REQUIRED_UIDS if not str(dataset.get(keyword, "") or "")]
        if missing:
            raise UnsupportedDicom(f"the instance has no {', '.join(missing)}")
        uids = (str(dataset.SOPClassUID), str(dataset.SOPInstanceUID))
        if uids[0] not in SUPPORTED_SOP_CLASSES:
            raise _with_uids(UnsupportedSOPClass(f"SOP class {UID(uids[0]).name or uids[0]} is not one medzero "
                                                 f"classifies (instance {uids[1]})"), uids)
        if "PixelData" not in dataset:
            raise _with_uids(UnsupportedDicom(f"no pixel data (instance {uids[1]})"), uids)
        transfer_syntax = UID(str(dataset.file_meta.get("TransferSyntaxUID", "") or ""))
        if not decodable(transfer_syntax):
            raise _with_uids(UnsupportedDicom(f"transfer syntax {transfer_syntax.name or 'none'} cannot be decoded "
                                              f"here (instance {uids[1]})"), uids)
        if study is not None and str(dataset.StudyInstanceUID) != study:
            raise _with_uids(WrongStudy(f"instance {uids[1]} belongs to study {dataset.StudyInstanceUID}, "
                                        f"not {study}"), uids)
        if not transfer_syntax.is_encapsulated:
            expected = _expected_pixel_bytes(dataset)
            if expected is None or len(dataset.PixelData) < expected:
                size = f"{len(dataset.PixelData)} of {expected} bytes" if expected else "incomplete image module"
                raise _with_uids(UnsupportedDicom(f"truncated pixel data: {size} (instance {uids[1]})"), uids)
        route = self._routing.table.route(dataset)
        skipped = isinstance(route, Skip)
        entry, new = self._inbox.put(Received(
            sop_instance_uid=str(dataset.SOPInstanceUID), study_instance_uid=str(dataset.StudyInstanceUID),
            series_instance_uid=str(dataset.SeriesInstanceUID), sop_class_uid=str(dataset.SOPClassUID),
            source=source, dicom=data, label_set=None if skipped else route.label_set,
            method=None if skipped else route.method, skip_reason=route.reason if skipped else None))
        log.info("received %s from %s: %s", entry.sop_instance_uid, source,
                 f"skipped ({entry.reason})" if entry.state == "skipped" else entry.state)
        return Receipt(entry, new)

    async def run(self) -> None:
        """The workers: classify queued instances until cancelled, `workers` at a time (their decodes overlap and
        their forwards share micro-batches); leases a previous process held are released first, so what it
        acknowledged and did not finish is classified now."""
        self._loop = asyncio.get_running_loop()
        released = self._inbox.release_leases()
        if released:
            log.info("inbox: %d instances a previous process was classifying are queued again", released)
        await asyncio.gather(*(self._work() for _ in range(self._workers)))

    async def _work(self) -> None:
        while True:
            metrics.INGEST_QUEUE.set(await asyncio.to_thread(self._inbox.waiting))
            if not await self.process_one():
                await asyncio.to_thread(self._routing.refresh)   # a table another replica stored
                self._wake.clear()
                try:
                    async with asyncio.timeout(self._idle_seconds):
                        await self._wake.wait()
                except TimeoutError:
                    pass

    async def process_one(self) -> bool:
        """Classify the oldest queued instance; False when the queue is empty."""
        claimed = await asyncio.to_thread(self._inbox.claim, self._lease_seconds)
        if claimed is None:
            return False
        entry, data = claimed

        async def read() -> bytes:
            return data

        try:
            outcome = await self._classifier.classify(UploadedFile(entry.sop_instance_uid, read),
                                                      label_set=entry.label_set, method=entry.method, top_k=None)
        except MedzeroError as exc:
            retry = exc.status_code == 503 and entry.attempts < self._max_attempts   # busy: later; bad: never
            await asyncio.to_thread(self._inbox.fail, entry, f"{exc.code}: {exc}", retry=retry)
            metrics.DICOM_CLASSIFIED.labels(outcome="retry" if retry else "failed").inc()
            log.warning("classifying %s failed (%s)%s", entry.sop_instance_uid, exc.code,
                        "; queued again" if retry else "")
            return True
        result = await asyncio.to_thread(self._inbox.complete, entry, label_set_version=outcome.label_set_version,
                                         model_id=outcome.model_id, classification=classification_record(outcome),
                                         deliveries=self._deliveries)
        if result is not None:
            metrics.DICOM_CLASSIFIED.labels(outcome="done").inc()
            if self._deliveries:
                self._on_result()
        return True


def decodable(transfer_syntax: UID) -> bool:
    try:
        return bool(transfer_syntax) and get_decoder(transfer_syntax).is_available
    except NotImplementedError:
        return False


def _expected_pixel_bytes(dataset: pydicom.Dataset) -> int | None:
    """What uncompressed pixel data must hold for the image module; None when that module is incomplete."""
    try:
        return get_expected_length(dataset, unit="bytes")
    except (AttributeError, KeyError, TypeError, ValueError):
        return None


def _with_uids(error: MedzeroError, uids: tuple[str, str]) -> MedzeroError:
    error.uids = uids               # the STOW-RS response names the refused instance
    return error


def classification_record(outcome: Classification) -> dict:
    """What a result stores of a classification: the decision, the ranked predictions, calibration and set."""
    calibration = outcome.calibration
    return {"decision": outcome.decision.label or UNCERTAIN, "abstained": outcome.decision.label is None,
            "decision_rule": outcome.decision.rule,
            "predictions": [{"label": p.label, "probability": p.probability, "similarity": p.similarity}
                            for p in outcome.predictions],
            "calibrated": calibration is not None,
            "temperature": calibration.temperature if calibration else None,
            "prediction_set": outcome.prediction_set,
            "prediction_set_coverage": calibration.coverage if calibration else None}
