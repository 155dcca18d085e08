"""kill -9 mid-queue: every instance the server acknowledged over STOW-RS is classified exactly once after a
restart."""
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from pydicom.uid import generate_uid

from app.storage.db import create_db_engine
from app.storage.inbox import InboxRepository
from tests.api.test_dicomweb import REFERENCED, in_study, multipart
from tests.conftest import free_port, server_env, wait_ready

pytestmark = pytest.mark.e2e


def serve(tmp_path: Path, port: int, log_name: str) -> subprocess.Popen:
    env = server_env(tmp_path / "data", port, MEDZERO_DICOM_ROUTES_FILE=str(tmp_path / "routes.yaml"))
    log = open(tmp_path / log_name, "wb")
    return subprocess.Popen([sys.executable, "-m", "app", "serve"], env=env, stdout=log, stderr=subprocess.STDOUT)


def test_acknowledged_instances_survive_kill_9(tmp_path: Path) -> None:
    (tmp_path / "routes.yaml").write_text("rules: [{name: all, modality: [DX], label_set: chest-xray-pneumonia}]")
    study, port = generate_uid(), free_port()
    server = serve(tmp_path, port, "first.log")
    try:
        base = wait_ready(f"http://127.0.0.1:{port}", server, timeout_seconds=120)
        body, headers = multipart([in_study(study, rows=600 + i, columns=500) for i in range(48)])
        answer = httpx.post(f"{base}/dicomweb/studies", content=body, headers=headers, timeout=60)
        assert answer.status_code == 200
        acknowledged = {item["00081155"]["Value"][0] for item in answer.json()[REFERENCED]["Value"]}
        server.send_signal(signal.SIGKILL)        # at once: the worker has 48 acknowledged instances to go
        server.wait(timeout=30)
    finally:
        if server.poll() is None:
            server.kill()
    inbox = InboxRepository(create_db_engine(f"sqlite:///{tmp_path / 'data' / 'medzero.db'}"))
    assert inbox.waiting() > 0, "the first server finished everything before the kill: nothing was tested"
    server = serve(tmp_path, port, "second.log")
    try:
        base = wait_ready(f"http://127.0.0.1:{port}", server, timeout_seconds=120)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            results = httpx.get(f"{base}/results", params={"study": study, "limit": 1000}).json()["data"]
            if len(results) >= len(acknowledged):
                break
            time.sleep(0.2)
        time.sleep(1)                              # nothing more may arrive: each instance once
        results = httpx.get(f"{base}/results", params={"study": study, "limit": 1000}).json()["data"]
        sops = [r["sop_instance_uid"] for r in results]
        assert len(acknowledged) == 48
        assert sorted(sops) == sorted(acknowledged)
    finally:
        server.terminate()
        server.wait(timeout=30)
