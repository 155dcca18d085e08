"""Label-set writes: a process killed mid-transaction leaves the previous version intact; concurrent writers are
serialised, each acknowledged write its own version; a writer locked out too long is told to retry (503)."""
import sqlite3
import subprocess
import sys
import textwrap
import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest

from app.domain import LabelSetSpec
from app.errors import StoreBusy
from app.storage.db import create_db_engine
from app.storage.label_sets import LabelSetRepository

SPEC = LabelSetSpec(name="crash-test", modality="chest-xray", classes=[{"name": "a"}, {"name": "b"}])

CRASHING_WRITER = textwrap.dedent("""
    import os, sys
    import numpy as np
    from sqlalchemy import event
    from app.domain import LabelSetSpec
    from app.storage.db import create_db_engine
    from app.storage.label_sets import LabelSetRepository

    engine = create_db_engine(sys.argv[1])
    statements = []

    @event.listens_for(engine, "after_cursor_execute")
    def die_after_the_embedding_insert(conn, cursor, statement, *args):
        statements.append(statement)
        if statement.lstrip().upper().startswith("INSERT INTO CLASS_EMBEDDINGS"):
            os._exit(17)          # the process dies here: label set updated, embeddings written, no commit

    spec = LabelSetSpec(name="crash-test", modality="fundus", classes=[{"name": "x"}, {"name": "y"}, {"name": "z"}])
    LabelSetRepository(engine).replace(spec, model_id="m", class_embeddings=np.full((3, 4), 9, np.float32))
    sys.exit(0)
""")


def test_crash_mid_write_keeps_the_old_version(database_url: str) -> None:
    url = database_url
    repository = LabelSetRepository(create_db_engine(url))
    repository.create(SPEC, model_id="m", class_embeddings=np.ones((2, 4), np.float32))

    crashed = subprocess.run([sys.executable, "-c", CRASHING_WRITER, url], capture_output=True, timeout=120,
                             cwd=Path(__file__).resolve().parents[2])
    assert crashed.returncode == 17, crashed.stderr.decode()

    survivor = LabelSetRepository(create_db_engine(url))
    label_set = survivor.get("crash-test")
    assert label_set.version == 1 and label_set.modality == "chest-xray"
    assert [c.name for c in label_set.classes] == ["a", "b"]
    np.testing.assert_array_equal(survivor.class_embeddings("crash-test", 1, "m"), np.ones((2, 4), np.float32))


def test_embeddings_for_a_stale_version_are_not_stored(database_url: str) -> None:
    repository = LabelSetRepository(create_db_engine(database_url))
    repository.create(SPEC, model_id="m", class_embeddings=np.ones((2, 4), np.float32))
    repository.replace(SPEC, model_id="m", class_embeddings=np.zeros((2, 4), np.float32))
    assert not repository.store_class_embeddings("crash-test", 1, "other", np.ones((2, 4), np.float32))
    assert repository.store_class_embeddings("crash-test", 2, "other", np.ones((2, 4), np.float32))
    assert repository.class_embeddings("crash-test", 2, "other").shape == (2, 4)
    assert repository.get("crash-test").updated_at <= datetime.now(UTC)


def test_concurrent_writers_each_get_their_own_version(database_url: str) -> None:
    """Four workers (each its own engine, as separate server processes would be) replace one label set at once:
    every acknowledged write is a distinct version and none is lost."""
    url = database_url
    LabelSetRepository(create_db_engine(url)).create(SPEC, model_id="m", class_embeddings=np.ones((2, 4), np.float32))
    writers, writes_each = 4, 6
    start = threading.Barrier(writers)

    def write(worker: int) -> list[int]:
        repository = LabelSetRepository(create_db_engine(url, busy_timeout_ms=30_000))
        start.wait()
        versions = []
        for i in range(writes_each):
            spec = SPEC.model_copy(update={"description": f"worker {worker} write {i}"})
            versions.append(repository.replace(spec, model_id="m",
                                               class_embeddings=np.full((2, 4), worker, np.float32)).version)
        return versions

    with ThreadPoolExecutor(writers) as pool:
        acknowledged = [v for versions in pool.map(write, range(writers)) for v in versions]
    assert sorted(acknowledged) == list(range(2, 2 + writers * writes_each))
    final = LabelSetRepository(create_db_engine(url)).get("crash-test")
    assert final.version == 1 + writers * writes_each


def test_a_writer_locked_out_past_the_busy_timeout_is_store_busy(tmp_path: Path) -> None:
    """SQLite only: PostgreSQL writers of different rows do not lock each other out; of one row they queue."""
    path = tmp_path / "medzero.db"
    repository = LabelSetRepository(create_db_engine(f"sqlite:///{path}", busy_timeout_ms=100))
    repository.create(SPEC, model_id="m", class_embeddings=np.ones((2, 4), np.float32))
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")                          # another process holds the write lock
    try:
        with pytest.raises(StoreBusy) as refused:
            repository.replace(SPEC, model_id="m", class_embeddings=np.zeros((2, 4), np.float32))
        assert refused.value.status_code == 503 and refused.value.retry_after_seconds >= 1
        assert repository.get("crash-test").version == 1      # reads go on meanwhile
    finally:
        other.execute("ROLLBACK")
        other.close()
    assert repository.replace(SPEC, model_id="m", class_embeddings=np.zeros((2, 4), np.float32)).version == 2
