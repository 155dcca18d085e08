"""The `medzero` command as a user runs it: a real uvicorn process over real HTTP (and a raw socket where the
wire itself is the point)."""
import asyncio
import io
import json
import os
import select
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from tests.api.test_dicomweb import multipart
from tests.conftest import free_port, server_env, wait_ready
from tests.factories import make_dicom_bytes, make_dicom_dataset, png_bytes, png_header_bytes

pytestmark = pytest.mark.e2e
MAX_UPLOAD_BYTES = 300_000


@contextmanager
def serving(tmp_path: Path, **env: str):
    port = free_port()
    with open(tmp_path / "server.log", "wb") as log:
        server = subprocess.Popen([sys.executable, "-m", "app", "serve"], env=server_env(tmp_path, port, **env),
                                  stdout=log, stderr=subprocess.STDOUT)
        try:
            yield server, wait_ready(f"http://127.0.0.1:{port}", server, timeout_seconds=120), port
        finally:
            if server.poll() is None:
                server.kill()
                server.wait(timeout=30)


def peak_rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM in /proc/<pid>/status")


def test_server_process_serves_real_http_and_stays_bounded(tmp_path: Path) -> None:
    with serving(tmp_path, MEDZERO_MAX_UPLOAD_BYTES=str(MAX_UPLOAD_BYTES)) as (server, base, port):
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

        # an aspect-ratio bomb: a few KB, 2 megapixels, but 10 x 200000 -- refused before the resize allocates
        baseline = peak_rss_bytes(server.pid)
        strip = png_header_bytes(width=10, height=200_000)
        refused = httpx.post(f"{base}/classify", data={"label_set": "chest-xray-pneumonia"},
                             files={"file": ("strip.png", strip)}, timeout=60)
        assert refused.status_code == 422 and refused.json()["error"]["code"] == "extreme_aspect_ratio"
        assert peak_rss_bytes(server.pid) - baseline < 256 * 2**20
        assert classify(0).status_code == 200

        # a chunked upload with no Content-Length is cut off at the limit, long before the client is done
        sent_chunks, answer = stream_until_answered(port, chunk_bytes=32_768, max_chunks=200)
        assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
        assert sent_chunks < 3 * MAX_UPLOAD_BYTES // 32_768
        assert httpx.get(f"{base}/healthz").status_code == 200


def test_an_early_refusal_reaches_a_client_still_sending_its_body(tmp_path: Path) -> None:
    """413s (from Content-Length, and from the bounded read of one file) amid ordinary requests on shared
    keep-alive connections: each client, still uploading megabytes, gets its JSON answer (the server reads the rest
    first), never a connection reset that loses the answer."""
    limit = 8 * 2**20
    oversized = [b"\x89PNG\r\n\x1a\n" + bytes(size) for size in (limit, limit + 2**20)]
    image = png_bytes(width=300, height=300)

    async def load(base: str) -> Counter:
        answers: Counter = Counter()
        async with httpx.AsyncClient(base_url=base, timeout=60, limits=httpx.Limits(max_connections=8)) as client:
            async def one_client(index: int) -> None:
                for turn in range(12):
                    data = oversized[(index + turn) % 2] if (index + turn) % 3 == 0 else image
                    try:
                        answer = await client.post("/classify", data={"label_set": "chest-xray-pneumonia"},
                                                   files={"file": ("x.png", data)})
                        outcome = str(answer.status_code)
                        if answer.status_code == 413:
                            outcome += " " + answer.json()["error"]["code"]
                    except httpx.HTTPError as exc:
                        outcome = type(exc).__name__
                    answers[("oversized" if len(data) > limit else "image", outcome)] += 1
            await asyncio.gather(*(one_client(index) for index in range(8)))
        return answers

    with serving(tmp_path, MEDZERO_MAX_UPLOAD_BYTES=str(limit)) as (_, base, _):
        answers = asyncio.run(load(base))
        assert answers == {("image", "200"): 64, ("oversized", "413 payload_too_large"): 32}, answers
        assert httpx.get(f"{base}/healthz").status_code == 200


