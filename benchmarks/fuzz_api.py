"""Schemathesis against a real server's own OpenAPI schema, longer than the test suite's run: every operation,
--examples generated requests per operation in each generation mode (positive: valid by the schema; negative:
violating it), with the four response checks (no 5xx; documented status code, content type and body).

`python -m app serve` runs as a subprocess on a free loopback port (temporary MEDZERO_DATA_DIR, MEDZERO_AUTH=keys
with an admin key from `medzero keys create`, sent as `Authorization: Bearer` and `X-API-Key`, no rate limit). The
schema is the one the server serves at /openapi.json. Generation, checks and steering are the test suite's own,
imported from tests/api/test_openapi_fuzz.py so the two cannot drift: part of the time real label-set and method
names, real images (PNG, JPEG, TIFF, DICOM) in uploads and STOW-RS bodies, so the success paths are checked too.
DELETE operations run after all others, so the fuzz does not delete what the rest of it works on.

Prints a Markdown table per operation (requests sent, answers by status class, conformance failures) and the
distinct failures; exit status 1 on any 5xx, request without an answer, conformance failure or error record in
the server log.

    .venv/bin/python benchmarks/fuzz_api.py                            # tiny random-init model, 100 per mode
    .venv/bin/python benchmarks/fuzz_api.py --examples 20              # quick look, about a minute
    .venv/bin/python benchmarks/fuzz_api.py --examples 500 --seed 7 --model-name ViT-B-16 --pretrained openai
"""
import argparse
import os
import subprocess
import sys
import tempfile
import time
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import hypothesis
import requests
import schemathesis
from accuracy import cpu_flags, model_parser  # benchmarks/accuracy.py, beside this script
from hypothesis import HealthCheck, Phase
from hypothesis.errors import Unsatisfiable
from schemathesis.errors import FailureGroup
from throughput import (  # benchmarks/throughput.py
    error_log_lines,
    free_port,
    run_script,
    server_env,
    stop_server,
    tail,
    wait_ready,
)
from tqdm import tqdm

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))       # the test suite's fuzz configuration and steering, below
from tests.api.test_openapi_fuzz import create_admin_key, fuzz_config, real_images, steer_cases

MODES = (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE)
REQUEST_TIMEOUT_SECONDS = 120
MAX_LISTED_FAILURES = 30


@dataclass
class OperationStats:
    label: str
    sent: int = 0
    statuses: Counter = field(default_factory=Counter)      # "2xx", "4xx", "5xx", "no answer", ...
    failures: Counter = field(default_factory=Counter)      # failure title -> count
    examples: dict[str, str] = field(default_factory=dict)  # failure title -> the first one's status and message
    not_generated: list[str] = field(default_factory=list)  # modes that produced no request


def fuzz_operation(operation: schemathesis.APIOperation, mode: schemathesis.GenerationMode, stats: OperationStats,
                   *, base_url: str, session: requests.Session, auth: dict[str, str], examples: int,
                   seed: int) -> None:
    """Up to `examples` requests of one mode, each answer recorded and checked; failures are counted, not raised,
    so the run goes on (and nothing is shrunk)."""

    @hypothesis.settings(max_examples=examples, deadline=None, database=None, phases=[Phase.generate],
                         suppress_health_check=list(HealthCheck))
    @hypothesis.seed(seed)
    @hypothesis.given(case=operation.as_strategy(generation_mode=mode))
    def run(case: schemathesis.Case) -> None:
        stats.sent += 1
        try:
            response = case.call(base_url=base_url, session=session, headers=auth, timeout=REQUEST_TIMEOUT_SECONDS)
        except requests.RequestException as exc:
            stats.statuses["no answer"] += 1
            stats.examples.setdefault("no answer", type(exc).__name__)
            return
        stats.statuses[f"{response.status_code // 100}xx"] += 1
        try:
            case.validate_response(response, headers=auth)
        except FailureGroup as group:
            record_failures(stats, list(group.exceptions), response.status_code)
        except AssertionError as failure:        # one failed check: a schemathesis Failure
            record_failures(stats, [failure], response.status_code)

    try:
        run()
    except Unsatisfiable:           # no negative case for an operation without input, or only free-form strings
        stats.not_generated.append(mode.value)


def record_failures(stats: OperationStats, failures: list[AssertionError], status: int) -> None:
    for failure in failures:
        title = getattr(failure, "title", None) or type(failure).__name__
        stats.failures[title] += 1
        message = " ".join((getattr(failure, "message", None) or str(failure)).split())
        stats.examples.setdefault(title, f"{status}: {message[:300]}")


def fuzz(args: argparse.Namespace, base_url: str, key: str) -> list[OperationStats]:
    auth = {"Authorization": f"Bearer {key}", "X-API-Key": key}
    schema = schemathesis.openapi.from_url(f"{base_url}/openapi.json", headers=auth, timeout=30,
                                           config=fuzz_config(max_examples=args.examples, seed=args.seed))
    steer_cases(schema, real_images())
    operations = [result.ok() for result in schema.get_all_operations()]
    operations.sort(key=lambda operation: operation.method.upper() == "DELETE")   # stable: schema order otherwise
    results = []
    with requests.Session() as session:
        for operation in tqdm(operations, desc="fuzz", unit="operation", file=sys.stderr):
            stats = OperationStats(operation.label)
            for mode in MODES:
                seed = args.seed * 1_000_003 + zlib.crc32(f"{operation.label} {mode.value}".encode())
                fuzz_operation(operation, mode, stats, base_url=base_url, session=session, auth=auth,
                               examples=args.examples, seed=seed)
            results.append(stats)
    return results


