"""The SQLAlchemy engine and tables. SQLite under data_dir by default; any SQLAlchemy URL works.

Write transactions take the writer lock when they begin (SQLite: ``BEGIN IMMEDIATE``, SQLAlchemy's pysqlite
recipe; elsewhere ``SELECT ... FOR UPDATE`` in the repositories), so two concurrent writers of one label set are
serialised instead of both reading version N and both writing N+1. A writer that waits past the busy timeout gets
StoreBusy (503 + Retry-After), never a 500.
"""
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from functools import partial
from pathlib import Path

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    UniqueConstraint,
    create_engine,
    event,
)
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship, sessionmaker

from app.errors import StoreBusy

LOCAL_OWNER = "local"                # the lease owner of a queue repository that was not told its replica
WRITE_OPTION = "medzero_write"       # execution option of the engine that repositories write through
_LOCK_MESSAGES = ("database is locked", "database table is locked", "lock timeout", "deadlock detected",
                  "could not serialize access")


def utcnow() -> datetime:
    return datetime.now(UTC)


def as_utc(moment: datetime) -> datetime:
    """SQLite hands timestamps back without their zone; they were written in UTC."""
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


class Base(DeclarativeBase):
    pass


class LabelSetRow(Base):
    __tablename__ = "label_sets"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True, index=True)
    version: Mapped[int] = mapped_column(Integer)
    spec: Mapped[dict] = mapped_column(JSON)                 # LabelSetSpec.model_dump()
    builtin: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    embeddings: Mapped[list["ClassEmbeddingRow"]] = relationship(
        back_populates="label_set", cascade="all, delete-orphan", passive_deletes=True)


class ClassEmbeddingRow(Base):
    """Class text embeddings of one label-set version under one model: (n_classes, dim) float32."""
    __tablename__ = "class_embeddings"

    label_set_id: Mapped[int] = mapped_column(ForeignKey("label_sets.id", ondelete="CASCADE"), primary_key=True)
    model_id: Mapped[str] = mapped_column(String(512), primary_key=True)
    version: Mapped[int] = mapped_column(Integer)            # the label-set version these were computed for
    n_classes: Mapped[int] = mapped_column(Integer)
    dim: Mapped[int] = mapped_column(Integer)
    vectors: Mapped[bytes] = mapped_column(LargeBinary)
    label_set: Mapped[LabelSetRow] = relationship(back_populates="embeddings")


class MethodStateRow(Base):
    """What a method learned for one label-set version under one model: a KPL fit (kind "kpl"), later a MedUnA
    adapter, a few-shot support set, a calibration temperature. Arrays as an .npz blob, the rest as JSON."""
    __tablename__ = "method_states"
    __table_args__ = (UniqueConstraint("label_set_id", "kind", "model_id", "version"),
                      Index("ix_method_states_lookup", "label_set_id", "kind", "model_id", "label_set_version"))

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    kind: Mapped[str] = mapped_column(String(32))            # the method's state kind, e.g. "kpl"
    label_set_id: Mapped[int] = mapped_column(ForeignKey("label_sets.id", ondelete="CASCADE"))
    label_set_version: Mapped[int] = mapped_column(Integer)
    model_id: Mapped[str] = mapped_column(String(512))
    version: Mapped[int] = mapped_column(Integer)            # 1, 2, ... per (label set, kind, model)
    arrays: Mapped[bytes] = mapped_column(LargeBinary)       # numpy .npz, read with allow_pickle=False
    meta: Mapped[dict] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class InboxRow(Base):
    """A DICOM instance received for classification (STOW-RS or C-STORE), durable before it is acknowledged.
    queued -> processing (leased to one worker) -> done | skipped | failed; a lease that runs out (a worker that
    died) puts it back in the queue, and `done` is written with its result in one transaction: exactly once."""
    __tablename__ = "dicom_inbox"
    __table_args__ = (Index("ix_dicom_inbox_queue", "state", "id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)   # a re-send is recognised, not redone
    study_instance_uid: Mapped[str] = mapped_column(String(64), index=True)
    series_instance_uid: Mapped[str] = mapped_column(String(64))
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    source: Mapped[str] = mapped_column(String(64))          # stow-rs | c-store:<calling AE title>
    dicom: Mapped[bytes] = mapped_column(LargeBinary)        # the Part 10 bytes as received
    label_set: Mapped[str | None] = mapped_column(String(64))
    method: Mapped[str | None] = mapped_column(String(32))
    state: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str | None] = mapped_column(String(1000))   # why skipped or failed: codes, never patient data
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    lease_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    lease_owner: Mapped[str | None] = mapped_column(String(128))    # the replica whose worker holds the lease
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class ResultRow(Base):
    """The classification of one inbox instance (at most one: the unique inbox_id is the exactly-once guard)."""
    __tablename__ = "dicom_results"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    inbox_id: Mapped[int] = mapped_column(ForeignKey("dicom_inbox.id", ondelete="CASCADE"), unique=True)
    study_instance_uid: Mapped[str] = mapped_column(String(64), index=True)
    series_instance_uid: Mapped[str] = mapped_column(String(64))
    sop_instance_uid: Mapped[str] = mapped_column(String(64))
    label_set: Mapped[str] = mapped_column(String(64))
    label_set_version: Mapped[int] = mapped_column(Integer)
    method: Mapped[str] = mapped_column(String(32))
    model_id: Mapped[str] = mapped_column(String(512))
    classification: Mapped[dict] = mapped_column(JSON)      # decision, ranked predictions, calibration, set
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class DeliveryRow(Base):
    """Sending one result to one target (an SR by C-STORE or STOW-RS, a JSON webhook), created with the result:
    pending -> sending (leased) -> sent | dead_letter; a failed attempt is pending again after a back-off."""
    __tablename__ = "result_deliveries"
    __table_args__ = (UniqueConstraint("result_id", "target"), Index("ix_result_deliveries_due", "state", "due_at"))

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    result_id: Mapped[int] = mapped_column(ForeignKey("dicom_results.id", ondelete="CASCADE"), index=True)
    target: Mapped[str] = mapped_column(String(16))          # cstore | stow | webhook
    destination: Mapped[str] = mapped_column(String(512))    # AET@host:port or a URL, as configured then
    state: Mapped[str] = mapped_column(String(16))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str | None] = mapped_column(String(1000))
    due_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)   # next attempt, or lease end
    lease_owner: Mapped[str | None] = mapped_column(String(128))    # the replica sending it, while `sending`
    sent_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    sr_sop_instance_uid: Mapped[str | None] = mapped_column(String(64))   # the SR sent (same UID on every retry)


