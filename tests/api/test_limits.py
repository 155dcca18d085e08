"""Per-key rate limits (429 + Retry-After), per-request time limits (408 for a stalled body, 503 for an answer not
ready) and CORS (off unless origins are named)."""
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import uvicorn

from app.api.limits import MAX_TRACKED_KEYS, RateLimiter
from app.errors import RateLimited
from app.main import create_app
from tests.api.test_auth import LABEL_SET, classify, create_key
from tests.conftest import encoder_thread_held, free_port, running_app, tiny_settings
from tests.factories import png_bytes


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_token_bucket_allows_the_burst_then_the_rate() -> None:
    clock = Clock()
    limiter = RateLimiter(per_minute=60, burst=3, clock=clock)
    for _ in range(3):
        limiter.take("a")
    with pytest.raises(RateLimited) as refused:
        limiter.take("a")
    assert refused.value.retry_after_seconds == 1 and refused.value.status_code == 429
    limiter.take("b")                      # another key has its own allowance
    clock.now = 0.5
    with pytest.raises(RateLimited):
        limiter.take("a")
    clock.now = 1.0                        # one token a second comes back
    limiter.take("a")
    clock.now = 100.0                      # an idle key saves up to the burst, not more
    for _ in range(3):
        limiter.take("a")
    with pytest.raises(RateLimited):
        limiter.take("a")


def test_zero_means_no_limit_and_idle_keys_are_forgotten() -> None:
    unlimited = RateLimiter(per_minute=0, burst=1)
    for _ in range(100):
        unlimited.take("a")
    clock = Clock()
    limiter = RateLimiter(per_minute=60, burst=2, clock=clock)
    for i in range(MAX_TRACKED_KEYS):
        limiter.take(f"key-{i}")
    clock.now = 10.0                       # every bucket has refilled: none needs remembering
    limiter.take("newcomer")
    assert len(limiter._buckets) == 1


def test_a_key_past_its_rate_gets_429_with_retry_after(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data = tmp_path / "data"
    first, second = create_key(data, "admin", capsys), create_key(data, "classify", capsys)
    with running_app(tiny_settings(data, auth="keys", rate_limit_per_minute=6, rate_limit_burst=3)) as client:
        # an admin route checks the key twice (classify, then admin) but counts once
        assert client.get("/labels", headers={"X-API-Key": first}).status_code == 200
        assert client.delete("/labels/absent", headers={"X-API-Key": first}).status_code == 404
        assert classify(client, {"X-API-Key": first}).status_code == 200
        refused = classify(client, {"X-API-Key": first})
        assert refused.status_code == 429
        assert refused.json()["error"]["code"] == "rate_limited"
        assert int(refused.headers["Retry-After"]) == 10 and "MEDZERO_RATE_LIMIT_PER_MINUTE" in refused.text
        assert classify(client, {"X-API-Key": second}).status_code == 200   # per key
        assert client.get("/readyz").status_code == 200                    # probes are never limited
        assert client.get("/labels").status_code == 401                    # no key: 401 before any limit


def test_an_answer_not_ready_in_time_is_503_and_the_server_carries_on(tmp_path: Path) -> None:
    with running_app(tiny_settings(tmp_path, request_timeout_seconds=0.5)) as client:
        with encoder_thread_held(client):
            started = time.monotonic()
            late = client.post("/classify", data={"label_set": LABEL_SET}, files={"file": ("x.png", png_bytes())})
            assert time.monotonic() - started < 5
        assert late.status_code == 503 and late.json()["error"]["code"] == "processing_timeout"
        assert late.headers["Retry-After"] == "5"
        answered = client.post("/classify", data={"label_set": LABEL_SET}, files={"file": ("x.png", png_bytes())})
        assert answered.status_code == 200
        assert client.app.state.runtime.admission.images_in_flight == 0          # the timed-out request's permit is back


@contextmanager
def served(settings) -> Iterator[str]:
    """The app behind a real uvicorn socket in this process (a stalled body needs a real connection)."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    try:
        yield base
    finally:
        server.should_exit = True
        thread.join(30)


def test_a_stalled_body_is_408(tmp_path: Path) -> None:
    with served(tiny_settings(tmp_path, request_timeout_seconds=1.0)) as base:
        port = int(base.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=10) as stalled:
            stalled.sendall(b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n"
                            b"Content-Type: multipart/form-data; boundary=b\r\n\r\n--b\r\n")
            answer = b""
            while b"\r\n\r\n" not in answer:
                chunk = stalled.recv(4096)
                if not chunk:
                    break
                answer += chunk
        status_line = answer.split(b"\r\n", 1)[0]
        assert b" 408 " in status_line, answer
        assert b"request_timeout" in answer or b"Content-Length" in answer
        assert httpx.get(f"{base}/labels", timeout=10).status_code == 200


def test_cors_is_off_by_default_and_follows_the_named_origins(tmp_path: Path) -> None:
    preflight = {"Origin": "https://viewer.example", "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization"}
    with running_app(tiny_settings(tmp_path / "closed")) as client:
        assert "access-control-allow-origin" not in client.options("/classify", headers=preflight).headers
        assert "access-control-allow-origin" not in client.get("/labels", headers=preflight).headers
    with running_app(tiny_settings(tmp_path / "open", cors_origins="https://viewer.example")) as client:
        allowed = client.options("/classify", headers=preflight)
        assert allowed.status_code == 200
        assert allowed.headers["access-control-allow-origin"] == "https://viewer.example"
        assert "authorization" in allowed.headers["access-control-allow-headers"].lower()
        listed = client.get("/labels", headers={"Origin": "https://viewer.example"})
        assert listed.headers["access-control-allow-origin"] == "https://viewer.example"
        assert "x-request-id" in listed.headers["access-control-expose-headers"].lower()
        other = client.options("/classify", headers={**preflight, "Origin": "https://elsewhere.example"})
        assert "access-control-allow-origin" not in other.headers
