"""KPL fits, versioned per label set and model. The current fit is the newest one made for the label set's
current version under the loaded model; older fits stay as history until the fit is deleted."""
from dataclasses import dataclass
from datetime import UTC, datetime

import numpy as np
from sqlalchemy import delete, func, select
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import sessionmaker

from app.errors import LabelSetNotFound
from app.storage.db import KPLFitRow, LabelSetRow


@dataclass(frozen=True)
class EvidenceEntry:
    text: str
    source: str
    score: float            # mean cosine to the fitting pool when the description was chosen


@dataclass(frozen=True)
class StoredFit:
    label_set: str
    label_set_version: int
    model_id: str
    fit_version: int
    text_proxies: np.ndarray              # (n_classes, dim)
    vision_proxies: np.ndarray            # (n_classes, dim)
    evidence: list[list[EvidenceEntry]]   # per class, in class order
    evidence_vectors: list[np.ndarray]    # per class, (k_c, dim)
    config: dict
    pool_size: int
    class_balance: dict[str, float]
    fit_seconds: float
    created_at: datetime


class KPLFitRepository:
    def __init__(self, engine: Engine) -> None:
        self._sessions = sessionmaker(engine, expire_on_commit=False)

    def add(self, fit: StoredFit) -> StoredFit:
        """Store a new fit; its fit_version is one more than the last for this label set and model (a concurrent
        fit that took the same number makes the unique constraint fail; one retry takes the next)."""
        try:
            return self._add(fit)
        except IntegrityError:
            return self._add(fit)

    def _add(self, fit: StoredFit) -> StoredFit:
        with self._sessions.begin() as session:
            label_set = session.scalar(select(LabelSetRow).where(LabelSetRow.name == fit.label_set).with_for_update())
            if label_set is None:
                raise LabelSetNotFound(f"no label set named {fit.label_set!r}")
            last = session.scalar(select(func.max(KPLFitRow.fit_version)).where(
                KPLFitRow.label_set_id == label_set.id, KPLFitRow.model_id == fit.model_id)) or 0
            sizes = [len(v) for v in fit.evidence_vectors]
            row = KPLFitRow(
                label_set_id=label_set.id, label_set_version=fit.label_set_version, model_id=fit.model_id,
                fit_version=last + 1, n_classes=fit.text_proxies.shape[0], dim=fit.text_proxies.shape[1],
                text_proxies=_pack(fit.text_proxies), vision_proxies=_pack(fit.vision_proxies),
                evidence=[[vars(e) for e in per_class] for per_class in fit.evidence],
                evidence_vectors=_pack(np.concatenate(fit.evidence_vectors) if sum(sizes) else
                                       np.empty((0, fit.text_proxies.shape[1]), np.float32)),
                config={**fit.config, "_evidence_sizes": sizes}, pool_size=fit.pool_size,
                class_balance=fit.class_balance, fit_seconds=fit.fit_seconds, created_at=fit.created_at)
            session.add(row)
            session.flush()
            return _to_fit(row, fit.label_set)

    def current(self, label_set: str, label_set_version: int, model_id: str) -> StoredFit | None:
        with self._sessions() as session:
            row = session.scalar(
                select(KPLFitRow).join(LabelSetRow).where(
                    LabelSetRow.name == label_set, KPLFitRow.model_id == model_id,
                    KPLFitRow.label_set_version == label_set_version)
                .order_by(KPLFitRow.fit_version.desc()).limit(1))
            return _to_fit(row, label_set) if row else None

    def current_stamp(self, label_set: str, label_set_version: int, model_id: str) -> tuple[int, datetime] | None:
        """(fit_version, created_at) of the current fit: a cheap check before using a cached one."""
        with self._sessions() as session:
            row = session.execute(
                select(KPLFitRow.fit_version, KPLFitRow.created_at).join(LabelSetRow).where(
                    LabelSetRow.name == label_set, KPLFitRow.model_id == model_id,
                    KPLFitRow.label_set_version == label_set_version)
                .order_by(KPLFitRow.fit_version.desc()).limit(1)).first()
            return (row.fit_version, _as_utc(row.created_at)) if row else None

    def delete(self, label_set: str, model_id: str) -> int:
        """Remove every fit of this label set under this model; returns how many there were."""
        with self._sessions.begin() as session:
            label_set_id = session.scalar(select(LabelSetRow.id).where(LabelSetRow.name == label_set))
            if label_set_id is None:
                raise LabelSetNotFound(f"no label set named {label_set!r}")
            result = session.execute(delete(KPLFitRow).where(KPLFitRow.label_set_id == label_set_id,
                                                             KPLFitRow.model_id == model_id))
            return result.rowcount


def _as_utc(moment: datetime) -> datetime:
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _pack(array: np.ndarray) -> bytes:
    return np.ascontiguousarray(array, dtype=np.float32).tobytes()


def _to_fit(row: KPLFitRow, label_set: str) -> StoredFit:
    config = dict(row.config)
    sizes = config.pop("_evidence_sizes")
    vectors = np.frombuffer(row.evidence_vectors, dtype=np.float32).reshape(-1, row.dim)
    split = np.split(vectors, np.cumsum(sizes)[:-1]) if sizes else []
    created = _as_utc(row.created_at)
    return StoredFit(
        label_set=label_set, label_set_version=row.label_set_version, model_id=row.model_id,
        fit_version=row.fit_version,
        text_proxies=np.frombuffer(row.text_proxies, dtype=np.float32).reshape(row.n_classes, row.dim).copy(),
        vision_proxies=np.frombuffer(row.vision_proxies, dtype=np.float32).reshape(row.n_classes, row.dim).copy(),
        evidence=[[EvidenceEntry(**e) for e in per_class] for per_class in row.evidence],
        evidence_vectors=[v.copy() for v in split], config=config, pool_size=row.pool_size,
        class_balance=row.class_balance, fit_seconds=row.fit_seconds, created_at=created)
