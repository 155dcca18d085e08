"""The durable DICOM work queue and its results.

An instance is written here (one transaction) before the sender gets its success status, so an acknowledged
instance survives a crash. Workers lease the oldest queued instance; a lease that runs out -- the worker died, the
process was killed -- puts it back. Finishing writes the result and the `done` state in one transaction, and
results are unique per instance, so every instance is classified exactly once however often the server dies.
"""
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import func, or_, select, update
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError

from app.storage.db import (
    LOCAL_OWNER,
    DeliveryRow,
    InboxRow,
    ResultRow,
    as_utc,
    session_factories,
    utcnow,
    write_transaction,
)
from app.storage.deliveries import PENDING, DeliveryRecord, delivery_record

QUEUED, PROCESSING, DONE, SKIPPED, FAILED = "queued", "processing", "done", "skipped", "failed"
STATES = (QUEUED, PROCESSING, DONE, SKIPPED, FAILED)


@dataclass(frozen=True)
class Received:
    """What a receiver hands the queue: the identifying UIDs, the bytes and, from routing, where it goes."""
    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    sop_class_uid: str
    source: str
    dicom: bytes
    label_set: str | None = None          # None with `skip_reason`: no routing rule matched
    method: str | None = None
    skip_reason: str | None = None


@dataclass(frozen=True)
class InboxEntry:
    id: int
    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    sop_class_uid: str
    source: str
    label_set: str | None
    method: str | None
    state: str
    reason: str | None
    attempts: int
    created_at: datetime


@dataclass(frozen=True)
class ResultRecord:
    id: int
    inbox_id: int
    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    label_set: str
    label_set_version: int
    method: str
    model_id: str
    classification: dict
    created_at: datetime
    deliveries: list[DeliveryRecord] = field(default_factory=list)

    def document(self) -> dict:
        """The result as JSON-ready fields: what /results shows (without deliveries) and the webhook sends."""
        return {"id": self.id, "study_instance_uid": self.study_instance_uid,
                "series_instance_uid": self.series_instance_uid, "sop_instance_uid": self.sop_instance_uid,
                "label_set": self.label_set, "label_set_version": self.label_set_version, "method": self.method,
                "model": self.model_id, "created_at": self.created_at.isoformat(), **self.classification}


