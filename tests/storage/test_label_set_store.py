"""Crash safety of label-set writes: a process killed mid-transaction leaves the previous version intact."""
import subprocess
import sys
import textwrap
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from app.domain import LabelSetSpec
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


def test_crash_mid_write_keeps_the_old_version(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'medzero.db'}"
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


def test_embeddings_for_a_stale_version_are_not_stored(tmp_path: Path) -> None:
    repository = LabelSetRepository(create_db_engine(f"sqlite:///{tmp_path / 'medzero.db'}"))
    repository.create(SPEC, model_id="m", class_embeddings=np.ones((2, 4), np.float32))
    repository.replace(SPEC, model_id="m", class_embeddings=np.zeros((2, 4), np.float32))
    assert not repository.store_class_embeddings("crash-test", 1, "other", np.ones((2, 4), np.float32))
    assert repository.store_class_embeddings("crash-test", 2, "other", np.ones((2, 4), np.float32))
    assert repository.class_embeddings("crash-test", 2, "other").shape == (2, 4)
    assert repository.get("crash-test").updated_at <= datetime.now(UTC)
