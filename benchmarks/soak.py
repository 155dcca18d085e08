"""N minutes of mixed traffic against a real server with auth on: requests, statuses, latency per kind, and the
server's resident memory after warm-up and at the end (the goal: no growth beyond a few percent).

`python -m app serve` runs as a subprocess on a free loopback port (temporary MEDZERO_DATA_DIR, MEDZERO_AUTH=keys
with an admin key from `medzero keys create`, no rate limit unless --rate-limit-per-minute). --clients concurrent
clients (one httpx.AsyncClient, `Authorization: Bearer <key>`) each draw their next request from a weighted mix
until the time is up:

- good: POST /classify (PNG, and real DICOM from ../shared/data/dicom), POST /classify/batch, /classify against a
  soak-owned label set that the label writes keep replacing (PUT), deleting (DELETE) and re-creating (POST),
  GET /labels, /results and /metrics;
- a classify request may also be shed under load: 503 `overloaded` with Retry-After counts as expected (the status
  table shows how many);
- bad, their 4xx expected: corrupt bytes (422), refused formats and bodies that are not multipart (415 / 422), an
  unknown label set (404), a body over MEDZERO_MAX_UPLOAD_BYTES (413), no key or a wrong one (401).

The first --warmup-seconds are the same traffic, reported apart. Then the server's VmRSS, VmHWM, threads and open
file descriptors are read from /proc/<pid> at the start, every --sample-seconds and at the end. Exit status 1 on
any unexpected answer (every 5xx, a transport error, a refusal where a success was expected), RSS growth past
--max-rss-growth-percent, or a server that died.

    .venv/bin/python benchmarks/soak.py                                   # tiny random-init model, 30 s + 10 min
    .venv/bin/python benchmarks/soak.py --minutes 1 --warmup-seconds 10   # quick look
    .venv/bin/python benchmarks/soak.py --minutes 60 --model-name ViT-B-16 --pretrained openai --device cuda
"""
import argparse
import asyncio
import dataclasses
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
from accuracy import cpu_flags, model_parser  # benchmarks/accuracy.py, beside this script
from throughput import (  # benchmarks/throughput.py
    DEFAULT_DATA_DIR,
    REQUEST_TIMEOUT_SECONDS,
    benchmark_images,
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
DEFAULT_DICOM_DIR = REPO_ROOT.parent / "shared" / "data" / "dicom"
SOAK_LABEL_SET = "soak-labels"              # created, replaced, deleted and re-created by the label writes
UNKNOWN_LABEL_SET = "soak-no-such-label-set"
DELETE_SHARE = 0.1                          # label writes that delete the soak label set; the next one re-creates it
SOAK_CLASSES = ("normal", "pneumonia", "effusion", "cardiomegaly", "nodule", "pneumothorax", "atelectasis")
MIB = 2**20

# kind -> weight in the mix; label writes pick POST, PUT or DELETE from the soak label set's state
MIX = {"classify png": 30, "classify dicom": 10, "classify batch": 6, "classify soak label set": 8, "label write": 4,
       "GET /labels": 6, "GET /results": 4, "GET /metrics": 4, "bad: corrupt bytes": 4, "bad: wrong type": 4,
       "bad: unknown label set": 3, "bad: oversized body": 1, "bad: no or wrong key": 2}


@dataclass(frozen=True)
class Outcome:
    kind: str
    expected: bool
    status: int | None        # None: no answer (transport error)
    code: str                 # the error body's code, "batch items failed: ...", a transport error's name, or ""
    seconds: float | None     # None for transport errors
    warmup: bool = False


@dataclass
class ProcSample:
    elapsed_seconds: float
    rss_kib: int
    hwm_kib: int
    threads: int
    open_fds: int
    data_dir_bytes: int
    requests: int             # measured requests answered so far


@dataclass
class Payloads:
    pngs: list[bytes]
    dicoms: list[bytes]
    png_source: str
    dicom_source: str
    oversized: list[bytes]    # one file just over MEDZERO_MAX_UPLOAD_BYTES, one over the whole body's limit too


class Traffic:
    """The request kinds; each sends one request and says what came back and whether that was expected."""

    def __init__(self, client: httpx.AsyncClient, token: str, payloads: Payloads, label_sets: list[str],
                 methods: list[str], batch_files: int) -> None:
        self.client = client
        self.auth = {"Authorization": f"Bearer {token}"}
        self.payloads = payloads
        self.label_sets = label_sets          # built-in ones, for the good classify requests
        self.methods = methods
        self.batch_files = batch_files
        self.label_lock = asyncio.Lock()      # one label write at a time, so each one's answer is known in advance
        self.label_exists = True              # created before the traffic starts
        self.label_version = 1
        self.kinds: dict[str, Callable[[random.Random], Awaitable[Outcome]]] = {
            "classify png": self.classify_png, "classify dicom": self.classify_dicom,
            "classify batch": self.classify_batch, "classify soak label set": self.classify_soak_label_set,
            "label write": self.write_label_set, "GET /labels": self.get_labels, "GET /results": self.get_results,
            "GET /metrics": self.get_metrics, "bad: corrupt bytes": self.corrupt_bytes,
            "bad: wrong type": self.wrong_type, "bad: unknown label set": self.unknown_label_set,
            "bad: oversized body": self.oversized_body, "bad: no or wrong key": self.no_or_wrong_key}
        if not payloads.dicoms:
            del self.kinds["classify dicom"]

    async def send(self, kind: str, expected: set[int], method: str, url: str, *, auth: bool = True,
                   **request: object) -> Outcome:
        headers = {**(self.auth if auth else {}), **request.pop("headers", {})}
        started = time.perf_counter()
        try:
            response = await self.client.request(method, url, headers=headers, **request)
        except httpx.HTTPError as exc:
            return Outcome(kind, False, None, type(exc).__name__, None)
        seconds = time.perf_counter() - started
        code, ok = error_code(response), response.status_code in expected
        if kind.startswith("classify") and shed(response, code):
            ok = True     # admission refusing what the encoder cannot take now: the documented answer under load
        if ok and url == "/classify/batch" and response.status_code == 200:
            failed = [item["error"]["code"] for item in response.json()["results"] if item.get("error")]
            if failed:   # every file is a good image: a per-file error is as unexpected as a refused request
                code, ok = "batch items failed: " + ", ".join(f"{n}× {c}" for c, n in Counter(failed).items()), False
        return Outcome(kind, ok, response.status_code, code, seconds)

    def image_form(self, rng: random.Random, label_set: str) -> dict[str, str]:
        return {"label_set": label_set, "method": rng.choice(self.methods)}

    async def classify_png(self, rng: random.Random) -> Outcome:
        files = {"file": ("image.png", rng.choice(self.payloads.pngs), "image/png")}
        return await self.send("classify png", {200}, "POST", "/classify", files=files,
                               data=self.image_form(rng, rng.choice(self.label_sets)))

    async def classify_dicom(self, rng: random.Random) -> Outcome:
        files = {"file": ("image.dcm", rng.choice(self.payloads.dicoms), "application/dicom")}
        return await self.send("classify dicom", {200}, "POST", "/classify", files=files,
                               data=self.image_form(rng, rng.choice(self.label_sets)))

    async def classify_batch(self, rng: random.Random) -> Outcome:
        chosen = [("image.png", data, "image/png") for data in rng.sample(self.payloads.pngs,
                                                                          min(self.batch_files, len(self.payloads.pngs)))]
        if self.payloads.dicoms and rng.random() < 0.5:
            chosen[0] = ("image.dcm", rng.choice(self.payloads.dicoms), "application/dicom")
        return await self.send("classify batch", {200}, "POST", "/classify/batch",
                               files=[("files", item) for item in chosen],
                               data=self.image_form(rng, rng.choice(self.label_sets)))

    async def classify_soak_label_set(self, rng: random.Random) -> Outcome:
        """Against the label set the writes keep changing: 404 while it is deleted."""
        files = {"file": ("image.png", rng.choice(self.payloads.pngs), "image/png")}
        return await self.send("classify soak label set", {200, 404}, "POST", "/classify", files=files,
                               data=self.image_form(rng, SOAK_LABEL_SET))

    async def write_label_set(self, rng: random.Random) -> Outcome:
        async with self.label_lock:
            if not self.label_exists:
                outcome = await self.send("POST /labels", {201}, "POST", "/labels", json=self.label_body(rng))
                self.label_exists = outcome.status == 201 or self.label_exists
            elif rng.random() < DELETE_SHARE:
                outcome = await self.send("DELETE /labels/{name}", {204}, "DELETE", f"/labels/{SOAK_LABEL_SET}")
                self.label_exists = outcome.status != 204 and self.label_exists
            else:
                outcome = await self.send("PUT /labels/{name}", {200}, "PUT", f"/labels/{SOAK_LABEL_SET}",
                                          json=self.label_body(rng))
            return outcome

    def label_body(self, rng: random.Random) -> dict:
        """A new version each time: other classes, synonyms and descriptions (embedded and indexed anew)."""
        self.label_version += 1
        classes = rng.sample(SOAK_CLASSES, rng.randint(2, len(SOAK_CLASSES)))
        return {"name": SOAK_LABEL_SET, "modality": "chest-xray", "description": f"soak v{self.label_version}",
                "classes": [{"name": name, "synonyms": [f"{name} finding {self.label_version}"],
                             "descriptions": [f"{name} seen on a chest radiograph, variant {self.label_version}.{i}"
                                              for i in range(rng.randint(1, 4))]} for name in classes]}

    async def get_labels(self, rng: random.Random) -> Outcome:
        return await self.send("GET /labels", {200}, "GET", "/labels")

    async def get_results(self, rng: random.Random) -> Outcome:
        return await self.send("GET /results", {200}, "GET", "/results", params={"limit": 100})

    async def get_metrics(self, rng: random.Random) -> Outcome:
        return await self.send("GET /metrics", {200}, "GET", "/metrics")

    async def corrupt_bytes(self, rng: random.Random) -> Outcome:
        real = rng.choice(self.payloads.pngs)
        data = rng.choice([b"\x89PNG\r\n\x1a\n" + rng.randbytes(4096),      # a PNG signature, then noise
                           real[:len(real) // 2],                           # a truncated real PNG
                           rng.randbytes(4096)])                            # noise
        return await self.send("bad: corrupt bytes", {422}, "POST", "/classify",
                               files={"file": ("image.png", data, "image/png")},
                               data={"label_set": rng.choice(self.label_sets)})

    async def wrong_type(self, rng: random.Random) -> Outcome:
        label_set = rng.choice(self.label_sets)
        variant = rng.randrange(3)
        if variant == 0:   # a refused format under an image name: 415
            data = rng.choice([b"GIF89a" + rng.randbytes(512), b"%PDF-1.7\n" + rng.randbytes(512)])
            return await self.send("bad: wrong type", {415}, "POST", "/classify",
                                   files={"file": ("image.png", data, "image/png")}, data={"label_set": label_set})
        if variant == 1:   # JSON where a multipart upload belongs: 422
            return await self.send("bad: wrong type", {422}, "POST", "/classify", json={"label_set": label_set})
        return await self.send("bad: wrong type", {422}, "POST", "/labels", content=b"name=x&modality=y",   # a form
                               headers={"Content-Type": "application/x-www-form-urlencoded"})

    async def unknown_label_set(self, rng: random.Random) -> Outcome:
        if rng.random() < 0.5:
            return await self.send("bad: unknown label set", {404}, "GET", f"/labels/{UNKNOWN_LABEL_SET}")
        files = {"file": ("image.png", rng.choice(self.payloads.pngs), "image/png")}
        return await self.send("bad: unknown label set", {404}, "POST", "/classify", files=files,
                               data={"label_set": UNKNOWN_LABEL_SET})

    async def oversized_body(self, rng: random.Random) -> Outcome:
        files = {"file": ("image.png", rng.choice(self.payloads.oversized), "image/png")}
        return await self.send("bad: oversized body", {413}, "POST", "/classify", files=files,
                               data={"label_set": rng.choice(self.label_sets)})

    async def no_or_wrong_key(self, rng: random.Random) -> Outcome:
        headers = {"Authorization": "Bearer mzk_not-a-key"} if rng.random() < 0.5 else {}
        return await self.send("bad: no or wrong key", {401}, "GET", "/labels", auth=False, headers=headers)


def shed(response: httpx.Response, code: str) -> bool:
    """A 503 `overloaded` with Retry-After: the bounded queue (MEDZERO_MAX_IN_FLIGHT_IMAGES, the batch-body limit)
    turning a request away quickly instead of letting it wait."""
    return response.status_code == 503 and code == "overloaded" and int(response.headers.get("Retry-After", 0)) >= 1


def error_code(response: httpx.Response) -> str:
    if response.status_code < 400:
        return ""
    try:
        return str(response.json()["error"]["code"])
    except (ValueError, KeyError, TypeError):
        return "(no error body)"


# -- the server process

def proc_sample(pid: int, data_dir: Path, elapsed_seconds: float, requests: int) -> ProcSample:
    status = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        status[key] = value.split()[0] if value.split() else ""
    data_dir_bytes = sum(path.stat().st_size for path in data_dir.rglob("*") if path.is_file())
    return ProcSample(elapsed_seconds, int(status["VmRSS"]), int(status["VmHWM"]), int(status["Threads"]),
                      len(os.listdir(f"/proc/{pid}/fd")), data_dir_bytes, requests)


def create_admin_key(env: dict[str, str], data_dir: Path) -> str:
    """`medzero keys create --scope admin` against the server's data dir; the key is the line it prints last."""
    made = subprocess.run([sys.executable, "-m", "app", "keys", "create", "--name", "soak", "--scope", "admin",
                           "--data-dir", str(data_dir)], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          check=False)
    if made.returncode != 0:
        raise SystemExit(f"medzero keys create failed ({made.returncode}):\n{made.stdout}{made.stderr}")
    return made.stdout.strip().splitlines()[-1]


# -- the run

async def soak(args: argparse.Namespace, base_url: str, server: subprocess.Popen, token: str, payloads: Payloads,
               data_dir: Path) -> tuple[list[Outcome], list[ProcSample], float]:
    """Warm-up, then the measured window; returns every outcome, the /proc samples and the measured seconds."""
    limits = httpx.Limits(max_connections=args.clients, max_keepalive_connections=args.clients)
    async with httpx.AsyncClient(base_url=base_url, limits=limits, timeout=REQUEST_TIMEOUT_SECONDS) as client:
        auth = {"Authorization": f"Bearer {token}"}
        listed = (await client.get("/labels", headers=auth)).raise_for_status().json()["data"]
        label_sets = [ls["name"] for ls in listed if ls["builtin"]]
        methods = [m for m in args.methods if m in (await client.get("/readyz")).json()["methods"]]
        if not label_sets or not methods:
            raise SystemExit(f"nothing to classify with: built-in label sets {label_sets}, methods {methods}")
        traffic = Traffic(client, token, payloads, label_sets, methods, args.batch_files)
        created = await client.post("/labels", json=traffic.label_body(random.Random(args.seed)), headers=auth)
        if created.status_code != 201:
            raise SystemExit(f"POST /labels of the soak label set answered {created.status_code}: {created.text}")

        names = [kind for kind in MIX if kind in traffic.kinds]
        weights = [MIX[kind] for kind in names]
        outcomes: list[Outcome] = []
        samples: list[ProcSample] = []
        stop = asyncio.Event()
        warming = True
        measured_started = 0.0

        async def client_loop(index: int) -> None:
            rng = random.Random(args.seed * 1000 + index)
            while not stop.is_set():
                during_warmup = warming   # a request belongs to the phase it started in
                outcome = await traffic.kinds[rng.choices(names, weights)[0]](rng)
                outcomes.append(dataclasses.replace(outcome, warmup=during_warmup))

        def measured() -> int:
            return sum(not o.warmup for o in outcomes)

        total_seconds = args.warmup_seconds + args.minutes * 60
        bar = tqdm(total=round(total_seconds), desc="soak warm-up", unit="s", file=sys.stderr,
                   bar_format="{desc}: {percentage:3.0f}%|{bar}| {n}/{total} s [{elapsed}<{remaining}]{postfix}")
        clients = [asyncio.create_task(client_loop(index)) for index in range(args.clients)]
        started = time.monotonic()
        next_sample = None
        try:
            while (elapsed := time.monotonic() - started) < total_seconds:
                if server.poll() is not None:
                    raise SystemExit(f"the server died during the soak (exit {server.returncode})")
                if warming and elapsed >= args.warmup_seconds:
                    warming, measured_started = False, time.monotonic()
                    samples.append(proc_sample(server.pid, data_dir, 0.0, 0))
                    next_sample = measured_started + args.sample_seconds
                    bar.set_description("soak")
                elif next_sample is not None and time.monotonic() >= next_sample:
                    samples.append(proc_sample(server.pid, data_dir, time.monotonic() - measured_started, measured()))
                    next_sample += args.sample_seconds
                unexpected = sum(not o.expected for o in outcomes)
                bar.set_postfix_str(f"{len(outcomes)} requests, {unexpected} unexpected")
                bar.update(min(round(elapsed), bar.total) - bar.n)
                await asyncio.sleep(min(1.0, max(0.0, total_seconds - elapsed)))
            bar.update(bar.total - bar.n)
        finally:
            stop.set()
            await asyncio.gather(*clients, return_exceptions=True)   # in-flight requests finish
            bar.close()
        measured_seconds = time.monotonic() - measured_started
        if server.poll() is not None:
            raise SystemExit(f"the server died during the soak (exit {server.returncode})")
        samples.append(proc_sample(server.pid, data_dir, measured_seconds, measured()))
        return outcomes, samples, measured_seconds


def load_payloads(args: argparse.Namespace) -> Payloads:
    pngs, png_source = benchmark_images(args.data_dir, args.images)
    dicom_paths = sorted(args.dicom_dir.glob("*.dcm")) if args.dicom_dir.is_dir() else []
    dicoms = [path.read_bytes() for path in dicom_paths]
    if dicoms:
        dicom_source = f"{len(dicoms)} real DICOM files from {args.dicom_dir}"
    else:
        dicom_source = f"no DICOM (no *.dcm in {args.dicom_dir}): the `classify dicom` kind is left out"
    largest = max(len(data) for data in pngs + dicoms)
    if largest > args.max_upload_bytes:
        raise SystemExit(f"--max-upload-bytes {args.max_upload_bytes} is below the largest image ({largest} bytes)")
    # refused by the bounded read (the file), and by the body-size middleware from Content-Length (the request)
    oversized = [b"\x89PNG\r\n\x1a\n" + bytes(size) for size in (args.max_upload_bytes, args.max_upload_bytes + MIB)]
    return Payloads(pngs, dicoms, png_source, dicom_source, oversized)


def run(args: argparse.Namespace, payloads: Payloads, work_dir: Path) -> tuple[dict, list[Outcome],
                                                                               list[ProcSample], float, list[str]]:
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    data_dir, log_path = work_dir / "data", work_dir / "server.log"
    env = {**server_env(args, data_dir, port), "MEDZERO_AUTH": "keys", "MEDZERO_LOG_FORMAT": "json",
           "MEDZERO_RATE_LIMIT_PER_MINUTE": str(args.rate_limit_per_minute),
           "MEDZERO_MAX_UPLOAD_BYTES": str(args.max_upload_bytes)}
    env.pop("MEDZERO_DATABASE_URL", None)    # the database lives in the temporary data dir
    token = create_admin_key(env, data_dir)
    with open(log_path, "wb") as log:
        server = subprocess.Popen([sys.executable, "-m", "app", "serve"], cwd=REPO_ROOT, stdout=log,
                                  stderr=subprocess.STDOUT, env=env)
    try:
        readiness = wait_ready(base_url, server, log_path)
        outcomes, samples, seconds = asyncio.run(soak(args, base_url, server, token, payloads, data_dir))
        return readiness, outcomes, samples, seconds, error_log_lines(log_path)
    except BaseException:
        progress(f"server log tail:\n{tail(log_path)}")
        raise
    finally:
        stop_server(server)
        if server.returncode not in (0, -signal.SIGTERM, -signal.SIGINT):
            progress(f"server exited with {server.returncode}; its log:\n{tail(log_path)}")


# -- report

def percentiles_ms(seconds: list[float]) -> str:
    if not seconds:
        return "– | – | –"
    return " | ".join(f"{np.percentile(seconds, q) * 1000:.1f}" for q in (50, 95, 99))


def format_kind_table(outcomes: list[Outcome], seconds: float) -> str:
    lines = ["| kind | requests | req/s | expected | unexpected | p50 ms | p95 ms | p99 ms |",
             "|---|--:|--:|--:|--:|--:|--:|--:|"]
    kinds = sorted({o.kind for o in outcomes}, key=lambda kind: (kind.startswith("bad:"), kind))
    for kind in [*kinds, "all"]:
        rows = [o for o in outcomes if kind in ("all", o.kind)]
        expected = sum(o.expected for o in rows)
        name = "**all**" if kind == "all" else kind
        latencies = [o.seconds for o in rows if o.seconds is not None]
        lines.append(f"| {name} | {len(rows)} | {len(rows) / seconds:.1f} | {expected} | {len(rows) - expected} "
                     f"| {percentiles_ms(latencies)} |")
    return "\n".join(lines)


def format_status_table(outcomes: list[Outcome]) -> str:
    counts = Counter((o.kind, o.status, o.code, o.expected) for o in outcomes)
    lines = ["| kind | status | error code | count | expected |", "|---|--:|---|--:|---|"]
    for (kind, status, code, expected), count in sorted(counts.items(), key=lambda item: (
            item[0][0].startswith("bad:"), item[0][0], item[0][1] or 0, item[0][2])):
        shown = "no answer" if status is None else str(status)
        if status is not None and status >= 500:
            shown = f"**{status}**"
        lines.append(f"| {kind} | {shown} | {code or '–'} | {count} | {'yes' if expected else '**NO**'} |")
    return "\n".join(lines)


def format_memory_table(samples: list[ProcSample]) -> str:
    lines = ["| after warm-up | VmRSS MiB | VmHWM MiB | threads | open fds | data dir MiB | requests |",
             "|--:|--:|--:|--:|--:|--:|--:|"]
    for sample in samples:
        lines.append(f"| {sample.elapsed_seconds:.0f} s | {sample.rss_kib / 1024:.1f} | {sample.hwm_kib / 1024:.1f} "
                     f"| {sample.threads} | {sample.open_fds} | {sample.data_dir_bytes / MIB:.1f} "
                     f"| {sample.requests} |")
    return "\n".join(lines)


def progress(message: str) -> None:
    print(f"[soak] {message}", file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = model_parser(__doc__)
    parser.add_argument("--precision", default="fp32", choices=("fp32", "fp16", "bf16"))
    parser.add_argument("--batch-size", type=int, default=32, help="MEDZERO_MAX_BATCH_SIZE")
    parser.add_argument("--minutes", type=float, default=10.0, help="measured minutes, after the warm-up")
    parser.add_argument("--warmup-seconds", type=float, default=30.0,
                        help="the same traffic before the first RSS reading, reported apart")
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients")
    parser.add_argument("--sample-seconds", type=float, default=60.0, help="seconds between /proc readings")
    parser.add_argument("--max-rss-growth-percent", type=float, default=5.0,
                        help="VmRSS growth from the first reading to the last above which the exit status is 1")
    parser.add_argument("--methods", default="zeroshot,kpl",
                        help="comma-separated methods the good classify requests draw from (those the server has)")
    parser.add_argument("--batch-files", type=int, default=8, help="files per /classify/batch request")
    parser.add_argument("--images", type=int, default=64, help="PNG payloads to draw from")
    parser.add_argument("--data-dir", type=Path,
                        help=f"<dataset>/<class>/*.png images (default {DEFAULT_DATA_DIR} if present, "
                             "else synthesised images)")
    parser.add_argument("--dicom-dir", type=Path, default=DEFAULT_DICOM_DIR, help="*.dcm files (left out if none)")
    parser.add_argument("--max-upload-bytes", type=int, default=8 * MIB,
                        help="the server's MEDZERO_MAX_UPLOAD_BYTES; the oversized body is just past it")
    parser.add_argument("--rate-limit-per-minute", type=int, default=0,
                        help="the server's MEDZERO_RATE_LIMIT_PER_MINUTE (0: none; the soak key would hit it)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if args.minutes <= 0 or args.warmup_seconds < 0 or args.clients < 1 or args.sample_seconds <= 0:
        parser.error("--minutes, --clients and --sample-seconds must be positive, --warmup-seconds not negative")
    if args.batch_files < 1 or args.images < 1:
        parser.error("--batch-files and --images must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    load_average = os.getloadavg()[0]   # other work on the machine skews every latency below
    payloads = load_payloads(args)
    with tempfile.TemporaryDirectory(prefix="medzero-soak-") as work_dir:
        progress(f"starting the server ({args.model_name}, auth on)")
        readiness, outcomes, samples, seconds, error_lines = run(args, payloads, Path(work_dir))

    measured = [o for o in outcomes if not o.warmup]
    warmup = [o for o in outcomes if o.warmup]
    weights = "random" if readiness.get("pretrained_weights") is False else "pretrained"
    print(f"model `{readiness.get('model')}` ({weights} weights) on {readiness.get('device')}, {args.precision}; "
          f"methods {', '.join(args.methods)}; {args.clients} clients; {args.warmup_seconds:.0f} s warm-up + "
          f"{seconds:.0f} s measured; auth on (admin key, Bearer), rate limit "
          f"{args.rate_limit_per_minute or 'off'}; MEDZERO_MAX_UPLOAD_BYTES={args.max_upload_bytes}")
    print(f"{payloads.png_source}; {payloads.dicom_source}; {os.cpu_count()} CPUs, load average {load_average:.1f} "
          f"at start, {os.getloadavg()[0]:.1f} at end; clients and server share this machine, loopback only")
    print(cpu_flags())
    print()
    print(f"Measured window: {len(measured)} requests, {len(measured) / seconds:.1f} req/s.")
    print()
    print(format_kind_table(measured, seconds))
    print()
    print(format_status_table(measured))
    print()
    print(format_memory_table(samples))
    print()

    first, last = samples[0], samples[-1]
    growth = 100 * (last.rss_kib - first.rss_kib) / first.rss_kib
    print(f"VmRSS {first.rss_kib / 1024:.1f} MiB after warm-up → {last.rss_kib / 1024:.1f} MiB at the end: "
          f"{growth:+.1f} % (limit {args.max_rss_growth_percent:g} %); peak (VmHWM) {last.hwm_kib / 1024:.1f} MiB"
          f"{' (reached during the soak)' if last.hwm_kib > first.hwm_kib else ' (reached before the soak)'}")
    failures = []
    if growth > args.max_rss_growth_percent:
        failures.append(f"VmRSS grew {growth:.1f} %, over {args.max_rss_growth_percent:g} %")
    unexpected = [o for o in outcomes if not o.expected]
    server_errors = [o for o in outcomes if not o.expected and (o.status is None or o.status >= 500)]
    warmup_unexpected = sum(not o.expected for o in warmup)
    print(f"Warm-up: {len(warmup)} requests, {warmup_unexpected} unexpected (in the tables below if any).")
    if unexpected:
        failures.append(f"{len(unexpected)} unexpected answers ({len(server_errors)} 5xx or no answer)")
    if server_errors:
        print()
        print(f"**{len(server_errors)} REQUESTS GOT A 5xx OR NO ANSWER** (warm-up included):")
        print()
        print(format_status_table(server_errors))
    elif warmup_unexpected:
        print()
        print(format_status_table([o for o in warmup if not o.expected]))
    if error_lines:
        failures.append(f"{len(error_lines)} error records in the server log")
        print()
        print(f"**{len(error_lines)} error records in the server log**; the first:")
        print("\n".join(line[:2000] for line in error_lines[:3]))
    print()
    print("Result: " + ("FAILED: " + "; ".join(failures) if failures else "no unexpected answers, RSS within limit"))
    return 1 if failures else 0


if __name__ == "__main__":
    run_script(main, progress)
