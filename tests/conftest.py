"""Shared fixtures: the real app with the tiny random-init model, a real SQLite file under tmp_path."""
import os
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from app.main import create_app
from app.settings import Settings

TINY_MODEL = "medzero-tiny"


def tiny_settings(data_dir: Path, **overrides) -> Settings:
    # the torch engine: MEDZERO_ENGINE=auto's probe is tested on its own (tests/encoders/test_engines.py)
    values = dict(data_dir=data_dir, model_name=TINY_MODEL, max_wait_ms=2.0, log_level="warning", auth="off",
                  engine="torch")
    return Settings(**{**values, **overrides})


def tiny_model_env(data_dir: Path) -> dict[str, str]:
    """The same configuration as `tiny_settings`, as a server process reads it."""
    return {"MEDZERO_DATA_DIR": str(data_dir), "MEDZERO_MODEL_NAME": TINY_MODEL, "MEDZERO_LOG_LEVEL": "warning",
            "MEDZERO_AUTH": "off", "MEDZERO_ENGINE": "torch",
            "PYTHONUNBUFFERED": "1"}


@contextmanager
def running_app(settings: Settings) -> Iterator[TestClient]:
    """The app with its lifespan running, once the model is loaded (or failed to load)."""
    with TestClient(create_app(settings)) as client:
        deadline = time.monotonic() + 120
        while client.app.state.runtime.state == "loading":
            assert time.monotonic() < deadline, "model did not load in 120 s"
            time.sleep(0.02)
        yield client


@pytest.fixture
def client(tmp_path: Path) -> Iterator[TestClient]:
    with running_app(tiny_settings(tmp_path)) as c:
        yield c


def metric(client: TestClient, name: str, **labels: str) -> float:
    """One sample of the app's /metrics exposition (0 when absent), as a scraper would read it."""
    for family in text_string_to_metric_families(client.get("/metrics").text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0


@contextmanager
def encoder_thread_held(client: TestClient) -> Iterator[threading.Event]:
    """Keeps the app's encoder thread busy (through the batcher's own run_sync) until the yielded event is set
    or the block ends: what a long forward would do, deterministically."""
    release, holding = threading.Event(), threading.Event()

    def hold() -> None:
        holding.set()
        release.wait(30)

    holder = threading.Thread(target=client.app.state.runtime.batcher.run_sync, args=(hold,))
    holder.start()
    holding.wait(10)
    try:
        yield release
    finally:
        release.set()
        holder.join()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(base_url: str, process: subprocess.Popen, timeout_seconds: float) -> str:
    deadline = time.monotonic() + timeout_seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"server exited with {process.returncode} before it was ready")
        try:
            if httpx.get(f"{base_url}/readyz", timeout=2).status_code == 200:
                return base_url
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"server not ready after {timeout_seconds} s")


def server_env(data_dir: Path, port: int, **extra: str) -> dict[str, str]:
    return {**os.environ, **tiny_model_env(data_dir), "MEDZERO_PORT": str(port), **extra}


@pytest.fixture(scope="session")
def postgres():
    """One real PostgreSQL server for the whole run (tests.postgres); each test makes its own database on it.
    Skips where Debian's postgresql package is missing, except under CI, which installs it (.ci/run)."""
    from tests.postgres import postgres_bin, postgres_server
    if postgres_bin() is None:
        if os.environ.get("CI"):
            pytest.fail("PostgreSQL is not installed; .ci/run installs Debian's postgresql package")
        pytest.skip("PostgreSQL is not installed (apt-get install postgresql)")
    with postgres_server() as server:
        yield server


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh, empty database on each backend medzero supports: a SQLite file, a PostgreSQL database."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'medzero.db'}"
    return request.getfixturevalue("postgres").create_database()
