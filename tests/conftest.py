"""Shared fixtures: the real app with the tiny random-init model, a real SQLite file under tmp_path."""
import os
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from app.settings import Settings

TINY_MODEL = "medzero-tiny"


def tiny_settings(data_dir: Path, **overrides) -> Settings:
    values = dict(data_dir=data_dir, model_name=TINY_MODEL, max_wait_ms=2.0, log_level="warning")
    return Settings(**{**values, **overrides})


def tiny_model_env(data_dir: Path) -> dict[str, str]:
    """The same configuration as `tiny_settings`, as a server process reads it."""
    return {"MEDZERO_DATA_DIR": str(data_dir), "MEDZERO_MODEL_NAME": TINY_MODEL, "MEDZERO_LOG_LEVEL": "warning",
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
