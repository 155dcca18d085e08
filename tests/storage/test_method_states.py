"""The one store for learned method state: versioned per (kind, label set, version, model), cached, kinds kept
apart, and the KPL fits of the earlier kpl_fits table carried over."""
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import (
    JSON,
    Column,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    create_engine,
    insert,
    inspect,
)

from app.domain import LabelSetSpec
from app.errors import LabelSetNotFound
from app.methods.kpl import KPLFit
from app.storage.db import create_db_engine
from app.storage.label_sets import LabelSetRepository
from app.storage.method_states import MethodStateRepository, StateKey
from app.storage.migrations import upgrade

SPEC = LabelSetSpec(name="cxr", modality="chest-xray", classes=[{"name": "normal"}, {"name": "pneumonia"}])


def decode(arrays: dict, meta: dict, version: int, created_at: datetime) -> tuple:
    return arrays["w"].copy(), meta, version, created_at


@pytest.fixture
def stores(database_url: str) -> tuple[LabelSetRepository, MethodStateRepository]:
    engine = create_db_engine(database_url)
    labels = LabelSetRepository(engine)
    labels.create(SPEC, model_id="m", class_embeddings=np.ones((2, 4), np.float32))
    return labels, MethodStateRepository(engine)


def test_states_are_versioned_per_kind_and_model_and_the_newest_is_current(stores) -> None:
    _, states = stores
    key = StateKey("kpl", "cxr", 1, "m")
    assert states.current(key, decode) is None
    first = states.add(key, {"w": np.zeros((2, 3), np.float32)}, {"note": "first"})
    second = states.add(key, {"w": np.ones((2, 3), np.float32)}, {"note": "second"})
    assert (first.version, second.version) == (1, 2) and second.created_at >= first.created_at
    w, meta, version, _ = states.current(key, decode)
    assert version == 2 and meta == {"note": "second"} and w.tolist() == [[1, 1, 1], [1, 1, 1]]
    other_kind = StateKey("temperature", "cxr", 1, "m")
    assert states.current(other_kind, decode) is None                  # kinds do not see each other's rows
    assert states.add(other_kind, {"w": np.full((1, 1), 1.5)}, {}).version == 1
    assert states.current(StateKey("kpl", "cxr", 1, "another-model"), decode) is None
    assert states.current(StateKey("kpl", "cxr", 2, "m"), decode) is None   # a newer label-set version: none yet
    assert states.delete("kpl", "cxr", "m") == 2
    assert states.current(key, decode) is None and states.current(other_kind, decode)[2] == 1


def test_the_decoded_state_is_cached_until_it_changes(stores) -> None:
    _, states = stores
    key = StateKey("kpl", "cxr", 1, "m")
    states.add(key, {"w": np.zeros((1, 1), np.float32)}, {})
    decoded = []

    def counting(*args):
        decoded.append(args[2])
        return decode(*args)

    assert states.current(key, counting) is states.current(key, counting)   # one decode, then the cache
    states.delete("kpl", "cxr", "m")
    states.add(key, {"w": np.ones((1, 1), np.float32)}, {})                 # version 1 again, a new row
    assert states.current(key, counting)[0].tolist() == [[1.0]]
    assert decoded == [1, 1]


def test_state_needs_its_label_set_and_goes_with_it(stores) -> None:
    labels, states = stores
    with pytest.raises(LabelSetNotFound):
        states.add(StateKey("kpl", "nope", 1, "m"), {"w": np.zeros(1)}, {})
    key = StateKey("kpl", "cxr", 1, "m")
    states.add(key, {"w": np.zeros(1)}, {})
    labels.delete("cxr")
    labels.create(SPEC, model_id="m", class_embeddings=np.ones((2, 4), np.float32))
    assert states.current(key, decode) is None                             # cascade: the old fit is gone


LEGACY_COLUMNS = ("id", "label_set_id", "label_set_version", "model_id", "fit_version", "n_classes", "dim",
                  "text_proxies", "vision_proxies", "evidence", "evidence_vectors", "config", "pool_size",
                  "class_balance", "fit_seconds", "created_at")


def legacy_kpl_fits_table(metadata: MetaData) -> Table:
    """The kpl_fits table as the first KPL release created it."""
    return Table("kpl_fits", metadata,
                 Column("id", Integer, primary_key=True), Column("label_set_id", ForeignKey("label_sets.id")),
                 Column("label_set_version", Integer), Column("model_id", String(512)),
                 Column("fit_version", Integer), Column("n_classes", Integer), Column("dim", Integer),
                 Column("text_proxies", LargeBinary), Column("vision_proxies", LargeBinary),
                 Column("evidence", JSON), Column("evidence_vectors", LargeBinary), Column("config", JSON),
                 Column("pool_size", Integer), Column("class_balance", JSON), Column("fit_seconds", Float),
                 Column("created_at", DateTime(timezone=True)))


def test_fits_in_the_legacy_table_are_moved_not_lost(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'medzero.db'}"
    engine = create_engine(url)
    upgrade(engine, "0001")                   # the tables as they were when migrations began
    LabelSetRepository(engine).create(SPEC, model_id="m", class_embeddings=np.ones((2, 4), np.float32))
    legacy = legacy_kpl_fits_table(MetaData())
    legacy.metadata.reflect(engine, only=["label_sets"])
    legacy.create(engine)
    with engine.begin() as connection:        # a database from before migrations has no revision recorded
        connection.exec_driver_sql("DROP TABLE alembic_version")
    rng = np.random.default_rng(0)
    text, vision, evidence = (rng.standard_normal(shape).astype(np.float32) for shape in ((2, 4), (2, 4), (3, 4)))
    created = datetime(2026, 11, 20, 8, 0, tzinfo=UTC)
    with engine.begin() as connection:
        connection.execute(insert(legacy).values(
            label_set_id=1, label_set_version=1, model_id="m", fit_version=3, n_classes=2, dim=4,
            text_proxies=text.tobytes(), vision_proxies=vision.tobytes(), evidence_vectors=evidence.tobytes(),
            evidence=[[{"text": "clear lungs", "source": "curated", "score": 0.3}],
                      [{"text": "lobar opacity", "source": "curated", "score": 0.4},
                       {"text": "air bronchograms", "source": "llm:x", "score": 0.2}]],
            config={"balancing": "sinkhorn", "class_prior": None, "_evidence_sizes": [1, 2]}, pool_size=40,
            class_balance={"normal": 0.5, "pneumonia": 0.5}, fit_seconds=1.5, created_at=created))
    engine.dispose()

    migrated = create_db_engine(url)                                     # what a restart after the upgrade does
    assert "kpl_fits" not in inspect(migrated).get_table_names()
    fit = MethodStateRepository(migrated).current(StateKey("kpl", "cxr", 1, "m"), KPLFit.from_state)
    assert fit.version == 3 and fit.created_at == created and fit.pool_size == 40
    assert fit.class_names == ("normal", "pneumonia") and fit.config == {"balancing": "sinkhorn", "class_prior": None}
    np.testing.assert_array_equal(fit.vision_proxies, vision)
    np.testing.assert_array_equal(fit.text_proxies, text)
    assert [len(v) for v in fit.evidence_vectors] == [1, 2]
    np.testing.assert_array_equal(np.concatenate(fit.evidence_vectors), evidence)
    assert [e.text for e in fit.evidence[1]] == ["lobar opacity", "air bronchograms"]
