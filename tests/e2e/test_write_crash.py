"""kill -9 in the middle of label-set writes and KPL fits: after a restart every acknowledged write is there, each
label set reads back whole as one of the versions written (never a mix), and the saved description index and the
fits load (nothing half-written)."""
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.api.test_kpl import pool
from tests.conftest import free_port, server_env, wait_ready
from tests.factories import png_bytes

pytestmark = pytest.mark.e2e
NAME = "crash-labels"


def spec(version: int) -> dict:
    """The body of write number `version`: its own classes and descriptions, so a mixed read-back shows."""
    classes = [{"name": f"c{version}-{i}", "descriptions": [f"write {version} class {i} text {j}" for j in range(3)]}
               for i in range(2 + version % 3)]
    return {"name": NAME, "modality": "chest-xray", "description": f"write {version}", "classes": classes}


def serve(tmp_path: Path, port: int, log_name: str) -> subprocess.Popen:
    with open(tmp_path / log_name, "wb") as log:
        return subprocess.Popen([sys.executable, "-m", "app", "serve"], env=server_env(tmp_path / "data", port),
                                stdout=log, stderr=subprocess.STDOUT)


def test_acknowledged_label_set_writes_and_fits_survive_kill_9(tmp_path: Path) -> None:
    port = free_port()
    server = serve(tmp_path, port, "first.log")
    label_acks: list[int] = []           # write numbers the server answered 2xx
    fit_acks: list[int] = []             # fit versions the server answered 201
    stop = threading.Event()

    def write_label_sets(base: str) -> None:
        with httpx.Client(base_url=base, timeout=60) as client:
            assert client.post("/labels", json=spec(1)).status_code == 201
            label_acks.append(1)
            version = 1
            while not stop.is_set():
                version += 1
                try:
                    if client.put(f"/labels/{NAME}", json=spec(version)).status_code == 200:
                        label_acks.append(version)
                except httpx.HTTPError:
                    return                # the server is gone

    def fit_kpl(base: str) -> None:
        with httpx.Client(base_url=base, timeout=60) as client:
            while not stop.is_set():
                try:
                    answer = client.post("/labels/chest-xray-pneumonia/kpl", files=pool(4))
                except httpx.HTTPError:
                    return
                if answer.status_code == 201:
                    fit_acks.append(answer.json()["fit_version"])

    try:
        base = wait_ready(f"http://127.0.0.1:{port}", server, timeout_seconds=120)
        writers = [threading.Thread(target=write_label_sets, args=(base,)),
                   threading.Thread(target=fit_kpl, args=(base,))]
        for writer in writers:
            writer.start()
        deadline = time.monotonic() + 120
        while (len(label_acks) < 6 or len(fit_acks) < 2) and time.monotonic() < deadline:
            time.sleep(0.05)
        server.send_signal(signal.SIGKILL)        # writes and a fit in flight
        server.wait(timeout=30)
        stop.set()
        for writer in writers:
            writer.join(timeout=60)
    finally:
        stop.set()
        if server.poll() is None:
            server.kill()
    assert len(label_acks) >= 6 and len(fit_acks) >= 2, (label_acks, fit_acks)

    server = serve(tmp_path, port, "second.log")
    try:
        base = wait_ready(f"http://127.0.0.1:{port}", server, timeout_seconds=120)
        with httpx.Client(base_url=base, timeout=60) as client:
            stored = client.get(f"/labels/{NAME}").json()
            # the last acknowledged write, or one after it that committed before the kill; never older
            written = int(stored["description"].removeprefix("write "))
            assert written >= label_acks[-1] and stored["version"] == written
            expected = spec(written)
            assert [c["name"] for c in stored["classes"]] == [c["name"] for c in expected["classes"]]
            assert all(c["descriptions"] == e["descriptions"] for c, e in zip(stored["classes"], expected["classes"],
                                                                               strict=True))
            # the description index followed that version: KPL retrieves exactly its descriptions
            answer = client.post("/classify", data={"label_set": NAME, "method": "kpl"},
                                 files={"file": ("x.png", png_bytes())})
            assert answer.status_code == 200, answer.text
            for prediction in answer.json()["predictions"]:
                texts = {d["text"] for d in prediction["evidence"]["descriptions"]}
                assert texts and all(text.startswith(f"write {written} ") for text in texts)

            fit = client.get("/labels/chest-xray-pneumonia/kpl").json()
            assert fit["fit_version"] >= fit_acks[-1]
            answer = client.post("/classify", data={"label_set": "chest-xray-pneumonia", "method": "kpl"},
                                 files={"file": ("x.png", png_bytes())}).json()
            assert answer["method_details"]["fit_version"] == fit["fit_version"]
    finally:
        server.terminate()
        server.wait(timeout=30)
