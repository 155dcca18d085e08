"""Learned method state, one repository for every kind: per (kind, label set, label-set version, model id), a
numbered history whose newest entry is the current state. KPL fits are kind "kpl"; a MedUnA adapter, a few-shot
support set or a calibration temperature is a new kind with its own arrays and JSON, not a new table.

The repository also caches the decoded current state: a request checks (version, created_at) with one small query
and decodes only when it changed (versions restart at 1 after a delete; creation times do not repeat).
"""
import io
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import TypeVar

import numpy as np
from sqlalchemy import delete, func, select
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError

from app.errors import LabelSetNotFound
from app.storage.db import LabelSetRow, MethodStateRow, as_utc, session_factories, utcnow, write_transaction

T = TypeVar("T")
# (arrays, meta, version, created_at) -> the method's own state object
Decode = Callable[[dict[str, np.ndarray], dict, int, datetime], T]


@dataclass(frozen=True)
class StateKey:
    kind: str                  # the method's state kind, e.g. "kpl"
    label_set: str
    label_set_version: int
    model_id: str


@dataclass(frozen=True)
class StateStamp:
    version: int
    created_at: datetime


@dataclass(frozen=True)
class StoredState:
    kind: str
    blob: bytes                # pack_arrays' bytes
    meta: dict
    version: int
    created_at: datetime


class MethodStateRepository:
    def __init__(self, engine: Engine) -> None:
        self._readers, self._writers = session_factories(engine)
        self._cache: dict[StateKey, tuple[StateStamp, object]] = {}
        self._lock = threading.Lock()

    def add(self, key: StateKey, arrays: dict[str, np.ndarray], meta: dict) -> StateStamp:
        """Store a new state for `key`; its version is one more than the last of this kind, label set and model."""
        return self.add_packed(key, pack_arrays(arrays), meta)

    def add_packed(self, key: StateKey, blob: bytes, meta: dict, created_at: datetime | None = None) -> StateStamp:
        """`add` for arrays already packed (a bundle's), keeping their creation time when given."""
        try:
            return self._add(key, blob, meta, created_at)
        except IntegrityError:   # a writer that skipped the row lock (none of ours) took the number: take the next
            return self._add(key, blob, meta, created_at)

    def newest_of_each_kind(self, label_set: str, label_set_version: int, model_id: str) -> list[StoredState]:
        """The current state of every kind for this label-set version and model (what a bundle carries)."""
        with self._readers() as session:
            rows = session.scalars(select(MethodStateRow).join(LabelSetRow).where(
                LabelSetRow.name == label_set, MethodStateRow.label_set_version == label_set_version,
                MethodStateRow.model_id == model_id).order_by(MethodStateRow.kind, MethodStateRow.version.desc()))
            newest: dict[str, StoredState] = {}
            for row in rows:
                newest.setdefault(row.kind, StoredState(row.kind, bytes(row.arrays), dict(row.meta), row.version,
                                                        as_utc(row.created_at)))
            return list(newest.values())

    def _add(self, key: StateKey, blob: bytes, meta: dict, created_at: datetime | None = None) -> StateStamp:
        with write_transaction(self._writers) as session:
            label_set_id = session.scalar(
                select(LabelSetRow.id).where(LabelSetRow.name == key.label_set).with_for_update())
            if label_set_id is None:
                raise LabelSetNotFound(f"no label set named {key.label_set!r}")
            last = session.scalar(select(func.max(MethodStateRow.version)).where(
                MethodStateRow.label_set_id == label_set_id, MethodStateRow.kind == key.kind,
                MethodStateRow.model_id == key.model_id)) or 0
            row = MethodStateRow(kind=key.kind, label_set_id=label_set_id, label_set_version=key.label_set_version,
                                 model_id=key.model_id, version=last + 1, arrays=blob, meta=meta,
                                 created_at=created_at or utcnow())
            session.add(row)
        return StateStamp(row.version, as_utc(row.created_at))

    def current(self, key: StateKey, decode: Decode[T]) -> T | None:
        """The newest state for this label-set version and model, decoded (and cached), or None."""
        stamp = self._stamp(key)
        with self._lock:
            cached = self._cache.get(key)
            if stamp is None:
                self._cache.pop(key, None)
                return None
            if cached is not None and cached[0] == stamp:
                return cached[1]
        with self._readers() as session:
            row = session.scalar(self._newest(key))
            if row is None:
                return None
            stamp = StateStamp(row.version, as_utc(row.created_at))
            value = decode(unpack_arrays(row.arrays), dict(row.meta), stamp.version, stamp.created_at)
        with self._lock:
            self._cache[key] = (stamp, value)
        return value

    def delete(self, kind: str, label_set: str, model_id: str) -> int:
        """Remove every state of this kind for the label set under this model (all its versions); how many."""
        with write_transaction(self._writers) as session:
            label_set_id = session.scalar(select(LabelSetRow.id).where(LabelSetRow.name == label_set))
            if label_set_id is None:
                raise LabelSetNotFound(f"no label set named {label_set!r}")
            removed = session.execute(delete(MethodStateRow).where(
                MethodStateRow.label_set_id == label_set_id, MethodStateRow.kind == kind,
                MethodStateRow.model_id == model_id)).rowcount
        with self._lock:
            for key in [k for k in self._cache if (k.kind, k.label_set, k.model_id) == (kind, label_set, model_id)]:
                del self._cache[key]
        return removed

    def _stamp(self, key: StateKey) -> StateStamp | None:
        with self._readers() as session:
            row = session.execute(self._newest(key).with_only_columns(
                MethodStateRow.version, MethodStateRow.created_at)).first()
            return StateStamp(row.version, as_utc(row.created_at)) if row else None

    @staticmethod
    def _newest(key: StateKey):
        return (select(MethodStateRow).join(LabelSetRow)
                .where(LabelSetRow.name == key.label_set, MethodStateRow.kind == key.kind,
                       MethodStateRow.model_id == key.model_id,
                       MethodStateRow.label_set_version == key.label_set_version)
                .order_by(MethodStateRow.version.desc()).limit(1))


def pack_arrays(arrays: dict[str, np.ndarray]) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **{name: np.ascontiguousarray(value) for name, value in arrays.items()})
    return buffer.getvalue()


def unpack_arrays(blob: bytes) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(blob), allow_pickle=False) as archive:
        return {name: archive[name] for name in archive.files}
