"""/routes: the routing table read and replaced over HTTP (admin), validated against the label sets and methods
that exist, versioned against lost updates, stored so a restart keeps an API change, while an edited routes file
is imported at the next start; /dicom/instances shows what was skipped and why."""
import io
from pathlib import Path

import pydicom
from fastapi.testclient import TestClient
from pydicom.uid import generate_uid

from tests.api.test_dicomweb import ROUTES, in_study, multipart, results_for
from tests.conftest import running_app, tiny_settings

ULTRASOUND = {"name": "ultrasound", "modality": ["US"], "label_set": "breast-ultrasound"}


def stow(client: TestClient, data: bytes) -> str:
    body, headers = multipart([data])
    assert client.post("/dicomweb/studies", content=body, headers=headers).status_code == 200
    return str(pydicom.dcmread(io.BytesIO(data)).SOPInstanceUID)


def test_the_table_is_read_replaced_and_routes_what_arrives_next(tmp_path: Path) -> None:
    (tmp_path / "routes.yaml").write_text(ROUTES)
    settings = tiny_settings(tmp_path / "data", dicom_routes_file=tmp_path / "routes.yaml")
    with running_app(settings) as client:
        table = client.get("/routes").json()
        assert (table["version"], table["source"]) == (1, "file")
        assert [rule["name"] for rule in table["rules"]] == ["radiographs"]
        study = generate_uid()
        stow(client, in_study(study, modality="US"))
        [skipped] = client.get("/dicom/instances", params={"study": study, "state": "skipped"}).json()["data"]
        assert "Modality=US" in skipped["reason"]

        changed = client.put("/routes", json={"rules": [*table["rules"], ULTRASOUND], "version": 1})
        assert changed.status_code == 200, changed.text
        assert (changed.json()["version"], changed.json()["source"]) == (2, "api")
        later = generate_uid()
        stow(client, in_study(later, modality="US"))
        [result] = results_for(client, later, 1)
        assert result["label_set"] == "breast-ultrasound"

        stale = client.put("/routes", json={"rules": [ULTRASOUND], "version": 1})
        assert stale.status_code == 409 and stale.json()["error"]["code"] == "routes_changed"

    with running_app(settings) as client:       # same file: the API's table stands
        assert client.get("/routes").json()["version"] == 2
        assert [rule["name"] for rule in client.get("/routes").json()["rules"]] == ["radiographs", "ultrasound"]

    (tmp_path / "routes.yaml").write_text("rules: [{name: only-cr, modality: [CR], label_set: chest-xray-pneumonia}]")
    with running_app(settings) as client:       # an edited file wins at the next start
        table = client.get("/routes").json()
        assert (table["version"], table["source"], [r["name"] for r in table["rules"]]) == (3, "file", ["only-cr"])


def test_bad_tables_are_refused_and_the_old_one_stays(client: TestClient) -> None:
    def put(rules: list) -> dict:
        answer = client.put("/routes", json={"rules": rules})
        assert answer.status_code in (404, 422), answer.text
        return answer.json()["error"]

    assert put([{**ULTRASOUND, "label_set": "no-such-set"}])["code"] == "label_set_not_found"
    assert put([{**ULTRASOUND, "method": "astrology"}])["code"] == "unknown_method"
    assert put([ULTRASOUND, ULTRASOUND])["code"] == "validation_error"
    assert put([{**ULTRASOUND, "series_description": "(unclosed"}])["code"] == "validation_error"
    assert put([{**ULTRASOUND, "colour": "blue"}])["code"] == "validation_error"
    assert client.get("/routes").json() == {"version": 0, "source": None, "routes_file": None, "updated_at": None,
                                            "rules": []}


def test_replacing_routes_needs_the_admin_key(tmp_path: Path) -> None:
    with running_app(tiny_settings(tmp_path, admin_api_key="s3cret")) as client:
        assert client.put("/routes", json={"rules": [ULTRASOUND]}).status_code == 401
        assert client.put("/routes", json={"rules": [ULTRASOUND]}, headers={"X-API-Key": "s3cret"}).status_code == 200
        assert client.get("/routes").json()["version"] == 1
