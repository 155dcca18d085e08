"""The inbox worker outlives a database that stays locked past its busy timeout: the write that failed comes
back after its lease, nothing is lost, every instance gets its one result."""
import sqlite3
import time
from pathlib import Path

import pytest
from pydicom.uid import generate_uid

from tests.api.test_dicomweb import ROUTES, in_study, multipart, results_for
from tests.conftest import encoder_thread_held, running_app, tiny_settings


def test_the_worker_survives_a_locked_database(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "routes.yaml").write_text(ROUTES)
    settings = tiny_settings(tmp_path / "data", dicom_routes_file=tmp_path / "routes.yaml", ingest_workers=1,
                             db_busy_timeout_ms=100, ingest_lease_seconds=2)
    with running_app(settings) as client:
        study = generate_uid()
        with encoder_thread_held(client) as release:
            for _ in range(2):           # the first is claimed and waits for the encoder; the second is queued
                body, headers = multipart([in_study(study, modality="DX")])
                assert client.post("/dicomweb/studies", content=body, headers=headers).status_code == 200
            time.sleep(0.3)
            locker = sqlite3.connect(tmp_path / "data" / "medzero.db", isolation_level=None)
            locker.execute("BEGIN IMMEDIATE")       # another writer holds the lock: the result write fails
            release.set()
            time.sleep(1.5)
            locker.execute("ROLLBACK")
            locker.close()
        results = results_for(client, study, 2, timeout_seconds=30)
        assert len({r["sop_instance_uid"] for r in results}) == 2
        time.sleep(2.5)                               # past another lease: nothing classified twice
        assert len(client.get("/results", params={"study": study}).json()["data"]) == 2
    assert "inbox worker: the database is busy" in caplog.text      # the lock did hit the worker
