"""Schemathesis against the service's own OpenAPI schema: `python -m app serve` as a real process (tiny model,
MEDZERO_AUTH=keys with an admin key from `medzero keys create`, no rate limit), every operation of /openapi.json,
a few requests each (examples, coverage and fuzzing phases). Every answer must be no 5xx, with a documented
status code, content type and body, and the server must log no error. `benchmarks/fuzz_api.py` is the longer run.

Most generated requests with a body are steered to ones the server can accept (real images, label-set and method
names; `steer`), so the 2xx answers of /classify, /labels/{name}/support, STOW-RS, ... are checked too, not only
the refusals of random bytes. DELETE operations run last, on the same server, so the fuzz does not delete the
label sets the rest of it classifies against; they must still answer cleanly whatever they remove (built-in
label sets included)."""
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import schemathesis
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families
from schemathesis.specs.openapi.schemas import OpenApiSchema

from app.main import create_app
from app.services.builtin_label_sets import BUILTIN_LABEL_SETS
from app.settings import Settings
from tests.conftest import TINY_MODEL, free_port, server_env, wait_ready
from tests.factories import jpeg_bytes, make_dicom_bytes, png_bytes, tiff_bytes

pytestmark = pytest.mark.e2e
MAX_EXAMPLES = 10                    # fuzzing requests per operation (coverage adds its own): ~1 min on 2 CPUs
SEED = 19
CHECKS = ("not_a_server_error", "status_code_conformance", "content_type_conformance",
          "response_schema_conformance")
LABEL_SETS = [spec.name for spec in BUILTIN_LABEL_SETS]
CLASS_NAMES = {spec.name: [c.name for c in spec.classes] for spec in BUILTIN_LABEL_SETS}
METHODS = ["zeroshot", "kpl", "fewshot", "meduna", "hica"]   # meduna, hica: 409 until an adapter is loaded
STOW_MEDIA_TYPE, STOW_BOUNDARY = "multipart/related", b"medzero-fuzz-part"
STEERED_SHARE = 0.5                  # of generated label-set and method names replaced by real ones
STEERED_CASES = 0.75                 # of generated requests with a body made acceptable (`steer`)


@dataclass(frozen=True)
class FuzzServer:
    base_url: str
    key: str
    process: subprocess.Popen
    log_path: Path


def fuzz_config(*, max_examples: int, seed: int) -> schemathesis.Config:
    """The four response checks only; no generated credentials (the key is sent with every call); real label-set
    and method names for the parameters that take one, part of the time (the rest stays generated)."""
    names = {"dictionary": "label-sets", "probability": STEERED_SHARE}
    methods = {"dictionary": "methods", "probability": STEERED_SHARE}
    return schemathesis.Config.from_dict({
        "seed": seed,
        "generation": {"max-examples": max_examples, "database": "none", "with-security-parameters": False},
        "phases": {"examples": {"enabled": True}, "coverage": {"enabled": True}, "fuzzing": {"enabled": True}},
        "checks": {"enabled": False, **{name: {"enabled": True} for name in CHECKS}},
        "dictionaries": {"label-sets": {"values": LABEL_SETS}, "methods": {"values": METHODS}},
        "parameters": {"path.name": names, "query.label_set": names, "body.label_set": names,
                       "path.method": methods, "query.method": methods, "body.method": methods},
    })


def service_schema() -> dict:
    """The OpenAPI document the server serves, built from the same code without starting it (tests collect it
    before the server runs; `test_served_schema_is_the_fuzzed_one` checks they are equal)."""
    return create_app(Settings(data_dir=Path("unused"), model_name=TINY_MODEL, auth="keys")).openapi()


def real_images() -> list[bytes]:
    return [png_bytes(), png_bytes(width=224, height=224, mode="L"), jpeg_bytes(), tiff_bytes(),
            make_dicom_bytes(), make_dicom_bytes(photometric="MONOCHROME1")]


