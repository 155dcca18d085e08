"""Two `medzero serve` processes on one PostgreSQL database, as two replicas behind a load balancer: what one is
told, the other knows at its next request (label sets and their descriptions in its own index, KPL fits, the
routing table, a revoked key), and instances sent to both are each classified exactly once."""
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from pydicom.uid import generate_uid

from tests.api.test_dicomweb import REFERENCED, in_study, multipart
from tests.api.test_kpl import pool
from tests.conftest import free_port, server_env, wait_ready
from tests.factories import png_bytes

pytestmark = pytest.mark.e2e
KNEE = {"name": "knee", "modality": "knee-xray", "classes": [
    {"name": "normal", "descriptions": ["a uniform joint space", "smooth articular surfaces"]},
    {"name": "oa", "descriptions": ["osteophytes at the joint margins"]}]}


def make_key(env: dict[str, str], scope: str) -> tuple[str, str]:
    made = subprocess.run([sys.executable, "-m", "app", "keys", "create", "--name", f"replicas-{scope}",
                           "--scope", scope], env=env, capture_output=True, text=True, check=True)
    token = made.stdout.strip().splitlines()[-1]
    return token.split("_")[1], token


@pytest.fixture
def replicas(tmp_path: Path, postgres) -> Iterator[tuple[httpx.Client, httpx.Client, dict[str, str]]]:
    """Replicas a and b (own data dirs, one database); yields a client for each (admin key) and the env."""
    database_url = postgres.create_database()
    # both import one routes file as they start together: the first table, and the built-ins, stored once
    (tmp_path / "routes.yaml").write_text("rules: [{name: radiographs, modality: [CR], label_set: chest-xray-pneumonia}]")
    servers, clients = [], []
    try:
        for name in ("a", "b"):
            port = free_port()
            env = server_env(tmp_path / name, port, MEDZERO_DATABASE_URL=database_url, MEDZERO_AUTH="keys",
                             MEDZERO_REPLICA_ID=f"replica-{name}", MEDZERO_RATE_LIMIT_PER_MINUTE="0",
                             MEDZERO_DICOM_ROUTES_FILE=str(tmp_path / "routes.yaml"))
            if name == "a":
                _, admin = make_key(env, "admin")       # one key table: the key works on both
            with open(tmp_path / f"{name}.log", "wb") as log:     # the child keeps its own descriptor
                servers.append(subprocess.Popen([sys.executable, "-m", "app", "serve"], env=env, stdout=log,
                                                stderr=subprocess.STDOUT))
            clients.append(httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60,
                                        headers={"Authorization": f"Bearer {admin}"}))
        for server, client in zip(servers, clients, strict=True):
            wait_ready(str(client.base_url), server, timeout_seconds=180)
        yield clients[0], clients[1], env
    finally:
        for server in servers:
            server.terminate()
        for server in servers:
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()
        for client in clients:
            client.close()


def kpl_evidence(client: httpx.Client, label_set: str) -> dict[str, set[str]]:
    answer = client.post("/classify", data={"label_set": label_set, "method": "kpl"},
                         files={"file": ("x.png", png_bytes())})
    assert answer.status_code == 200, answer.text
    return {p["label"]: {d["text"] for d in p["evidence"]["descriptions"]} for p in answer.json()["predictions"]}


def test_label_sets_and_their_descriptions_follow_across_replicas(replicas) -> None:
    a, b, _ = replicas
    assert b.get("/labels/knee").status_code == 404
    assert kpl_evidence(b, "chest-xray-pneumonia")      # b has a cached head and index before a writes

    assert a.post("/labels", json=KNEE).status_code == 201
    # b's own description index has a's label set: KPL there retrieves its descriptions
    assert kpl_evidence(b, "knee") == {"normal": {"a uniform joint space", "smooth articular surfaces"},
                                       "oa": {"osteophytes at the joint margins"}}
    updated = {**KNEE, "classes": [{"name": "normal", "descriptions": ["joint space preserved"]},
                                   {"name": "oa", "descriptions": ["joint space narrowing"]},
                                   {"name": "fracture", "descriptions": ["a cortical break"]}]}
    assert a.put("/labels/knee", json=updated).json()["version"] == 2
    assert kpl_evidence(b, "knee") == {"normal": {"joint space preserved"}, "oa": {"joint space narrowing"},
                                       "fracture": {"a cortical break"}}

    # deleted and created again on a: version 1 anew, newer than b's version 2 by its creation time
    assert a.delete("/labels/knee").status_code == 204
    assert b.post("/classify", data={"label_set": "knee"}, files={"file": ("x.png", png_bytes())}).status_code == 404
    assert a.post("/labels", json=KNEE).json()["version"] == 1
    assert kpl_evidence(b, "knee")["oa"] == {"osteophytes at the joint margins"}


def test_a_fit_a_route_and_a_revocation_made_on_one_replica_hold_on_the_other(replicas) -> None:
    a, b, env = replicas
    fitted = a.post("/labels/chest-xray-pneumonia/kpl", files=pool(6))
    assert fitted.status_code == 201, fitted.text
    answer = b.post("/classify", data={"label_set": "chest-xray-pneumonia", "method": "kpl"},
                    files={"file": ("x.png", png_bytes())}).json()
    assert answer["method_details"]["fit_version"] == fitted.json()["fit_version"]
    assert all(p["evidence"]["proxy"] == "fitted" for p in answer["predictions"])

    rules = [{"name": "all", "modality": ["DX"], "label_set": "chest-xray-pneumonia"}]
    assert a.put("/routes", json={"rules": rules}).status_code == 200
    assert [rule["name"] for rule in b.get("/routes").json()["rules"]] == ["all"]

    key_id, token = make_key(env, "classify")
    as_classify = {"Authorization": f"Bearer {token}"}
    assert b.get("/results", headers=as_classify).status_code == 200
    subprocess.run([sys.executable, "-m", "app", "keys", "revoke", key_id], env=env, check=True, capture_output=True)
    for replica in (a, b):
        refused = replica.get("/results", headers=as_classify)
        assert refused.status_code == 401 and refused.json()["error"]["code"] == "unauthorized"


def test_instances_sent_to_both_replicas_are_each_classified_once(replicas) -> None:
    a, b, _ = replicas
    rules = [{"name": "all", "modality": ["DX"], "label_set": "chest-xray-pneumonia"}]
    assert a.put("/routes", json={"rules": rules}).status_code == 200
    study = generate_uid()
    instances = [in_study(study, rows=64 + i, columns=64) for i in range(24)]
    acknowledged = set()
    # a gets the first 16, b the last 16: 8 are sent to both (a client retrying on the other replica)
    for replica, part in ((a, instances[:16]), (b, instances[8:])):
        body, headers = multipart(part)
        answer = replica.post("/dicomweb/studies", content=body, headers=headers)
        assert answer.status_code == 200, answer.text
        acknowledged |= {item["00081155"]["Value"][0] for item in answer.json()[REFERENCED]["Value"]}
    assert len(acknowledged) == 24

    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        results = a.get("/results", params={"study": study, "limit": 1000}).json()["data"]
        if len(results) >= 24:
            break
        time.sleep(0.3)
    time.sleep(1.5)                                   # nothing more may arrive: each instance once
    for replica in (a, b):
        sops = [r["sop_instance_uid"] for r in replica.get("/results", params={"study": study, "limit": 1000})
                .json()["data"]]
        assert sorted(sops) == sorted(acknowledged)