class RoutingRow(Base):
    """The routing table in force (one row): set through /routes, or imported from MEDZERO_DICOM_ROUTES_FILE
    when that file's content changed since it was last imported."""
    __tablename__ = "dicom_routes"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    version: Mapped[int] = mapped_column(Integer)
    rules: Mapped[list] = mapped_column(JSON)                 # RoutingTable.model_dump()["rules"]
    source: Mapped[str] = mapped_column(String(16))           # file | api
    file_sha256: Mapped[str | None] = mapped_column(String(64))   # the file content last imported
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class ApiKeyRow(Base):
    """An API key: its public id and the sha256 of its secret, never the secret itself (`medzero keys`)."""
    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(16), primary_key=True)     # the key's public part, "mzk_<id>_..."
    name: Mapped[str] = mapped_column(String(128))
    scopes: Mapped[list] = mapped_column(JSON)                        # ["classify"] or ["admin"]
    secret_sha256: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class MetaRow(Base):
    __tablename__ = "meta"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(String(256))


def create_db_engine(url: str, *, busy_timeout_ms: int = 5000) -> Engine:
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url, pool_pre_ping=True)
    if engine.dialect.name == "sqlite":
        event.listen(engine, "connect", partial(_sqlite_connect, busy_timeout_ms=busy_timeout_ms))
        event.listen(engine, "begin", _sqlite_begin)
    from app.storage.migrations import upgrade  # the revisions import these tables
    upgrade(engine)
    return engine


def session_factories(engine: Engine) -> tuple[sessionmaker, sessionmaker]:
    """(readers, writers): writers' transactions take the write lock as they begin."""
    return (sessionmaker(engine, expire_on_commit=False),
            sessionmaker(engine.execution_options(**{WRITE_OPTION: True}), expire_on_commit=False))


@contextmanager
def write_transaction(writers: sessionmaker) -> Iterator[Session]:
    """One write transaction, committed on success; a lock held too long by another writer becomes StoreBusy."""
    try:
        with writers.begin() as session:
            yield session
    except OperationalError as exc:
        if any(message in str(exc.orig).lower() for message in _LOCK_MESSAGES):
            raise StoreBusy("the database is busy with another write; retry shortly") from exc
        raise


def _sqlite_connect(dbapi_connection, _record, *, busy_timeout_ms: int) -> None:
    # pysqlite would emit BEGIN itself, and only before the first INSERT/UPDATE: the reads before it ran outside
    # the transaction (two writers both read version N). We emit BEGIN ourselves in _sqlite_begin.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    # WAL: readers never block the writer; a crash mid-transaction leaves the last committed state.
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
    cursor.close()


def _sqlite_begin(connection: Connection) -> None:
    # IMMEDIATE takes the write lock now, waiting up to busy_timeout for another writer; readers stay DEFERRED
    # so they never queue behind writes (WAL serves them the last committed state).
    writing = connection.get_execution_options().get(WRITE_OPTION, False)
    connection.exec_driver_sql("BEGIN IMMEDIATE" if writing else "BEGIN")