def steer_cases(schema: OpenApiSchema, images: list[bytes]) -> None:
    """Most of the time a generated request with a body is made one the server can accept: real images in `file`
    / `files` (and as the DICOM parts of a STOW-RS body), a real label set and method to classify with, no form
    field sent as the string "null" (a form has no null), method options only with method=fewshot, a class name of
    the label set per support image, the path's name in a PUT body, unique class names and default templates (a
    generated template rarely holds its `{}`). The rest of the request stays as generated."""

    @schema.hook
    def flatmap_case(context: schemathesis.HookContext, case: schemathesis.Case) -> st.SearchStrategy:
        if not isinstance(case.body, dict) and case.media_type != STOW_MEDIA_TYPE:
            return st.just(case)
        return st.tuples(st.floats(0, 1), st.lists(st.sampled_from(images), min_size=1, max_size=4),
                         st.sampled_from(LABEL_SETS), st.sampled_from(METHODS)).map(
            lambda drawn: steer(case, images=drawn[1], label_set=drawn[2], method=drawn[3])
            if drawn[0] < STEERED_CASES else case)


def steer(case: schemathesis.Case, *, images: list[bytes], label_set: str, method: str) -> schemathesis.Case:
    if case.media_type == STOW_MEDIA_TYPE:                  # the images as DICOM parts (not all of them are DICOM)
        case.body = b"".join(b"--%s\r\nContent-Type: application/dicom\r\n\r\n%s\r\n" % (STOW_BOUNDARY, image)
                             for image in images) + b"--%s--\r\n" % STOW_BOUNDARY
        case.headers = {**(case.headers or {}), "Content-Type": f'{STOW_MEDIA_TYPE}; type="application/dicom"; '
                                                                f"boundary={STOW_BOUNDARY.decode()}"}
        return case
    body = {key: value for key, value in case.body.items() if value is not None}
    query = dict(case.query or {})
    name = (case.path_parameters or {}).get("name")
    if "file" in body:
        body["file"] = images[0]
    if "files" in body:
        body["files"] = images
        body.pop("folder", None)                            # a KPL pool is files or a folder
    if "label_set" in body or "label_set" in query:         # /classify: the form's wins over the query's
        (body if "label_set" in body else query)["label_set"] = label_set
        if "method" in body or "method" in query:
            (body if "method" in body else query)["method"] = method
    if "classes" in body and name in CLASS_NAMES:           # POST /labels/{name}/support
        body["classes"] = [CLASS_NAMES[name][i % len(CLASS_NAMES[name])] for i in range(len(images))]
    elif "classes" in body and "modality" in body:          # a label set: class names unique, default templates
        if isinstance(body["classes"], list):
            body["classes"] = list({str(c.get("name")) if isinstance(c, dict) else repr(c): c
                                    for c in body["classes"]}.values())
        body.pop("templates", None)
        if name is not None:
            body["name"] = name
    if (body.get("method") or query.get("method")) != "fewshot":
        for option in ("cache_alpha", "cache_beta", "cache_base"):
            body.pop(option, None)
            query.pop(option, None)
    case.body, case.query = body, query
    return case


@schemathesis.serializer(STOW_MEDIA_TYPE)
def raw_body(context: schemathesis.SerializationContext, value: object) -> bytes:
    """STOW-RS bodies go out as they are (schemathesis has no multipart/related encoder)."""
    data = getattr(value, "data", value)
    return data if isinstance(data, bytes) else str(data).encode()


def create_admin_key(env: dict[str, str], data_dir: Path) -> str:
    made = subprocess.run([sys.executable, "-m", "app", "keys", "create", "--name", "fuzz", "--scope", "admin",
                           "--data-dir", str(data_dir)], env=env, capture_output=True, text=True, check=False)
    assert made.returncode == 0, made.stdout + made.stderr
    return made.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FuzzServer]:
    data_dir = tmp_path_factory.mktemp("fuzz")
    port = free_port()
    env = server_env(data_dir, port, MEDZERO_AUTH="keys", MEDZERO_RATE_LIMIT_PER_MINUTE="0",
                     MEDZERO_LOG_FORMAT="json")
    env.pop("MEDZERO_DATABASE_URL", None)      # the database lives in the temporary data dir
    key = create_admin_key(env, data_dir)
    log_path = data_dir / "server.log"
    with open(log_path, "wb") as log:
        server = subprocess.Popen([sys.executable, "-m", "app", "serve"], env=env, stdout=log,
                                  stderr=subprocess.STDOUT)
    try:
        base_url = wait_ready(f"http://127.0.0.1:{port}", server, timeout_seconds=120)
        yield FuzzServer(base_url, key, server, log_path)
    finally:
        if server.poll() is None:
            server.terminate()
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()


