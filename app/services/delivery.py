"""Sending results back: each classified DICOM instance's result as an AI Results SR into the same study (by
C-STORE to MEDZERO_SR_DESTINATION and/or STOW-RS to MEDZERO_SR_STOW_URL) and, optionally, as JSON to
MEDZERO_RESULT_WEBHOOK_URL.

The worker leases due deliveries from the database one at a time, so a crash mid-send only repeats that send
(the SR has the same SOP Instance UID every time, so the PACS keeps one copy). A failed attempt is due again after
MEDZERO_DELIVERY_RETRY_SECONDS, doubled per attempt (at most an hour); after MEDZERO_DELIVERY_MAX_ATTEMPTS it is a
dead letter, shown in /results and in medzero_result_dead_letters, until POST /results/{id}/retry.
"""
import asyncio
import logging
from collections.abc import Callable
from datetime import datetime

import httpx
from pydicom.dataset import Dataset

from app import metrics
from app.dicom.send import AEAddress, read_source, redacted, send_cstore, send_stow
from app.dicom.sr import AIResult, ReportedClass, build_result_sr, result_sr_uids
from app.errors import DeliveryFailed, InvalidInput, ResultNotFound, UnsupportedDicom
from app.services.ingest import patiently
from app.settings import Settings
from app.storage.db import utcnow
from app.storage.deliveries import DeliveryRecord, DeliveryRepository
from app.storage.inbox import InboxRepository, ResultRecord

log = logging.getLogger(__name__)
MAX_BACKOFF_SECONDS = 3600.0
MIN_LEASE_SECONDS = 300.0          # a delivery's lease: at least this, and 4 network timeouts (connect, ACSE,
                                   # DIMSE and release may each take one), so a slow send keeps it


def delivery_targets(settings: Settings) -> list[tuple[str, str]]:
    """(target, destination) of every configured delivery, in the order they are made."""
    targets = []
    if settings.sr_destination:
        targets.append(("cstore", settings.sr_destination))
    if settings.sr_stow_url:
        targets.append(("stow", settings.sr_stow_url))
    if settings.result_webhook_url:
        targets.append(("webhook", settings.result_webhook_url))
    return targets


def backoff_seconds(first_seconds: float, attempts: int) -> float:
    return min(first_seconds * 2 ** max(attempts - 1, 0), MAX_BACKOFF_SECONDS)


def ai_result(record: ResultRecord, *, pretrained_weights: bool, software_version: str) -> AIResult:
    """What the SR reports of a stored result."""
    classification = record.classification
    in_set = set(classification["prediction_set"]) if classification.get("prediction_set") is not None else None
    classes = [ReportedClass(p["label"], float(p["probability"]),
                             None if in_set is None else p["label"] in in_set)
               for p in classification["predictions"]]
    return AIResult(classes=classes, decision=None if classification["abstained"] else classification["decision"],
                    label_set=record.label_set, label_set_version=record.label_set_version, method=record.method,
                    model_id=record.model_id, calibrated=bool(classification["calibrated"]),
                    pretrained_weights=pretrained_weights, software_version=software_version)