class InboxRepository:
    def __init__(self, engine: Engine, *, owner: str = LOCAL_OWNER) -> None:
        """`owner`: this replica's stable name (MEDZERO_REPLICA_ID), written on the leases its workers take."""
        self._readers, self._writers = session_factories(engine)
        self.owner = owner

    def put(self, received: Received) -> tuple[InboxEntry, bool]:
        """Queue (or record as skipped) a received instance; (entry, False) when that SOP Instance UID is already
        here -- a re-send is acknowledged again, never classified twice. A re-send of an instance that failed for
        good is queued again (with the bytes just received): the sender is trying once more, and so do we."""
        now = utcnow()
        row = InboxRow(sop_instance_uid=received.sop_instance_uid, study_instance_uid=received.study_instance_uid,
                       series_instance_uid=received.series_instance_uid, sop_class_uid=received.sop_class_uid,
                       source=received.source, dicom=received.dicom, label_set=received.label_set,
                       method=received.method, state=SKIPPED if received.skip_reason else QUEUED,
                       reason=received.skip_reason, attempts=0, created_at=now, updated_at=now)
        try:
            with write_transaction(self._writers) as session:
                session.add(row)
        except IntegrityError:
            return self._requeue_failed(received), False
        return _entry(row), True

    def _requeue_failed(self, received: Received) -> InboxEntry:
        with write_transaction(self._writers) as session:
            row = session.scalar(select(InboxRow).where(InboxRow.sop_instance_uid == received.sop_instance_uid)
                                 .with_for_update())
            if row.state == FAILED:
                row.state, row.attempts, row.reason, row.lease_until = QUEUED, 0, None, None
                row.dicom, row.source, row.updated_at = received.dicom, received.source, utcnow()
                row.label_set, row.method = received.label_set, received.method
                if received.skip_reason:
                    row.state, row.reason = SKIPPED, received.skip_reason
            return _entry(row)

    def entry_for(self, sop_instance_uid: str) -> InboxEntry | None:
        with self._readers() as session:
            row = session.scalar(select(InboxRow).where(InboxRow.sop_instance_uid == sop_instance_uid))
            return _entry(row) if row else None

    def claim(self, lease_seconds: float, max_attempts: int) -> tuple[InboxEntry, bytes] | None:
        """Lease the oldest waiting instance (queued and due, or processing under a lease that ran out) to the
        caller. One already tried `max_attempts` times (its worker died on it each time: a crash, an OOM kill) fails
        for good instead of being tried forever."""
        now = utcnow()
        with write_transaction(self._writers) as session:
            while True:
                row = session.scalar(
                    select(InboxRow).where(or_((InboxRow.state == QUEUED)
                                               & (InboxRow.lease_until.is_(None) | (InboxRow.lease_until <= now)),
                                               (InboxRow.state == PROCESSING) & (InboxRow.lease_until < now)))
                    .order_by(InboxRow.id).limit(1).with_for_update(skip_locked=True))
                if row is None:
                    return None
                if row.state == PROCESSING and row.attempts >= max_attempts:
                    row.state, row.lease_until, row.updated_at = FAILED, None, now
                    row.reason = f"gave up after {row.attempts} attempts that did not finish (the worker stopped)"
                    continue
                row.state, row.attempts, row.lease_owner = PROCESSING, row.attempts + 1, self.owner
                row.lease_until, row.updated_at = now + timedelta(seconds=lease_seconds), now
                return _entry(row), row.dicom

    def complete(self, entry: InboxEntry, *, label_set_version: int, model_id: str, classification: dict,
                 deliveries: Sequence[tuple[str, str]] = ()) -> ResultRecord | None:
        """Store the result, its pending deliveries ((target, destination) pairs) and the instance's `done`, in one
        transaction; None when it is done already (another worker finished it after this one's lease ran out):
        the first result stands."""
        now = utcnow()
        result = ResultRow(inbox_id=entry.id, study_instance_uid=entry.study_instance_uid,
                           series_instance_uid=entry.series_instance_uid, sop_instance_uid=entry.sop_instance_uid,
                           label_set=entry.label_set, label_set_version=label_set_version, method=entry.method,
                           model_id=model_id, classification=classification, created_at=now)
        try:
            with write_transaction(self._writers) as session:
                session.add(result)
                session.flush()
                rows = [DeliveryRow(result_id=result.id, target=target, destination=destination, state=PENDING,
                                    attempts=0, due_at=now) for target, destination in deliveries]
                session.add_all(rows)
                session.execute(update(InboxRow).where(InboxRow.id == entry.id)
                                .values(state=DONE, reason=None, lease_until=None, lease_owner=None, updated_at=now))
        except IntegrityError:
            return None
        return _result(result, [delivery_record(row) for row in rows])

    def fail(self, entry: InboxEntry, reason: str, *, retry_in_seconds: float | None) -> bool:
        """A classification that did not work: queued again after `retry_in_seconds`, or (None) failed for good,
        with the reason. Only while the caller's lease is still its own (same attempt): False when another worker
        took the instance over meanwhile, whose outcome then stands."""
        values = ({"state": FAILED, "lease_until": None} if retry_in_seconds is None else
                  {"state": QUEUED, "lease_until": utcnow() + timedelta(seconds=retry_in_seconds)})
        values["lease_owner"] = None
        with write_transaction(self._writers) as session:
            return session.execute(update(InboxRow).where(InboxRow.id == entry.id, InboxRow.state == PROCESSING,
                                                          InboxRow.attempts == entry.attempts)
                                   .values(reason=reason[:1000], updated_at=utcnow(), **values)).rowcount == 1

    def release_leases(self) -> int:
        """At start-up: what this replica's previous process was classifying goes back in the queue now (not
        after its lease). Other replicas' leases are theirs: they come back only when they run out. Leases from
        before owners were recorded (NULL) are a dead single process's."""
        with write_transaction(self._writers) as session:
            return session.execute(update(InboxRow).where(InboxRow.state == PROCESSING, _owned_by(self.owner))
                                   .values(state=QUEUED, lease_until=None, lease_owner=None,
                                           updated_at=utcnow())).rowcount

    def entries(self, *, study_instance_uid: str | None = None, state: str | None = None,
                limit: int = 100) -> list[InboxEntry]:
        """Received instances, newest first (skipped and failed ones say why)."""
        query = select(InboxRow).order_by(InboxRow.id.desc()).limit(limit)
        if study_instance_uid is not None:
            query = query.where(InboxRow.study_instance_uid == study_instance_uid)
        if state is not None:
            query = query.where(InboxRow.state == state)
        with self._readers() as session:
            return [_entry(row) for row in session.scalars(query)]

    def source_dicom(self, inbox_id: int) -> bytes | None:
        """The Part 10 bytes an instance arrived as (the SR copies its patient and study from them)."""
        with self._readers() as session:
            return session.scalar(select(InboxRow.dicom).where(InboxRow.id == inbox_id))

    def waiting(self) -> int:
        with self._readers() as session:
            return session.scalar(select(func.count()).select_from(InboxRow)
                                  .where(InboxRow.state.in_((QUEUED, PROCESSING))))

    def results(self, *, study_instance_uid: str | None = None, limit: int = 100) -> list[ResultRecord]:
        query = select(ResultRow).order_by(ResultRow.id.desc()).limit(limit)
        if study_instance_uid is not None:
            query = query.where(ResultRow.study_instance_uid == study_instance_uid)
        with self._readers() as session:
            rows = list(session.scalars(query))
            return [_result(row, deliveries) for row, deliveries in zip(rows, _deliveries_of(session, rows))]

    def result(self, result_id: int) -> ResultRecord | None:
        with self._readers() as session:
            row = session.get(ResultRow, result_id)
            return _result(row, _deliveries_of(session, [row])[0]) if row else None


def _owned_by(owner: str):
    return or_(InboxRow.lease_owner == owner, InboxRow.lease_owner.is_(None))


def _entry(row: InboxRow) -> InboxEntry:
    return InboxEntry(row.id, row.sop_instance_uid, row.study_instance_uid, row.series_instance_uid,
                      row.sop_class_uid, row.source, row.label_set, row.method, row.state, row.reason, row.attempts,
                      as_utc(row.created_at))


def _deliveries_of(session, rows: list[ResultRow]) -> list[list[DeliveryRecord]]:
    ids = [row.id for row in rows]
    found: dict[int, list[DeliveryRecord]] = {result_id: [] for result_id in ids}
    if ids:
        for row in session.scalars(select(DeliveryRow).where(DeliveryRow.result_id.in_(ids)).order_by(DeliveryRow.id)):
            found[row.result_id].append(delivery_record(row))
    return [found[result_id] for result_id in ids]


def _result(row: ResultRow, deliveries: list[DeliveryRecord]) -> ResultRecord:
    return ResultRecord(row.id, row.inbox_id, row.study_instance_uid, row.series_instance_uid, row.sop_instance_uid,
                        row.label_set, row.label_set_version, row.method, row.model_id, dict(row.classification),
                        as_utc(row.created_at), deliveries)
