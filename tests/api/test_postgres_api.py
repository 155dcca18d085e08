"""The whole app on PostgreSQL (MEDZERO_DATABASE_URL): label sets, classify and results as on SQLite, and what
PostgreSQL refuses outright (a NUL character, a value past its column) is a 4xx naming the problem, never a 500."""
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from tests.conftest import running_app, tiny_settings
from tests.factories import png_bytes


@pytest.fixture
def pg_client(tmp_path: Path, postgres) -> Iterator[TestClient]:
    with running_app(tiny_settings(tmp_path, database_url=postgres.create_database())) as client:
        yield client


def test_label_sets_and_classify_on_postgresql(pg_client: TestClient) -> None:
    spec = {"name": "knee", "modality": "knee-xray", "classes": [{"name": "normal"}, {"name": "oa"}]}
    assert pg_client.post("/labels", json=spec).status_code == 201
    assert pg_client.put("/labels/knee", json=spec).json()["version"] == 2
    answer = pg_client.post("/classify", data={"label_set": "knee"}, files={"file": ("x.png", png_bytes())})
    assert answer.status_code == 200 and answer.json()["label_set_version"] == 2
    assert pg_client.delete("/labels/knee").status_code == 204
    assert pg_client.get("/labels/knee").status_code == 404


@pytest.mark.parametrize("path", ["/labels/a%00b", "/labels/a%00b/kpl", "/labels/a%00b/calibration",
                                  "/labels/a%00b/support", "/dicom/instances?study=1.2%003", "/results?study=1%002"])
def test_a_nul_character_is_a_4xx_not_a_500(pg_client: TestClient, path: str) -> None:
    answer = pg_client.get(path)
    assert 400 <= answer.status_code < 500, answer.text
    assert answer.json()["error"]["code"] in ("invalid_input", "validation_error", "label_set_not_found")
    assert pg_client.get("/healthz").status_code == 200