def test_no_patient_identifier_reaches_the_logs_or_the_metrics(tmp_path: Path) -> None:
    """Instances with a patient's name, id and birth date (classified, refused, re-sent) and a /classify of one:
    none of the three appears in the info-level log or in /metrics."""
    (tmp_path / "routes.yaml").write_text("rules: [{name: all, modality: [DX], label_set: chest-xray-pneumonia}]")
    name, patient_id, birth_date = "Quenby^Wilhelmina", "PID-73519-X", "19410623"

    def instance(**options) -> tuple[bytes, str]:
        dataset = make_dicom_dataset(patient_name=name, **options)
        dataset.PatientID, dataset.PatientBirthDate = patient_id, birth_date
        buffer = io.BytesIO()
        dataset.save_as(buffer, enforce_file_format=True)
        return buffer.getvalue(), str(dataset.StudyInstanceUID)

    with serving(tmp_path, MEDZERO_LOG_LEVEL="debug", MEDZERO_DICOM_ROUTES_FILE=str(tmp_path / "routes.yaml")) as (
            _, base, _):
        classified, study = instance()
        unrouted, _ = instance(modality="MR")                  # stored, then skipped: no rule for MR
        unreadable = classified[:400]                          # the header, with the patient module, then nothing
        body, headers = multipart([classified, classified, unrouted, unreadable])
        assert httpx.post(f"{base}/dicomweb/studies", content=body, headers=headers, timeout=60).status_code in (200,
                                                                                                               202)
        answer = httpx.post(f"{base}/classify", data={"label_set": "chest-xray-pneumonia"},
                            files={"file": ("x.dcm", classified, "application/dicom")}, timeout=60)
        assert answer.status_code == 200
        deadline = time.monotonic() + 60
        while not httpx.get(f"{base}/results", params={"study": study}, timeout=10).json()["data"]:
            assert time.monotonic() < deadline, "the instance was never classified"
            time.sleep(0.2)
        metrics = httpx.get(f"{base}/metrics", timeout=10).text
    log = (tmp_path / "server.log").read_text(errors="replace")
    assert "/dicomweb/studies" in log and "received" in log          # the log did record these requests
    for identifier in (name, name.split("^")[0], patient_id, birth_date):
        assert identifier not in log, identifier
        assert identifier not in metrics, identifier


def stream_until_answered(port: int, *, chunk_bytes: int, max_chunks: int) -> tuple[int, bytes]:
    """POST /classify as chunked multipart, one chunk at a time, until the server answers; (chunks sent, answer)."""
    boundary = "medzero-boundary"
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"label_set\"\r\n\r\nchest-xray-pneumonia\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"big.png\"\r\n"
            "Content-Type: application/octet-stream\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(b"POST /classify HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n"
                     b"Content-Type: multipart/form-data; boundary=" + boundary.encode() + b"\r\n\r\n")
        sock.sendall(b"%x\r\n%s\r\n" % (len(head), head))
        sent = 0
        for sent in range(1, max_chunks + 1):
            try:
                sock.sendall(b"%x\r\n%s\r\n" % (chunk_bytes, bytes(chunk_bytes)))
            except OSError:                      # the server answered and closed while we were still sending
                break
            if select.select([sock], [], [], 0.05)[0]:
                break
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
            if b"\r\n\r\n" in answer:
                break
        return sent, answer


def test_more_load_than_the_encoder_takes_is_refused_fast_and_what_was_accepted_finishes(tmp_path: Path) -> None:
    """48 clients at once against 3 permits: each answer is a result or 503 `overloaded` with Retry-After, the
    accepted ones all finish, memory stays bounded, and the server serves normally afterwards."""
    with serving(tmp_path, MEDZERO_MAX_IN_FLIGHT_IMAGES="3") as (server, base, _):
        image = png_bytes(width=900, height=900)            # decode and resize take a while: permits stay held
        baseline = peak_rss_bytes(server.pid)

        def classify(_: int) -> httpx.Response:
            return httpx.post(f"{base}/classify", data={"label_set": "chest-xray-pneumonia"},
                              files={"file": ("x.png", image)}, timeout=120)

        with ThreadPoolExecutor(48) as pool:
            answers = list(pool.map(classify, range(96)))
        statuses = [a.status_code for a in answers]
        assert set(statuses) <= {200, 503}, [a.text for a in answers if a.status_code not in (200, 503)]
        refused = [a for a in answers if a.status_code == 503]
        assert refused and statuses.count(200) >= 3, statuses
        assert all(a.json()["error"]["code"] == "overloaded" and int(a.headers["Retry-After"]) >= 1 for a in refused)
        assert all(a.json()["predictions"] for a in answers if a.status_code == 200)
        assert peak_rss_bytes(server.pid) - baseline < 256 * 2**20     # refused bodies are not held
        assert classify(0).status_code == 200 and httpx.get(f"{base}/healthz").status_code == 200


