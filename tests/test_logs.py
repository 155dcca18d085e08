"""Request ids on every answer, the JSON log format, and audit records of admin actions."""
import json
import logging
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app.logs import REQUEST_ID, JsonFormatter, RequestIdFilter
from tests.conftest import running_app, tiny_settings

BODY = {"name": "knee", "modality": "xray", "classes": [{"name": "normal"}, {"name": "arthritis"}]}


def test_every_answer_has_a_request_id(client: TestClient) -> None:
    fresh = client.get("/labels")
    assert len(fresh.headers["x-request-id"]) == 32
    assert client.get("/labels").headers["x-request-id"] != fresh.headers["x-request-id"]
    assert client.get("/labels", headers={"X-Request-ID": "abc-123.x_y"}).headers["x-request-id"] == "abc-123.x_y"
    for hostile in ("a b", "x" * 65, "a/b", ""):
        assert client.get("/labels", headers={"X-Request-ID": hostile}).headers["x-request-id"] != hostile
    missing = client.get("/labels/nope")
    assert missing.status_code == 404 and missing.headers["x-request-id"]
    assert client.get("/nowhere").headers["x-request-id"]


def test_json_formatter_writes_one_object_with_the_request_id_and_extras() -> None:
    record = logging.LogRecord("medzero.x", logging.WARNING, __file__, 1, "hello %s", ("there",), None)
    record.audit = {"key_id": "k"}
    token = REQUEST_ID.set("r-1")
    try:
        RequestIdFilter().filter(record)
    finally:
        REQUEST_ID.reset(token)
    entry = json.loads(JsonFormatter().format(record))
    assert entry["message"] == "hello there" and entry["level"] == "warning" and entry["logger"] == "medzero.x"
    assert entry["request_id"] == "r-1" and entry["audit"] == {"key_id": "k"} and entry["time"].endswith("+00:00")


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []
        self.addFilter(RequestIdFilter())

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def audit_records():
    handler, logger = Records(), logging.getLogger("medzero.audit")
    logger.addHandler(handler)
    previous = logger.level
    logger.setLevel(logging.INFO)
    try:
        yield handler.records
    finally:
        logger.removeHandler(handler)
        logger.setLevel(previous)


def test_admin_actions_are_audited_with_who_what_and_outcome(tmp_path: Path, audit_records) -> None:
    with running_app(tiny_settings(tmp_path, auth="keys")) as client:
        runtime = client.app.state.runtime
        admin, admin_token = runtime.api_keys.create("alice", "admin")
        _, classify_token = runtime.api_keys.create("gateway", "classify")
        created = client.post("/labels", json=BODY, headers={"Authorization": f"Bearer {admin_token}"})
        duplicate = client.post("/labels", json=BODY, headers={"X-API-Key": admin_token})
        client.get("/labels", headers={"X-API-Key": classify_token})                      # a read: not audited
        client.post("/labels", json={**BODY, "name": "x"}, headers={"X-API-Key": classify_token})   # 403
    assert [r.audit["status"] for r in audit_records] == [201, 409]
    first = audit_records[0]
    assert first.audit == {"key_id": admin.id, "key_name": "alice", "method": "POST", "path": "/labels",
                           "status": 201}
    assert first.request_id == created.headers["x-request-id"]
    assert audit_records[1].request_id == duplicate.headers["x-request-id"]
    assert all(admin_token not in r.getMessage() and classify_token not in r.getMessage() for r in audit_records)