def run_server(args: argparse.Namespace, work_dir: Path) -> tuple[dict, list[OperationStats], float, list[str]]:
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    data_dir, log_path = work_dir / "data", work_dir / "server.log"
    env = {**server_env(args, data_dir, port), "MEDZERO_AUTH": "keys", "MEDZERO_RATE_LIMIT_PER_MINUTE": "0",
           "MEDZERO_LOG_FORMAT": "json"}
    env.pop("MEDZERO_DATABASE_URL", None)    # the database lives in the temporary data dir
    key = create_admin_key(env, data_dir)
    with open(log_path, "wb") as log:
        server = subprocess.Popen([sys.executable, "-m", "app", "serve"], cwd=REPO_ROOT, stdout=log,
                                  stderr=subprocess.STDOUT, env=env)
    try:
        readiness = wait_ready(base_url, server, log_path)
        started = time.monotonic()
        results = fuzz(args, base_url, key)
        seconds = time.monotonic() - started
        if server.poll() is not None:
            raise SystemExit(f"the server died during the fuzz (exit {server.returncode}):\n{tail(log_path)}")
        return readiness, results, seconds, error_log_lines(log_path)
    except BaseException:
        progress(f"server log tail:\n{tail(log_path)}")
        raise
    finally:
        stop_server(server)


def format_table(results: list[OperationStats]) -> str:
    lines = ["| operation | sent | 2xx | 4xx | 5xx | other | check failures |", "|---|--:|--:|--:|--:|--:|--:|"]
    total = OperationStats("**total**")
    for stats in results:
        total.sent += stats.sent
        total.statuses.update(stats.statuses)
        total.failures.update(stats.failures)
    for stats in [*results, total]:
        other = sum(n for status, n in stats.statuses.items() if status not in ("2xx", "4xx", "5xx"))
        server_errors = stats.statuses["5xx"]
        failures = sum(stats.failures.values())
        lines.append(f"| {stats.label} | {stats.sent} | {stats.statuses['2xx']} | {stats.statuses['4xx']} "
                     f"| {f'**{server_errors}**' if server_errors else 0} | {f'**{other}**' if other else 0} "
                     f"| {f'**{failures}**' if failures else 0} |")
    return "\n".join(lines)


def format_failures(results: list[OperationStats]) -> str:
    lines = ["| operation | failure | count | first seen (status: message) |", "|---|---|--:|---|"]
    for stats in results:
        for title, count in stats.failures.most_common():
            lines.append(f"| {stats.label} | {title} | {count} | {stats.examples[title].replace('|', '/')} |")
        if stats.statuses["no answer"]:
            lines.append(f"| {stats.label} | no answer | {stats.statuses['no answer']} "
                         f"| {stats.examples['no answer']} |")
    return "\n".join(lines[:2 + MAX_LISTED_FAILURES])


def progress(message: str) -> None:
    print(f"[fuzz] {message}", file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = model_parser(__doc__)
    parser.add_argument("--precision", default="fp32", choices=("fp32", "fp16", "bf16"))
    parser.add_argument("--batch-size", type=int, default=32, help="MEDZERO_MAX_BATCH_SIZE")
    parser.add_argument("--examples", type=int, default=100,
                        help="generated requests per operation in each mode (positive, negative)")
    parser.add_argument("--seed", type=int, default=0, help="generation seed (the same seed sends the same requests)")
    args = parser.parse_args(argv)
    if args.examples < 1:
        parser.error("--examples must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    load_average = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="medzero-fuzz-") as work_dir:
        progress(f"starting the server ({args.model_name}, auth on)")
        readiness, results, seconds, error_lines = run_server(args, Path(work_dir))

    weights = "random" if readiness.get("pretrained_weights") is False else "pretrained"
    sent = sum(stats.sent for stats in results)
    print(f"model `{readiness.get('model')}` ({weights} weights) on {readiness.get('device')}, {args.precision}; "
          f"schemathesis {schemathesis.__version__}, hypothesis {hypothesis.__version__}; {len(results)} "
          f"operations, up to {args.examples} requests each per mode (positive, negative), seed {args.seed}; "
          f"auth on (admin key), rate limit off")
    print(f"{sent} requests in {seconds:.0f} s; {os.cpu_count()} CPUs, load average {load_average:.1f} at start, "
          f"{os.getloadavg()[0]:.1f} at end; client and server share this machine, loopback only")
    print(cpu_flags())
    print()
    print(format_table(results))
    for mode in MODES:
        if skipped := [stats.label for stats in results if mode.value in stats.not_generated]:
            print()
            print(f"No {mode.value} request exists for (nothing in them can violate the schema): "
                  + ", ".join(skipped))

    failures = []
    server_errors = sum(stats.statuses["5xx"] for stats in results)
    no_answer = sum(stats.statuses["no answer"] for stats in results)
    conformance = sum(sum(stats.failures.values()) for stats in results)
    if server_errors:
        failures.append(f"{server_errors} 5xx answers")
    if no_answer:
        failures.append(f"{no_answer} requests without an answer")
    if conformance:
        failures.append(f"{conformance} check failures")
    if conformance or no_answer:
        print()
        print(format_failures(results))
    if error_lines:
        failures.append(f"{len(error_lines)} error records in the server log")
        print()
        print(f"**{len(error_lines)} error records in the server log**; the first:")
        print("\n".join(line[:2000] for line in error_lines[:3]))
    print()
    print("Result: " + ("FAILED: " + "; ".join(failures) if failures else
                        "no 5xx, every answer as documented, no error in the server log"))
    return 1 if failures else 0


if __name__ == "__main__":
    run_script(main, progress)
