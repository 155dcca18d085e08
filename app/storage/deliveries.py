"""Result deliveries: each result is sent to each configured target (SR by C-STORE, SR by STOW-RS, webhook).

A delivery row is written with its result (one transaction, so no result is ever left unsent by a crash between
the two). The worker leases the oldest due row; an attempt that fails is due again after a back-off, and after
the last attempt the row is a dead letter, kept with its last error until an admin asks for a retry.
"""
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import func, or_, select, update
from sqlalchemy.engine import Engine

from app.storage.db import LOCAL_OWNER, DeliveryRow, as_utc, session_factories, utcnow, write_transaction

PENDING, SENDING, SENT, DEAD_LETTER = "pending", "sending", "sent", "dead_letter"
TARGETS = ("cstore", "stow", "webhook")


@dataclass(frozen=True)
class DeliveryRecord:
    id: int
    result_id: int
    target: str
    destination: str
    state: str
    attempts: int
    last_error: str | None
    due_at: datetime
    sent_at: datetime | None
    sr_sop_instance_uid: str | None


class DeliveryRepository:
    def __init__(self, engine: Engine, *, owner: str = LOCAL_OWNER) -> None:
        """`owner`: this replica's stable name (MEDZERO_REPLICA_ID), written on the leases its worker takes."""
        self._readers, self._writers = session_factories(engine)
        self.owner = owner

    def claim(self, lease_seconds: float, max_attempts: int) -> DeliveryRecord | None:
        """Lease the oldest due delivery (pending and due, or sending under a lease that ran out). One whose lease
        ran out after its last attempt (the worker died on it each time) becomes a dead letter instead."""
        now = utcnow()
        with write_transaction(self._writers) as session:
            while True:
                row = session.scalar(
                    select(DeliveryRow).where(or_(DeliveryRow.state == PENDING, DeliveryRow.state == SENDING),
                                              DeliveryRow.due_at <= now)
                    .order_by(DeliveryRow.due_at, DeliveryRow.id).limit(1).with_for_update(skip_locked=True))
                if row is None:
                    return None
                if row.state == SENDING and row.attempts >= max_attempts:
                    row.state = DEAD_LETTER
                    row.last_error = row.last_error or f"gave up after {row.attempts} attempts that did not finish"
                    continue
                row.state, row.attempts, row.lease_owner = SENDING, row.attempts + 1, self.owner
                row.due_at = now + timedelta(seconds=lease_seconds)
                return delivery_record(row)

    def sent(self, delivery: DeliveryRecord, sr_sop_instance_uid: str | None = None) -> bool:
        """False when the lease was no longer the caller's (another worker took the delivery over)."""
        with write_transaction(self._writers) as session:
            return session.execute(_leased(delivery).values(state=SENT, sent_at=utcnow(), last_error=None,
                                                            lease_owner=None,
                                                            sr_sop_instance_uid=sr_sop_instance_uid)).rowcount == 1

    def failed(self, delivery: DeliveryRecord, error: str, *, retry_in_seconds: float | None) -> bool:
        """Due again after `retry_in_seconds`, or (None) a dead letter; False when the lease was lost."""
        values = ({"state": DEAD_LETTER} if retry_in_seconds is None else
                  {"state": PENDING, "due_at": utcnow() + timedelta(seconds=retry_in_seconds)})
        with write_transaction(self._writers) as session:
            return session.execute(_leased(delivery).values(last_error=error[:1000], lease_owner=None,
                                                            **values)).rowcount == 1

    def retry_dead_letters(self, result_id: int | None = None) -> int:
        """Dead letters (of one result, or all) pending again now, attempts counted afresh."""
        query = update(DeliveryRow).where(DeliveryRow.state == DEAD_LETTER)
        if result_id is not None:
            query = query.where(DeliveryRow.result_id == result_id)
        with write_transaction(self._writers) as session:
            return session.execute(query.values(state=PENDING, attempts=0, due_at=utcnow())).rowcount

    def release_leases(self) -> int:
        """At start-up: what this replica's previous process was sending is due now; other replicas' leases
        come back only when they run out (NULL: from before owners were recorded, a dead single process's)."""
        owned = or_(DeliveryRow.lease_owner == self.owner, DeliveryRow.lease_owner.is_(None))
        with write_transaction(self._writers) as session:
            return session.execute(update(DeliveryRow).where(DeliveryRow.state == SENDING, owned)
                                   .values(state=PENDING, due_at=utcnow(), lease_owner=None)).rowcount

    def next_due(self) -> datetime | None:
        with self._readers() as session:
            due = session.scalar(select(func.min(DeliveryRow.due_at))
                                 .where(DeliveryRow.state.in_((PENDING, SENDING))))
            return as_utc(due) if due else None

    def dead_letters(self) -> dict[str, int]:
        with self._readers() as session:
            counts = dict(session.execute(select(DeliveryRow.target, func.count())
                                          .where(DeliveryRow.state == DEAD_LETTER)
                                          .group_by(DeliveryRow.target)).all())
        return {target: counts.get(target, 0) for target in TARGETS}


def _leased(delivery: DeliveryRecord):
    """An update of the delivery only while the caller's lease (that attempt) is still the current one."""
    return update(DeliveryRow).where(DeliveryRow.id == delivery.id, DeliveryRow.state == SENDING,
                                     DeliveryRow.attempts == delivery.attempts)


def delivery_record(row: DeliveryRow) -> DeliveryRecord:
    return DeliveryRecord(row.id, row.result_id, row.target, row.destination, row.state, row.attempts,
                          row.last_error, as_utc(row.due_at), as_utc(row.sent_at) if row.sent_at else None,
                          row.sr_sop_instance_uid)
