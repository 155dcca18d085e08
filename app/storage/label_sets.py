"""The label-set repository. Each write is one transaction: a label set and its embeddings change together,
or not at all (a crash mid-write leaves the previous version intact). Writes are serialised (see storage.db):
concurrent replaces of one label set each get their own version."""
import numpy as np
from sqlalchemy import select
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.domain import LabelSet, LabelSetSpec
from app.errors import LabelSetExists, LabelSetNotFound
from app.storage.db import ClassEmbeddingRow, LabelSetRow, MetaRow, as_utc, session_factories, utcnow, write_transaction


class LabelSetRepository:
    def __init__(self, engine: Engine) -> None:
        self._sessions, self._writers = session_factories(engine)

    def list(self) -> list[LabelSet]:
        with self._sessions() as session:
            return [_to_domain(row) for row in session.scalars(select(LabelSetRow).order_by(LabelSetRow.name))]

    def get(self, name: str) -> LabelSet:
        with self._sessions() as session:
            return _to_domain(self._row(session, name))

    def exists(self, name: str) -> bool:
        with self._sessions() as session:
            return session.scalar(select(LabelSetRow.id).where(LabelSetRow.name == name)) is not None

    def create(self, spec: LabelSetSpec, *, model_id: str, class_embeddings: np.ndarray,
               builtin: bool = False) -> LabelSet:
        now = utcnow()
        row = LabelSetRow(name=spec.name, version=1, spec=spec.model_dump(mode="json"), builtin=builtin,
                          created_at=now, updated_at=now)
        row.embeddings.append(_embedding_row(model_id, 1, class_embeddings))
        try:
            with write_transaction(self._writers) as session:
                session.add(row)
        except IntegrityError as exc:   # a concurrent create of the same name won the race
            raise LabelSetExists(f"a label set named {spec.name!r} already exists") from exc
        return _to_domain(row)

    def replace(self, spec: LabelSetSpec, *, model_id: str, class_embeddings: np.ndarray) -> LabelSet:
        """A new version of an existing label set; embeddings of the old version (any model) are dropped."""
        with write_transaction(self._writers) as session:
            row = self._row(session, spec.name, for_update=True)
            row.version += 1
            row.spec = spec.model_dump(mode="json")
            row.updated_at = utcnow()
            row.embeddings.clear()
            session.flush()   # the old rows go before the new one with the same key arrives
            row.embeddings.append(_embedding_row(model_id, row.version, class_embeddings))
        return _to_domain(row)

    def update_abstain_threshold(self, spec: LabelSetSpec, version: int) -> LabelSet | None:
        """Write `spec`, which differs from version `version` only in its abstain threshold, keeping the version
        (and so its embeddings, fits and calibrations); None if the label set moved on meanwhile."""
        with write_transaction(self._writers) as session:
            row = self._row(session, spec.name, for_update=True)
            if row.version != version:
                return None
            row.spec = spec.model_dump(mode="json")
            row.updated_at = utcnow()
        return _to_domain(row)

    def delete(self, name: str) -> None:
        with write_transaction(self._writers) as session:
            session.delete(self._row(session, name, for_update=True))

    def class_embeddings(self, name: str, version: int, model_id: str) -> np.ndarray | None:
        with self._sessions() as session:
            row = session.scalar(
                select(ClassEmbeddingRow).join(LabelSetRow)
                .where(LabelSetRow.name == name, ClassEmbeddingRow.model_id == model_id,
                       ClassEmbeddingRow.version == version))
            if row is None:
                return None
            return np.frombuffer(row.vectors, dtype=np.float32).reshape(row.n_classes, row.dim).copy()

    def store_class_embeddings(self, name: str, version: int, model_id: str, class_embeddings: np.ndarray) -> bool:
        """Cache embeddings for (version, model); False if the label set moved on meanwhile (nothing stored)."""
        with write_transaction(self._writers) as session:
            row = session.scalar(select(LabelSetRow).where(LabelSetRow.name == name).with_for_update())
            if row is None or row.version != version:
                return False
            session.merge(_embedding_row(model_id, version, class_embeddings, label_set_id=row.id))
        return True

    def get_meta(self, key: str) -> str | None:
        with self._sessions() as session:
            row = session.get(MetaRow, key)
            return row.value if row else None

    def set_meta(self, key: str, value: str) -> None:
        with write_transaction(self._writers) as session:
            # an upsert: replicas starting together may both set it (a select-then-insert would collide)
            dialect = session.get_bind().dialect.name
            insert = postgresql_insert if dialect == "postgresql" else sqlite_insert
            statement = insert(MetaRow).values(key=key, value=value)
            session.execute(statement.on_conflict_do_update(index_elements=[MetaRow.key], set_={"value": value}))

    @staticmethod
    def _row(session: Session, name: str, *, for_update: bool = False) -> LabelSetRow:
        query = select(LabelSetRow).where(LabelSetRow.name == name)
        row = session.scalar(query.with_for_update() if for_update else query)
        if row is None:
            raise LabelSetNotFound(f"no label set named {name!r}")
        return row


def _embedding_row(model_id: str, version: int, class_embeddings: np.ndarray,
                   label_set_id: int | None = None) -> ClassEmbeddingRow:
    vectors = np.ascontiguousarray(class_embeddings, dtype=np.float32)
    return ClassEmbeddingRow(label_set_id=label_set_id, model_id=model_id, version=version,
                             n_classes=vectors.shape[0], dim=vectors.shape[1], vectors=vectors.tobytes())


def _to_domain(row: LabelSetRow) -> LabelSet:
    return LabelSet(**row.spec, version=row.version, builtin=row.builtin,
                    created_at=as_utc(row.created_at), updated_at=as_utc(row.updated_at))
