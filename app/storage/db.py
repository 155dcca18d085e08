"""The SQLAlchemy engine and tables. SQLite under data_dir by default; any SQLAlchemy URL works."""
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import (JSON, Boolean, DateTime, ForeignKey, Integer, LargeBinary, String, UniqueConstraint, create_engine,
                        event)
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


def utcnow() -> datetime:
    return datetime.now(UTC)


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


class KPLFitRow(Base):
    """One KPL fit of a label-set version under one model: text proxies T, vision proxies W, and evidence."""
    __tablename__ = "kpl_fits"
    __table_args__ = (UniqueConstraint("label_set_id", "model_id", "fit_version"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    label_set_id: Mapped[int] = mapped_column(ForeignKey("label_sets.id", ondelete="CASCADE"), index=True)
    label_set_version: Mapped[int] = mapped_column(Integer)
    model_id: Mapped[str] = mapped_column(String(512))
    fit_version: Mapped[int] = mapped_column(Integer)        # 1, 2, ... per label set and model
    n_classes: Mapped[int] = mapped_column(Integer)
    dim: Mapped[int] = mapped_column(Integer)
    text_proxies: Mapped[bytes] = mapped_column(LargeBinary)     # (n_classes, dim) float32
    vision_proxies: Mapped[bytes] = mapped_column(LargeBinary)   # (n_classes, dim) float32
    evidence: Mapped[list] = mapped_column(JSON)                 # per class: [{text, source, score}]
    evidence_vectors: Mapped[bytes] = mapped_column(LargeBinary)  # the evidence descriptions' vectors, float32
    config: Mapped[dict] = mapped_column(JSON)
    pool_size: Mapped[int] = mapped_column(Integer)
    class_balance: Mapped[dict] = mapped_column(JSON)            # label -> share of the pool's pseudo-labels
    fit_seconds: Mapped[float] = mapped_column()
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class MetaRow(Base):
    __tablename__ = "meta"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(String(256))


def create_db_engine(url: str) -> Engine:
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url, pool_pre_ping=True)
    if engine.dialect.name == "sqlite":
        event.listen(engine, "connect", _sqlite_pragmas)
    Base.metadata.create_all(engine)
    return engine


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    cursor = dbapi_connection.cursor()
    # WAL: readers never block the writer; a crash mid-transaction leaves the last committed state.
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=5000")
    cursor.close()
