"""API keys: on by default outside --demo; Bearer or X-API-Key; classify vs admin scope; 401 / 403 JSON errors;
keys stored hashed, revocable at once, managed with `medzero keys`; health, readiness and /metrics stay open."""
import sqlite3
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app.__main__ import main as cli
from app.settings import Settings
from tests.conftest import running_app, tiny_settings
from tests.factories import png_bytes

LABEL_SET = "chest-xray-pneumonia"
NEW_LABEL_SET = {"name": "knee", "modality": "xray", "classes": [{"name": "normal"}, {"name": "arthritis"}]}


def create_key(data_dir: Path, scope: str, capsys: pytest.CaptureFixture) -> str:
    assert cli(["keys", "create", "--name", f"{scope}-user", "--scope", scope, "--data-dir", str(data_dir)]) == 0
    return capsys.readouterr().out.strip().splitlines()[-1]


def classify(client: TestClient, headers: dict[str, str]):
    return client.post("/classify", data={"label_set": LABEL_SET}, files={"file": ("x.png", png_bytes())},
                       headers=headers)


def test_auth_is_on_by_default_and_off_in_demo() -> None:
    assert Settings(_env_file=None).auth_mode == "keys"
    assert Settings(_env_file=None, demo=True).auth_mode == "off"
    assert Settings(_env_file=None, demo=True, auth="keys").auth_mode == "keys"


@pytest.fixture
def secured(tmp_path: Path, capsys: pytest.CaptureFixture):
    data = tmp_path / "data"
    classify_key, admin_key = create_key(data, "classify", capsys), create_key(data, "admin", capsys)
    with running_app(tiny_settings(data, auth="keys")) as client:
        yield client, classify_key, admin_key, data


def test_keys_and_scopes(secured) -> None:
    client, classify_key, admin_key, _ = secured
    missing = classify(client, {})
    assert missing.status_code == 401 and missing.json()["error"]["code"] == "unauthorized"
    assert "Authorization: Bearer" in missing.json()["error"]["message"]
    for wrong in ("nonsense", classify_key[:-4] + "AAAA", "mzk_000000000000_" + "a" * 43):
        refused = classify(client, {"X-API-Key": wrong})
        assert refused.status_code == 401 and "unknown" in refused.json()["error"]["message"]
    assert classify(client, {"Authorization": f"Bearer {classify_key}"}).status_code == 200
    assert classify(client, {"X-API-Key": classify_key}).status_code == 200
    assert client.get("/labels", headers={"X-API-Key": classify_key}).status_code == 200
    assert client.get("/results", headers={"X-API-Key": classify_key}).status_code == 200
    forbidden = client.post("/labels", json=NEW_LABEL_SET, headers={"X-API-Key": classify_key})
    assert forbidden.status_code == 403 and forbidden.json()["error"]["code"] == "forbidden"
    assert "needs admin" in forbidden.json()["error"]["message"]
    assert client.post("/labels", json=NEW_LABEL_SET, headers={"Authorization": f"Bearer {admin_key}"}) \
        .status_code == 201
    assert classify(client, {"X-API-Key": admin_key}).status_code == 200          # admin includes classify
    for open_path in ("/healthz", "/readyz", "/metrics"):
        assert client.get(open_path).status_code == 200


def test_a_revoked_key_stops_working_at_once(secured, capsys: pytest.CaptureFixture) -> None:
    client, classify_key, _, data = secured
    assert classify(client, {"X-API-Key": classify_key}).status_code == 200
    key_id = classify_key.split("_")[1]
    assert cli(["keys", "revoke", key_id, "--data-dir", str(data)]) == 0
    assert f"revoked key {key_id}" in capsys.readouterr().out
    assert classify(client, {"X-API-Key": classify_key}).status_code == 401
    assert cli(["keys", "list", "--data-dir", str(data)]) == 0
    listing = capsys.readouterr().out
    assert key_id in listing and "classify-user" in listing and classify_key not in listing
    assert cli(["keys", "revoke", "ffffffffffff", "--data-dir", str(data)]) == 1
    assert "no API key 'ffffffffffff'" in capsys.readouterr().err


def test_keys_are_stored_hashed(secured) -> None:
    _, classify_key, admin_key, data = secured
    dump = "\n".join(sqlite3.connect(data / "medzero.db").iterdump())
    assert "api_keys" in dump
    for token in (classify_key, admin_key):
        assert token not in dump and token.split("_", 2)[2] not in dump


def test_openapi_shows_the_security_schemes(secured) -> None:
    client, *_ = secured
    schema = client.get("/openapi.json").json()
    schemes = schema["components"]["securitySchemes"]
    assert schemes["bearer"]["scheme"] == "bearer" and schemes["apiKey"]["name"] == "X-API-Key"
    assert {"bearer": []} in schema["paths"]["/classify"]["post"]["security"]
    assert "security" not in schema["paths"]["/healthz"]["get"]


def test_the_environment_admin_key_works_beside_stored_keys(tmp_path: Path) -> None:
    with running_app(tiny_settings(tmp_path, auth="keys", admin_api_key="s3cret-from-env")) as client:
        assert classify(client, {"X-API-Key": "s3cret-from-env"}).status_code == 200
        assert client.post("/labels", json=NEW_LABEL_SET, headers={"X-API-Key": "s3cret-from-env"}) \
            .status_code == 201
        assert classify(client, {"X-API-Key": "s3cret-from-en"}).status_code == 401


def test_with_auth_off_everything_is_open_except_a_configured_admin_key(tmp_path: Path) -> None:
    with running_app(tiny_settings(tmp_path, admin_api_key="k")) as client:
        assert classify(client, {}).status_code == 200
        assert client.post("/labels", json=NEW_LABEL_SET).status_code == 401
        assert client.post("/labels", json=NEW_LABEL_SET, headers={"X-API-Key": "k"}).status_code == 201
