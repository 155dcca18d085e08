"""The offline jobs as a user runs them: `medzero kb build`, `medzero kpl fit`, then the server uses the fit."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import free_port, running_app, server_env, tiny_settings
from tests.factories import png_bytes

pytestmark = pytest.mark.e2e


def medzero(*args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "app", *args], env=env, capture_output=True, text=True, timeout=300)


def test_kb_build_then_kpl_fit_then_serve(tmp_path: Path) -> None:
    env = server_env(tmp_path / "data", free_port(), MEDZERO_MAX_UPLOAD_BYTES="200000")
    built = medzero("kb", "build", "--no-progress", env=env)
    assert built.returncode == 0, built.stderr
    manifest = json.loads(built.stdout)
    assert manifest["model_id"] == "medzero-tiny" and manifest["count"] > 1000
    assert Path(manifest["path"], "descriptions.faiss").is_file()

    images = tmp_path / "pool"
    images.mkdir()
    for i in range(6):
        (images / f"{i}.png").write_bytes(png_bytes(width=40 + 9 * i, height=50))
    (images / "notes.png").write_bytes(b"not an image")
    (images / "huge.png").write_bytes(bytes(300_000))        # over the upload limit, as it would be over HTTP
    fitted = medzero("kpl", "fit", "--label-set", "chest-xray-pneumonia", "--images", str(images),
                     "--kpl-balancing", "sinkhorn", "--class-prior", "normal=2,pneumonia=1", "--no-progress", env=env)
    assert fitted.returncode == 0, fitted.stderr
    assert "KPL fit v1 of chest-xray-pneumonia v1" in fitted.stdout and "6 images" in fitted.stdout
    assert "balancing=sinkhorn" in fitted.stdout and "skipped 2 files" in fitted.stdout
    assert f"{images / 'huge.png'} (payload_too_large)" in fitted.stdout          # the HTTP route's errors, per file
    assert f"{images / 'notes.png'} (invalid_image)" in fitted.stdout

    with running_app(tiny_settings(tmp_path / "data")) as client:
        fit = client.get("/labels/chest-xray-pneumonia/kpl").json()
        assert fit["pool_size"] == 6 and fit["config"]["balancing"] == "sinkhorn"
        assert fit["config"]["class_prior"] == {"normal": 2.0, "pneumonia": 1.0}
        answer = client.post("/classify", data={"label_set": "chest-xray-pneumonia", "method": "kpl"},
                             files={"file": ("x.png", png_bytes())}).json()
        assert answer["predictions"][0]["evidence"]["proxy"] == "fitted"


def test_job_errors_are_one_line(tmp_path: Path) -> None:
    env = server_env(tmp_path / "data", free_port())
    missing = medzero("kpl", "fit", "--label-set", "nope", "--images", str(tmp_path), env=env)
    assert missing.returncode == 1 and "no images" in missing.stderr and "Traceback" not in missing.stderr
    (tmp_path / "a.png").write_bytes(png_bytes())
    unknown = medzero("kpl", "fit", "--label-set", "nope", "--images", str(tmp_path), "--no-progress", env=env)
    assert unknown.returncode == 1 and "no label set named 'nope'" in unknown.stderr
    unconfigured = medzero("kb", "generate", "--label-set", "ham10000", env=env)
    assert unconfigured.returncode == 1 and "MEDZERO_LLM_URL" in unconfigured.stderr