def test_sigterm_drains_the_requests_in_flight(tmp_path: Path) -> None:
    """SIGTERM while KPL fits are running: each of them still gets its answer, then the process exits cleanly."""
    with serving(tmp_path, MEDZERO_KPL_PROXY_ITERS="20000") as (server, base, _):
        files = [("files", (f"{i}.png", png_bytes(width=40 + 3 * i, height=48))) for i in range(8)]

        def fit(_: int) -> httpx.Response:
            return httpx.post(f"{base}/labels/chest-xray-pneumonia/kpl", files=files, timeout=120)

        with ThreadPoolExecutor(3) as pool:
            fits = [pool.submit(fit, i) for i in range(3)]
            deadline = time.monotonic() + 60
            while in_progress(base) < 4:                         # the three fits and this scrape
                assert time.monotonic() < deadline, "the fits never were in flight together"
                assert not any(f.done() for f in fits), "a fit finished before SIGTERM; make the fits slower"
                time.sleep(0.02)
            server.send_signal(signal.SIGTERM)
            answers = [f.result() for f in fits]
        assert [a.status_code for a in answers] == [201, 201, 201], [a.text for a in answers]
        assert sorted(a.json()["fit_version"] for a in answers) == [1, 2, 3]
        assert server.wait(timeout=60) in (0, -signal.SIGTERM)   # uvicorn drains, then re-raises SIGTERM


def in_progress(base: str) -> float:
    for line in httpx.get(f"{base}/metrics", timeout=10).text.splitlines():
        if line.startswith("medzero_requests_in_progress "):
            return float(line.split()[1])
    return 0.0


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


def test_logs_are_json_lines_with_request_ids_and_an_audit_trail(tmp_path: Path) -> None:
    """`medzero serve` logs one JSON object per line; every request's lines carry the id its response names, and
    an admin write leaves an audit record naming the key (never the key itself)."""
    with serving(tmp_path, MEDZERO_LOG_LEVEL="info", MEDZERO_AUTH="keys",
                 MEDZERO_ADMIN_API_KEY="env-admin-secret") as (server, base, _):
        body = {"name": "knee", "modality": "xray", "classes": [{"name": "normal"}, {"name": "arthritis"}]}
        created = httpx.post(f"{base}/labels", json=body, headers={"X-API-Key": "env-admin-secret",
                                                                   "X-Request-ID": "ticket-4711"}, timeout=60)
        assert created.status_code == 201 and created.headers["x-request-id"] == "ticket-4711"
        refused = httpx.get(f"{base}/labels", timeout=30)
        assert refused.status_code == 401 and len(refused.headers["x-request-id"]) == 32
        time.sleep(0.5)
    text = (tmp_path / "server.log").read_text()
    entries = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
    assert entries and all({"time", "level", "logger", "message", "request_id"} <= set(e) for e in entries)
    audit = [e for e in entries if e["logger"] == "medzero.audit"]
    assert len(audit) == 1 and audit[0]["request_id"] == "ticket-4711"
    assert audit[0]["audit"] == {"key_id": "environment", "key_name": "MEDZERO_ADMIN_API_KEY", "method": "POST",
                                 "path": "/labels", "status": 201}
    access = [e for e in entries if e["logger"] == "uvicorn.access"]
    assert any(e["request_id"] == "ticket-4711" for e in access)
    assert "env-admin-secret" not in text
