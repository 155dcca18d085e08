"""The `medzero` command as a user runs it: a real uvicorn process over real HTTP."""
import os
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.conftest import free_port, server_env, wait_ready
from tests.factories import make_dicom_bytes, png_bytes

pytestmark = pytest.mark.e2e


def test_server_process_serves_and_drains(tmp_path: Path) -> None:
    port = free_port()
    with open(tmp_path / "server.log", "wb") as log:
        server = subprocess.Popen([sys.executable, "-m", "app", "serve"], env=server_env(tmp_path, port),
                                  stdout=log, stderr=subprocess.STDOUT)
        try:
            base = wait_ready(f"http://127.0.0.1:{port}", server, timeout_seconds=120)
            assert httpx.get(f"{base}/labels").json()["count"] == 6

            def classify(i: int) -> httpx.Response:
                data = make_dicom_bytes(photometric="MONOCHROME1") if i % 2 else png_bytes(width=50 + i, height=60)
                return httpx.post(f"{base}/classify", data={"label_set": "chest-xray-pneumonia"},
                                  files={"file": ("x", data)}, timeout=60)

            with ThreadPoolExecutor(8) as pool:
                responses = list(pool.map(classify, range(16)))
            assert all(r.status_code == 200 for r in responses), [r.text for r in responses if r.status_code != 200]
            assert {r.json()["input_format"] for r in responses} == {"png", "dicom"}
            metrics = httpx.get(f"{base}/metrics").text
            assert 'medzero_requests_total{endpoint="/classify",method="POST",status="200"} 16.0' in metrics
        finally:
            server.send_signal(signal.SIGTERM)
            assert server.wait(timeout=60) in (0, -signal.SIGTERM)   # uvicorn drains, then re-raises SIGTERM


def test_unreachable_weights_are_one_clear_error(tmp_path: Path) -> None:
    env = {**server_env(tmp_path, free_port()), "MEDZERO_MODEL_NAME": "medzero-tiny",
           "MEDZERO_PRETRAINED": str(tmp_path / "missing.pt")}
    finished = subprocess.run([sys.executable, "-m", "app", "serve"], env=env, capture_output=True, timeout=120)
    assert finished.returncode == 2
    stderr = finished.stderr.decode()
    assert "medzero: cannot start: MEDZERO_PRETRAINED=" in stderr and "no such checkpoint file" in stderr
    assert "Traceback" not in stderr


def test_bad_configuration_is_one_clear_error(tmp_path: Path) -> None:
    env = {**os.environ, "MEDZERO_PORT": "not-a-port", "MEDZERO_DATA_DIR": str(tmp_path)}
    finished = subprocess.run([sys.executable, "-m", "app", "serve"], env=env, capture_output=True, timeout=60)
    assert finished.returncode == 2 and "port" in finished.stderr.decode() and "Traceback" not in finished.stderr.decode()
