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
import logging
import time
import zlib
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
from app.errors import ImageTooLarge, InvalidImage, MedzeroError, UnsupportedDicom, UnsupportedSOPClass, WrongStudy
from app.imaging import read_part10
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
ERROR_PAUSE_SECONDS = 1.0           # after an unexpected error, before the worker tries again
MAX_RETRY_SECONDS = 300.0
ROUTES_CHECK_SECONDS = 1.0          # how often the workers look for a routing table another process stored           # the longest back-off between classification attempts
REQUIRED_UIDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID")


@dataclass(frozen=True)
class Receipt:
    entry: InboxEntry
    new: bool                          # False: this SOP Instance UID was received before (not queued again)


class IngestService:
    def __init__(self, inbox: InboxRepository, routing: RoutingService, classifier: Classifier, *,
                 deliveries: Sequence[tuple[str, str]] = (), on_result: Callable[[], None] = lambda: None,
                 lease_seconds: float = 300.0, max_attempts: int = 8, retry_seconds: float = 1.0,
                 workers: int = 4, idle_seconds: float = 0.5, max_pixels: int = 64 * 2**20) -> None:
        self._inbox = inbox
        self._max_pixels = max_pixels                 # MEDZERO_MAX_IMAGE_PIXELS: bounds a deflated data set too
        self._routing = routing
        self._classifier = classifier
        self._deliveries = tuple(deliveries)          # (target, destination) each result is sent to
        self._on_result = on_result
        self._lease_seconds = lease_seconds
        self._max_attempts = max_attempts
        self._retry_seconds = retry_seconds
        self._workers = workers
        self._idle_seconds = idle_seconds
        self._wake = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._routes_checked = time.monotonic()

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
            dataset = self._checked(data, study)
            route = self._routing.current().route(dataset)
        except MedzeroError:
            raise
        except Exception as exc:   # whatever a malformed data set makes pydicom raise (zlib, struct, a bad VR)
            raise UnsupportedDicom(f"not a readable DICOM instance ({type(exc).__name__})") from exc
        skipped = isinstance(route, Skip)
        entry, new = self._inbox.put(Received(
            sop_instance_uid=str(dataset.SOPInstanceUID), study_instance_uid=str(dataset.StudyInstanceUID),
            series_instance_uid=str(dataset.SeriesInstanceUID), sop_class_uid=str(dataset.SOPClassUID),
            source=source, dicom=data, label_set=None if skipped else route.label_set,
            method=None if skipped else route.method, skip_reason=route.reason if skipped else None))
        log.info("received %s from %s: %s", entry.sop_instance_uid, source,
                 f"skipped ({entry.reason})" if entry.state == "skipped" else entry.state)
        return Receipt(entry, new)

    def _checked(self, data: bytes, study: str | None) -> pydicom.Dataset:
        """The parsed instance, or UnsupportedDicom saying why it cannot be used."""
        try:
            dataset = read_part10(data, max_pixels=self._max_pixels)
        except (InvalidDicomError, EOFError, ValueError, TypeError, OSError, KeyError, zlib.error) as exc:
            raise UnsupportedDicom(f"not a readable DICOM Part 10 instance ({type(exc).__name__})") from exc
        except (ImageTooLarge, InvalidImage) as exc:    # a deflated data set: a bomb, or cut short
            raise UnsupportedDicom(f"not a usable DICOM Part 10 instance: {exc.message}") from exc
        missing = [keyword for keyword in REQUIRED_UIDS if not str(dataset.get(keyword, "") or "")]
        if missing:
            raise UnsupportedDicom(f"the instance has no {', '.join(missing)}")
        invalid = [keyword for keyword in REQUIRED_UIDS if not UID(str(dataset.get(keyword))).is_valid]
        if invalid:   # UIDs become URL paths (STOW-RS of the SR) and 64-character columns
            raise UnsupportedDicom(f"the instance's {', '.join(invalid)} is not a valid UID")
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
        return dataset

    async def run(self) -> None:
        """The workers: classify queued instances until cancelled, `workers` at a time (their decodes overlap and
        their forwards share micro-batches); leases a previous process held are released first, so what it
        acknowledged and did not finish is classified now."""
        self._loop = asyncio.get_running_loop()
        released = await patiently("inbox worker", self._inbox.release_leases)
        if released:
            log.info("inbox: %d instances a previous process was classifying are queued again", released)
        await asyncio.gather(*(self._work() for _ in range(self._workers)))

    async def _work(self) -> None:
        while True:
            self._wake.clear()       # before looking: an instance received while we look wakes the wait below
            if not await patiently("inbox worker", self._step, in_thread=False):
                try:
                    async with asyncio.timeout(self._idle_seconds):
                        await self._wake.wait()
                except TimeoutError:
                    pass

    async def _step(self) -> bool:
        """One instance classified (True), or none waiting (False); the queue-depth gauge and, once a second,
        a routing table another replica stored, along the way."""
        metrics.INGEST_QUEUE.set(await asyncio.to_thread(self._inbox.waiting))
        if time.monotonic() - self._routes_checked > ROUTES_CHECK_SECONDS:
            self._routes_checked = time.monotonic()
            await asyncio.to_thread(self._routing.refresh)
        return await self.process_one()

    async def process_one(self) -> bool:
        """Classify the oldest queued instance; False when the queue is empty."""
        claimed = await asyncio.to_thread(self._inbox.claim, self._lease_seconds, self._max_attempts)
        if claimed is None:
            return False
        entry, data = claimed

        async def read() -> bytes:
            return data

        try:
            outcome = await self._classifier.classify(UploadedFile(entry.sop_instance_uid, read),
                                                      label_set=entry.label_set, method=entry.method, top_k=None)
        except MedzeroError as exc:   # busy (503): later, with back-off; an unusable instance: never
            await self._failed(entry, f"{exc.code}: {exc}", transient=exc.status_code == 503)
            return True
        except Exception as exc:      # unforeseen (a bug, out of memory): tried again, then failed for good
            log.exception("classifying %s failed unexpectedly", entry.sop_instance_uid)
            await self._failed(entry, f"internal: {type(exc).__name__}", transient=True)
            return True
        result = await asyncio.to_thread(self._inbox.complete, entry, label_set_version=outcome.label_set_version,
                                         model_id=outcome.model_id, classification=classification_record(outcome),
                                         deliveries=self._deliveries)
        if result is not None:
            metrics.DICOM_CLASSIFIED.labels(outcome="done").inc()
            if self._deliveries:
                self._on_result()
        return True

    async def _failed(self, entry: InboxEntry, reason: str, *, transient: bool) -> None:
        retry = transient and entry.attempts < self._max_attempts
        retry_in = min(self._retry_seconds * 2 ** (entry.attempts - 1), MAX_RETRY_SECONDS) if retry else None
        await asyncio.to_thread(self._inbox.fail, entry, reason, retry_in_seconds=retry_in)
        metrics.DICOM_CLASSIFIED.labels(outcome="retry" if retry else "failed").inc()
        log.warning("classifying %s failed (%s)%s", entry.sop_instance_uid, reason.split(":", 1)[0],
                    f"; again in {retry_in:.1f} s" if retry else "")


async def patiently(worker: str, step: Callable, *args, in_thread: bool = True):
    """`step(*args)` (in a thread, or awaited), tried again after a pause whatever it raises: a worker must outlive
    a database that is busy past its timeout, or gone for a while, and its own bugs."""
    while True:
        try:
            return await (asyncio.to_thread(step, *args) if in_thread else step(*args))
        except MedzeroError as exc:
            log.warning("%s: %s; going on in %.1f s", worker, exc, ERROR_PAUSE_SECONDS)
        except Exception:
            log.exception("%s: unexpected error; going on in %.1f s", worker, ERROR_PAUSE_SECONDS)
        await asyncio.sleep(ERROR_PAUSE_SECONDS)


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
