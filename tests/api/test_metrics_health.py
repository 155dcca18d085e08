"""/healthz, /readyz, /metrics: counters move with traffic, label values stay in closed sets, readiness follows
loading and the batcher, and promtool accepts the exposition."""
import shutil
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from app.storage.db import create_db_engine
from tests.conftest import metric as sample
from tests.conftest import running_app, tiny_settings
from tests.factories import png_bytes


def predictions_of(client: TestClient, label_set: str) -> float:
    return sum(sample(client, "medzero_predictions_total", label_set=label_set, label=label, method="zeroshot")
               for label in ("normal", "benign", "malignant"))


def test_health_and_readiness(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz").json()
    assert ready["status"] == "ready" and ready["model"] == "medzero-tiny" and ready["device"] == "cpu"
    assert client.get("/docs").status_code == 200
    assert "/classify/batch" in client.get("/openapi.json").json()["paths"]


def test_metrics_move_with_traffic(client: TestClient) -> None:
    before_ok = sample(client, "medzero_requests_total", endpoint="/classify", method="POST", status="200")
    before_404 = sample(client, "medzero_requests_total", endpoint="/classify", method="POST", status="404")
    before_pred = predictions_of(client, "breast-ultrasound")
    before_batches = sample(client, "medzero_encoder_batch_size_count")
    before_errors = sample(client, "medzero_errors_total", code="label_set_not_found")

    for _ in range(3):
        assert client.post("/classify", data={"label_set": "breast-ultrasound"},
                           files={"file": ("a.png", png_bytes())}).status_code == 200
    client.post("/classify", data={"label_set": "nope"}, files={"file": ("a.png", png_bytes())})

    assert sample(client, "medzero_requests_total", endpoint="/classify", method="POST", status="200") == before_ok + 3
    assert sample(client, "medzero_requests_total", endpoint="/classify", method="POST", status="404") == before_404 + 1
    assert predictions_of(client, "breast-ultrasound") == before_pred + 3
    assert sample(client, "medzero_encoder_batch_size_count") >= before_batches + 1
    assert sample(client, "medzero_errors_total", code="label_set_not_found") == before_errors + 1
    assert sample(client, "medzero_stage_duration_seconds_count", stage="decode") >= 3
    assert sample(client, "medzero_model_load_seconds") > 0
    assert sample(client, "medzero_ready") == 1
    assert sample(client, "medzero_model_info", model_id="medzero-tiny") == 1


def test_unmatched_paths_do_not_explode_label_cardinality(client: TestClient) -> None:
    client.get("/no/such/path/1.2.840.99999")
    text = client.get("/metrics").text
    assert "1.2.840.99999" not in text
    assert 'endpoint="unmatched"' in text
    assert client.get("/no/such").json()["error"]["code"] == "route_not_found"


def test_promtool_accepts_metrics(client: TestClient) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (Debian package 'prometheus'; .ci/run installs it)")
    client.post("/classify", data={"label_set": "breast-ultrasound"}, files={"file": ("a.png", png_bytes())})
    checked = subprocess.run([promtool, "check", "metrics"], input=client.get("/metrics").content,
                             capture_output=True, timeout=60)
    assert checked.returncode == 0, checked.stdout.decode() + checked.stderr.decode()


def test_prediction_labels_come_from_a_closed_set(tmp_path: Path) -> None:
    with running_app(tiny_settings(tmp_path, metrics_label_sets=["ward-7-wounds"])) as client:
        def register(name: str, classes: list[str]) -> None:
            body = {"name": name, "modality": "photo", "classes": [{"name": c} for c in classes]}
            assert client.post("/labels", json=body).status_code == 201

        def classify(label_set: str) -> None:
            assert client.post("/classify", data={"label_set": label_set},
                               files={"file": ("a.png", png_bytes())}).status_code == 200

        register("jane-doe-follow-up", ["jane-doe-finding", "other-finding"])   # user text: must not be a label
        register("ward-7-wounds", ["healing", "infected"])                      # allow-listed by the setting
        before = sample(client, "medzero_predictions_total", label_set="other", label="other", method="zeroshot")
        classify("jane-doe-follow-up")
        classify("ward-7-wounds")
        text = client.get("/metrics").text
        assert "jane-doe" not in text
        assert sample(client, "medzero_predictions_total", label_set="other", label="other",
                      method="zeroshot") == before + 1
        assert sum(sample(client, "medzero_predictions_total", label_set="ward-7-wounds", label=label,
                          method="zeroshot") for label in ("healing", "infected")) == 1
        # a built-in label set keeps its name; a class a user added to it is 'other'
        spec = client.get("/labels/breast-ultrasound").json()
        renamed = [{"name": "patient-specific-class"}, *spec["classes"][1:]]
        client.put("/labels/breast-ultrasound", json={"name": "breast-ultrasound", "modality": spec["modality"],
                                                      "classes": renamed})
        for _ in range(3):
            classify("breast-ultrasound")
        labels = {s.split('label="')[1].split('"')[0] for s in client.get("/metrics").text.splitlines()
                  if s.startswith('medzero_predictions_total{') and 'label_set="breast-ultrasound"' in s}
        assert labels <= {"normal", "benign", "malignant", "other"} and "patient-specific-class" not in labels


def test_readyz_is_503_while_the_model_loads_then_200(tmp_path: Path) -> None:
    """Start-up is held deterministically: its first write (installing the built-ins) waits for a lock another
    process holds, so the server is up but not ready until the lock goes."""
    settings = tiny_settings(tmp_path, db_busy_timeout_ms=60_000)
    create_db_engine(settings.resolved_database_url).dispose()           # the schema exists; only writes wait
    other = sqlite3.connect(tmp_path / "medzero.db", isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    released = False
    try:
        with TestClient(create_app(settings)) as client:
            for _ in range(3):
                loading = client.get("/readyz")
                assert loading.status_code == 503 and loading.json()["status"] == "loading"
                assert loading.headers["retry-after"] == "5"
                assert client.get("/healthz").status_code == 200
                refused = client.post("/classify", data={"label_set": "ham10000"}, files={"file": ("a", png_bytes())})
                assert refused.status_code == 503 and refused.json()["error"]["code"] == "not_ready"
                time.sleep(0.1)
            other.execute("ROLLBACK")
            released = True
            deadline = time.monotonic() + 120
            while client.get("/readyz").status_code != 200:
                assert time.monotonic() < deadline, client.get("/readyz").json()
                time.sleep(0.05)
            assert client.get("/readyz").json()["status"] == "ready"
    finally:
        if not released:
            other.execute("ROLLBACK")
        other.close()


def test_readyz_turns_503_when_the_batching_task_dies(client: TestClient) -> None:
    batcher = client.app.state.runtime.batcher
    client.portal.call(lambda: batcher._worker.cancel())        # an unexpected end of the task, as a crash would be
    deadline = time.monotonic() + 10
    while client.get("/readyz").status_code == 200:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    body = client.get("/readyz").json()
    assert body["status"] == "failed" and "batching task" in body["detail"]
    assert sample(client, "medzero_ready") == 0
    refused = client.post("/classify", data={"label_set": "ham10000"}, files={"file": ("a", png_bytes())})
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "not_ready"