class DeliveryService:
    def __init__(self, deliveries: DeliveryRepository, inbox: InboxRepository, settings: Settings, *,
                 pretrained_weights: Callable[[], bool], software_version: str, idle_seconds: float = 5.0) -> None:
        self._deliveries = deliveries
        self._inbox = inbox
        self._settings = settings
        self._pretrained_weights = pretrained_weights
        self._software_version = software_version
        self._idle_seconds = idle_seconds
        self._lease_seconds = max(MIN_LEASE_SECONDS, 4 * settings.dicom_network_timeout_seconds)
        self._wake = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None

    def wake(self) -> None:
        """A new result has deliveries (callable from any thread)."""
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._wake.set)

    def retry(self, result_id: int) -> int:
        """A result's dead letters due again now; ResultNotFound for an unknown result."""
        if self._inbox.result(result_id) is None:
            raise ResultNotFound(f"no result {result_id}")
        count = self._deliveries.retry_dead_letters(result_id)
        self._refresh_dead_letters()
        self.wake()
        return count

    async def run(self) -> None:
        """MEDZERO_DELIVERY_WORKERS deliveries at a time, until cancelled; what a previous process was sending is
        due again first."""
        self._loop = asyncio.get_running_loop()
        released = await patiently("delivery worker", self._deliveries.release_leases)
        if released:
            log.info("deliveries: %d a previous process was sending are due again", released)
        await patiently("delivery worker", self._refresh_dead_letters)
        timeout = httpx.Timeout(self._settings.dicom_network_timeout_seconds)
        async with httpx.AsyncClient(timeout=timeout) as client:
            await asyncio.gather(*(self._work(client) for _ in range(self._settings.delivery_workers)))

    async def _work(self, client: httpx.AsyncClient) -> None:
        while True:
            self._wake.clear()       # before looking: a result stored while we look wakes the wait below
            if await patiently("delivery worker", self.deliver_one, client, in_thread=False):
                continue
            idle_seconds = await patiently("delivery worker", self._idle_for, in_thread=False)
            try:
                async with asyncio.timeout(idle_seconds):
                    await self._wake.wait()
            except TimeoutError:
                pass

    async def _idle_for(self) -> float:
        due: datetime | None = await asyncio.to_thread(self._deliveries.next_due)
        if due is None:
            return self._idle_seconds
        return min(max((due - utcnow()).total_seconds(), 0.05), self._idle_seconds)

    async def deliver_one(self, client: httpx.AsyncClient) -> bool:
        """Make the oldest due delivery; False when none is due."""
        delivery = await asyncio.to_thread(self._deliveries.claim, self._lease_seconds,
                                           self._settings.delivery_max_attempts)
        if delivery is None:
            return False
        try:
            sr_uid = await self._send(client, delivery)
        except DeliveryFailed as exc:                      # the peer said no, or could not be reached
            await asyncio.to_thread(self._failed, delivery, str(exc), permanent=False)
            return True
        except (InvalidInput, UnsupportedDicom) as exc:    # this result cannot be reported: no retry will help
            await asyncio.to_thread(self._failed, delivery, f"{exc.code}: {exc}", permanent=True)
            return True
        except Exception as exc:    # anything else (an odd URL, a library's surprise): retried, then a dead letter
            log.exception("result %d: %s delivery failed unexpectedly", delivery.result_id, delivery.target)
            await asyncio.to_thread(self._failed, delivery, f"internal: {type(exc).__name__}", permanent=False)
            return True
        if await asyncio.to_thread(self._deliveries.sent, delivery, sr_uid):
            metrics.DELIVERIES.labels(target=delivery.target, outcome="sent").inc()
            log.info("result %d: %s to %s sent", delivery.result_id, delivery.target, redacted(delivery.destination))
        return True

    def _failed(self, delivery: DeliveryRecord, error: str, *, permanent: bool) -> None:
        last = permanent or delivery.attempts >= self._settings.delivery_max_attempts
        retry_in = None if last else backoff_seconds(self._settings.delivery_retry_seconds, delivery.attempts)
        if not self._deliveries.failed(delivery, error, retry_in_seconds=retry_in):
            return                                         # another worker owns it now; its outcome stands
        metrics.DELIVERIES.labels(target=delivery.target, outcome="dead_letter" if last else "retry").inc()
        if last:
            self._refresh_dead_letters()
        log.warning("result %d: %s to %s failed (attempt %d): %s%s", delivery.result_id, delivery.target,
                    redacted(delivery.destination), delivery.attempts, error,
                    "; now a dead letter" if last else f"; again in {retry_in:.0f} s")

    def _refresh_dead_letters(self) -> None:
        for target, count in self._deliveries.dead_letters().items():
            metrics.DEAD_LETTERS.labels(target=target).set(count)

    async def _send(self, client: httpx.AsyncClient, delivery: DeliveryRecord) -> str | None:
        record = await asyncio.to_thread(self._inbox.result, delivery.result_id)
        if record is None:
            raise DeliveryFailed(f"result {delivery.result_id} is gone")
        if delivery.target == "webhook":
            await self._post_webhook(client, delivery.destination, record)
            return None
        report = await asyncio.to_thread(self.build_report, record)
        if delivery.target == "cstore":
            await asyncio.to_thread(send_cstore, report, AEAddress.parse(delivery.destination),
                                    calling_ae_title=self._settings.dicom_ae_title,
                                    timeout_seconds=self._settings.dicom_network_timeout_seconds)
        else:
            await send_stow(client, delivery.destination, report)
        return str(report.SOPInstanceUID)

    def build_report(self, record: ResultRecord) -> Dataset:
        """The AI Results SR of a stored result, with the same UIDs however often it is built."""
        data = self._inbox.source_dicom(record.inbox_id)
        if data is None:
            raise DeliveryFailed(f"the instance of result {record.id} is gone")
        series_uid, sop_uid = result_sr_uids(record.sop_instance_uid, record.study_instance_uid, record.label_set,
                                             record.label_set_version, record.method, record.model_id)
        result = ai_result(record, pretrained_weights=self._pretrained_weights(),
                           software_version=self._software_version)
        return build_result_sr(read_source(data), result, series_instance_uid=series_uid, sop_instance_uid=sop_uid,
                               institution_name=self._settings.institution_name)

    @staticmethod
    async def _post_webhook(client: httpx.AsyncClient, url: str, record: ResultRecord) -> None:
        try:
            response = await client.post(url, json={"event": "result", "result": record.document()})
        except httpx.HTTPError as exc:
            raise DeliveryFailed(f"webhook {redacted(url)} failed: {type(exc).__name__}") from exc
        if response.status_code >= 300:
            raise DeliveryFailed(f"webhook {redacted(url)} answered {response.status_code}")
