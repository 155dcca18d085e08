"""/healthz, /readyz, /metrics: counters move with traffic, and promtool accepts the exposition."""
import shutil
import subprocess

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from tests.factories import png_bytes


def sample(client: TestClient, name: str, **labels: str) -> float:
    for family in text_string_to_metric_families(client.get("/metrics").text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return 0.0


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