@pytest.fixture(scope="module")
def auth_headers(fuzz_server: FuzzServer) -> dict[str, str]:
    return {"Authorization": f"Bearer {fuzz_server.key}", "X-API-Key": fuzz_server.key}


# loaded when the module is collected, before the server runs: the lazy loader (schemathesis.pytest.from_fixture)
# fails under pytest 9.2, which removed `Function._nodeid`; the calls go to the real server's base URL
schema = schemathesis.openapi.from_dict(service_schema(), config=fuzz_config(max_examples=MAX_EXAMPLES, seed=SEED))
steer_cases(schema, real_images())


def test_served_schema_is_the_fuzzed_one(fuzz_server: FuzzServer) -> None:
    assert httpx.get(f"{fuzz_server.base_url}/openapi.json", timeout=30).json() == service_schema()


@schema.exclude(method="DELETE").parametrize()
def test_operation_answers_as_documented(case: schemathesis.Case, fuzz_server: FuzzServer,
                                         auth_headers: dict[str, str]) -> None:
    case.call_and_validate(base_url=fuzz_server.base_url, headers=auth_headers, timeout=120)


def test_fuzz_reached_the_success_paths(fuzz_server: FuzzServer) -> None:
    """The steering works: the uploads were accepted some of the time, so their 2xx bodies were checked too."""
    answered: Counter = Counter()
    for family in text_string_to_metric_families(httpx.get(f"{fuzz_server.base_url}/metrics", timeout=30).text):
        for sample in family.samples:
            if sample.name == "medzero_requests_total" and sample.labels["status"].startswith("2"):
                answered[f"{sample.labels['method']} {sample.labels['endpoint']}"] += sample.value
    for operation in ("POST /classify", "POST /classify/batch", "POST /labels/{name}/support",
                      "POST /dicomweb/studies"):
        assert answered[operation] > 0, f"{operation} never succeeded: {sorted(answered.items())}"


@schema.include(method="DELETE").parametrize()
def test_delete_answers_as_documented(case: schemathesis.Case, fuzz_server: FuzzServer,
                                      auth_headers: dict[str, str]) -> None:
    """After the rest: deleting label sets (built-in ones too), fits, support sets, calibrations, adapters."""
    case.call_and_validate(base_url=fuzz_server.base_url, headers=auth_headers, timeout=120)


def test_deleted_built_in_label_sets_answer_404(fuzz_server: FuzzServer) -> None:
    """Whatever the fuzz removed, every built-in label set can be deleted and is then gone, cleanly."""
    auth = {"Authorization": f"Bearer {fuzz_server.key}"}
    with httpx.Client(base_url=fuzz_server.base_url, headers=auth, timeout=60) as client:
        for name in LABEL_SETS:
            assert client.delete(f"/labels/{name}").status_code in (204, 404)
            assert client.get(f"/labels/{name}").status_code == 404
            refused = client.post("/classify", data={"label_set": name}, files={"file": ("x.png", png_bytes())})
            assert refused.status_code == 404, refused.text
            assert refused.json()["error"]["code"] == "label_set_not_found"
        assert client.get("/labels").status_code == 200


def test_server_logged_no_errors_and_stops_cleanly(fuzz_server: FuzzServer) -> None:
    errors = [line for line in fuzz_server.log_path.read_text(errors="replace").splitlines()
              if '"level": "error"' in line or '"level": "critical"' in line]
    assert not errors, "\n".join(errors[:5])
    fuzz_server.process.terminate()
    assert fuzz_server.process.wait(timeout=30) in (0, -signal.SIGTERM)
