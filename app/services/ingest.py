"""DICOM ingestion: a received instance is checked, routed and written to the durable inbox before the sender is
answered; a worker task classifies queued instances through the /classify path and stores one result each.

What is refused at receipt (the sender gets a failure status with the reason): bytes that are not DICOM, an
instance without its Study / Series / SOP Instance or SOP Class UID, one without pixel data. Everything else is
acknowledged: routed (label set + method) and queued, or recorded as skipped with the routing reason. Reasons and
logs carry codes and UIDs, never patient data.
"""
import asyncio
import io
import logging
from dataclasses import dataclass

import pydicom
from pydicom.errors import InvalidDicomError

from app.dicom.routing import RoutingTable, Skip
from app.errors import MedzeroError, UnsupportedDicom, WrongStudy
from app.services.classify import UNCERTAIN, Classification, Classifier
from app.services.uploads import UploadedFile
from app.storage.inbox import InboxEntry, InboxRepository, Received

log = logging.getLogger(__name__)
REQUIRED_UIDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID")


@dataclass(frozen=True)
class Receipt:
    entry: InboxEntry
    new: bool                          # False: this SOP Instance UID was received before (not queued again)


class IngestService:
    def __init__(self, inbox: InboxRepository, routes: RoutingTable, classifier: Classifier, *,
                 lease_seconds: float = 300.0, max_attempts: int = 3, idle_seconds: float = 0.5) -> None:
        self._inbox = inbox
        self._routes = routes
        self._classifier = classifier
        self._lease_seconds = lease_seconds
        self._max_attempts = max_attempts
        self._idle_seconds = idle_seconds
        self._wake = asyncio.Event()

    def receive(self, data: bytes, source: str, study: str | None = None) -> Receipt:
        """Check, route and queue one Part 10 instance (durable on return); UnsupportedDicom (or WrongStudy when
        `study` is given and the instance belongs to another) says why not, with `.uids` where they are known."""
        try:
            dataset = pydicom.dcmread(io.BytesIO(data))
        except (InvalidDicomError, EOFError, ValueError, TypeError, OSError, KeyError) as exc:
            raise UnsupportedDicom(f"not a readable DICOM Part 10 instance ({type(exc).__name__})") from exc
        missing = [keyword for keyword in REQUIRED_UIDS if not str(dataset.get(keyword, "") or "")]
        if missing:
            raise UnsupportedDicom(f"the instance has no {', '.join(missing)}")
        uids = (str(dataset.SOPClassUID), str(dataset.SOPInstanceUID))
        if "PixelData" not in dataset:
            raise _with_uids(UnsupportedDicom(f"instance {uids[1]} has no pixel data"), uids)
        if study is not None and str(dataset.StudyInstanceUID) != study:
            raise _with_uids(WrongStudy(f"instance {uids[1]} belongs to study {dataset.StudyInstanceUID}, "
                                        f"not {study}"), uids)
        route = self._routes.route(dataset)
        skipped = isinstance(route, Skip)
        entry, new = self._inbox.put(Received(
            sop_instance_uid=str(dataset.SOPInstanceUID), study_instance_uid=str(dataset.StudyInstanceUID),
            series_instance_uid=str(dataset.SeriesInstanceUID), sop_class_uid=str(dataset.SOPClassUID),
            source=source, dicom=data, label_set=None if skipped else route.label_set,
            method=None if skipped else route.method, skip_reason=route.reason if skipped else None))
        log.info("received %s from %s: %s", entry.sop_instance_uid, source,
                 f"skipped ({entry.reason})" if entry.state == "skipped" else entry.state)
        self._wake.set()
        return Receipt(entry, new)

    async def run(self) -> None:
        """The worker: classify queued instances until cancelled; leases a previous process held are released
        first, so what it acknowledged and did not finish is classified now."""
        released = self._inbox.release_leases()
        if released:
            log.info("inbox: %d instances a previous process was classifying are queued again", released)
        while True:
            if not await self.process_one():
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
            log.warning("classifying %s failed (%s)%s", entry.sop_instance_uid, exc.code,
                        "; queued again" if retry else "")
            return True
        await asyncio.to_thread(self._inbox.complete, entry, label_set_version=outcome.label_set_version,
                                model_id=outcome.model_id, classification=classification_record(outcome))
        return True


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
