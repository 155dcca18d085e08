"""Raw batched encoder forward (img/s) vs the same images through the HTTP server under N concurrent clients.

Same model, precision and device on both paths:

1. raw: `load_encoder(Settings(...))` exactly as the server loads it; the images decoded with the server's
   `decode_image` and `encoder.preprocess`; `encoder.encode_images` timed over pre-stacked batches after a
   warm-up ("raw encode"), and once more including decode + preprocess ("raw end-to-end");
2. HTTP: `python -m app serve` as a subprocess on a free loopback port (temporary MEDZERO_DATA_DIR, same
   MEDZERO_MAX_BATCH_SIZE as --batch-size), N concurrent clients posting the same PNG bytes to /classify until
   every image is done, then one run through /classify/batch. The server's /metrics is read around each run,
   so the mean images per encoder forward (medzero_encoder_batch_size_sum / _count) shows the micro-batching.

Prints a Markdown table with the ratios HTTP / raw. Run from the repository root:

    .venv/bin/python benchmarks/throughput.py                       # tiny random-init model, CPU
    .venv/bin/python benchmarks/throughput.py --model-name ViT-B-16 --pretrained openai --device cuda
"""
import argparse
import asyncio
import gc
import itertools
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path

import httpx
import numpy as np
import torch
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from app.encoders.loader import load_encoder
from app.imaging.decode import decode_image
from app.settings import DEMO_MODEL_NAME, Settings

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA_DIR = REPO_ROOT.parent / "shared" / "data" / "datasets"
RAW_MIN_SECONDS = 1.0          # raw passes repeat for at least this long and this many times
RAW_MIN_PASSES = 3
READY_TIMEOUT_SECONDS = 180.0
REQUEST_TIMEOUT_SECONDS = 120.0
WARM_UP_REQUESTS = 8
BATCH_SIZE_METRIC = "medzero_encoder_batch_size"
STAGE_METRIC = "medzero_stage_duration_seconds"
STAGES = ("decode", "queue", "encode", "score")   # encode is observed once per forward, the others per image


@dataclass
class Row:
    path: str
    clients: str
    images: int
    images_per_second: float
    latencies_ms: list[float] = field(default_factory=list)   # per request; empty for the raw rows
    mean_encoder_batch: float | None = None
    stage_ms: dict[str, float] = field(default_factory=dict)  # server-side mean per stage observation
    errors: Counter = field(default_factory=Counter)          # HTTP status -> count


# -- images

def load_images(data_dir: Path, count: int) -> list[bytes]:
    """`count` PNG payloads, interleaved across every dataset/class folder (cycled if there are fewer)."""
    groups = [sorted(folder.glob("*.png")) for folder in sorted(data_dir.glob("*/*")) if folder.is_dir()]
    paths = [p for p in itertools.chain.from_iterable(itertools.zip_longest(*groups)) if p is not None]
    if not paths:
        raise SystemExit(f"no <dataset>/<class>/*.png under {data_dir}")
    return [path.read_bytes() for path in itertools.islice(itertools.cycle(paths), count)]


def synthesise_images(count: int, size: int = 224) -> list[bytes]:
    """Seeded grey gradient + noise PNGs, for machines without the shared datasets."""
    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 160, size, dtype=np.float32)[None, :]
    payloads = []
    for _ in range(count):
        pixels = np.clip(ramp + rng.normal(48, 24, (size, size)), 0, 255).astype(np.uint8)
        buffer = BytesIO()
        Image.fromarray(pixels).save(buffer, format="PNG")
        payloads.append(buffer.getvalue())
    return payloads


# -- raw path

def median_rate(one_pass: Callable[[], int]) -> float:
    """Images per second of `one_pass` (returns images done): the median over passes repeated for at least
    RAW_MIN_SECONDS and RAW_MIN_PASSES, since other work on the machine makes a pass slow, never fast."""
    rates: list[float] = []
    started = time.perf_counter()
    while len(rates) < RAW_MIN_PASSES or time.perf_counter() - started < RAW_MIN_SECONDS:
        pass_started = time.perf_counter()
        images = one_pass()
        rates.append(images / (time.perf_counter() - pass_started))
    return statistics.median(rates)


def benchmark_raw(settings: Settings, payloads: list[bytes], batch_size: int) -> tuple[str, str, list[Row]]:
    encoder = load_encoder(settings)   # the server's loader: same model, device, precision, warm-up

    def to_pixels(data: bytes) -> torch.Tensor:
        decoded = decode_image(data, max_pixels=settings.max_image_pixels,
                               max_aspect_ratio=settings.max_aspect_ratio)
        return encoder.preprocess(decoded.image)

    chunks = [payloads[i:i + batch_size] for i in range(0, len(payloads), batch_size)]
    batches = [torch.stack([to_pixels(data) for data in chunk]) for chunk in chunks]   # (n, 3, H, W) each
    encoder.encode_images(batches[0])   # warm-up at the benchmark's batch size

    def encode_pass() -> int:
        for pixels in batches:
            encoder.encode_images(pixels)
        return len(payloads)

    def end_to_end_pass() -> int:
        for chunk in chunks:
            encoder.encode_images(torch.stack([to_pixels(data) for data in chunk]))
        return len(payloads)

    rows = [Row(f"raw `encode_images`, batches of {batch_size}", "–", len(payloads),
                median_rate(encode_pass)),
            Row(f"raw decode + preprocess + encode, batches of {batch_size}", "–", len(payloads),
                median_rate(end_to_end_pass))]
    return encoder.model_id, str(encoder.device), rows


# -- HTTP path

def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def server_env(args: argparse.Namespace, data_dir: Path, port: int) -> dict[str, str]:
    env = {**os.environ, "MEDZERO_HOST": "127.0.0.1", "MEDZERO_PORT": str(port), "MEDZERO_DATA_DIR": str(data_dir),
           "MEDZERO_MODEL_NAME": args.model_name, "MEDZERO_PRECISION": args.precision,
           "MEDZERO_DEVICE": args.device, "MEDZERO_MAX_BATCH_SIZE": str(args.batch_size),
           "MEDZERO_LOG_LEVEL": "warning",   # no access log line per request
           "MEDZERO_AUTH": "off"}            # a throwaway server on loopback: no keys to provision
    env.pop("MEDZERO_DEMO", None)
    if args.pretrained:
        env["MEDZERO_PRETRAINED"] = args.pretrained
    else:
        env.pop("MEDZERO_PRETRAINED", None)
    return env


def wait_ready(base_url: str, server: subprocess.Popen, log_path: Path) -> dict:
    deadline = time.monotonic() + READY_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"server exited with {server.returncode} before ready:\n{tail(log_path)}")
        try:
            response = httpx.get(f"{base_url}/readyz", timeout=5)
            if response.status_code == 200:
                return response.json()
        except httpx.TransportError:
            pass
        time.sleep(0.25)
    raise SystemExit(f"server not ready after {READY_TIMEOUT_SECONDS:.0f} s:\n{tail(log_path)}")


def tail(log_path: Path, lines: int = 30) -> str:
    return "\n".join(log_path.read_text(errors="replace").splitlines()[-lines:])


def histogram_totals(base_url: str) -> Counter:
    """The _sum and _count so far of the encoder batch-size and per-stage histograms, keyed
    `medzero_encoder_batch_size_sum`, `medzero_stage_duration_seconds_count/decode`, ..."""
    totals: Counter = Counter()
    for family in text_string_to_metric_families(httpx.get(f"{base_url}/metrics", timeout=10).text):
        if family.name not in (BATCH_SIZE_METRIC, STAGE_METRIC):
            continue
        for sample in family.samples:
            if sample.name.endswith(("_sum", "_count")):
                stage = f"/{sample.labels['stage']}" if "stage" in sample.labels else ""
                totals[sample.name + stage] = sample.value
    return totals


async def post_all(base_url: str, requests: list[list[bytes]], route: str, label_set: str,
                   clients: int) -> tuple[float, list[float], Counter]:
    """`clients` concurrent clients take requests (lists of PNG payloads) off one queue until none are left;
    returns (wall seconds, per-request latencies in ms, non-200 statuses)."""
    pending: Iterator[list[bytes]] = iter(requests)
    latencies_ms: list[float] = []
    errors: Counter = Counter()
    field_name = "files" if route.endswith("/batch") else "file"
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)

    async def client_loop(client: httpx.AsyncClient) -> None:
        for payloads in pending:   # a shared iterator: each request is taken by exactly one client
            files = [(field_name, (f"image{i}.png", data, "image/png")) for i, data in enumerate(payloads)]
            started = time.perf_counter()
            response = await client.post(route, files=files, data={"label_set": label_set})
            latencies_ms.append((time.perf_counter() - started) * 1000)
            if response.status_code != 200:
                errors[response.status_code] += 1

    async with httpx.AsyncClient(base_url=base_url, limits=limits, timeout=REQUEST_TIMEOUT_SECONDS) as client:
        started = time.perf_counter()
        await asyncio.gather(*(client_loop(client) for _ in range(clients)))
        return time.perf_counter() - started, latencies_ms, errors


def measure_http(base_url: str, requests: list[list[bytes]], route: str, label_set: str, clients: int,
                 path: str) -> Row:
    before = histogram_totals(base_url)
    seconds, latencies_ms, errors = asyncio.run(post_all(base_url, requests, route, label_set, clients))
    during = histogram_totals(base_url)
    during.subtract(before)   # this run's share of the server's counters

    def mean(metric: str, stage: str = "") -> float | None:
        total, count = during[f"{metric}_sum{stage}"], during[f"{metric}_count{stage}"]
        return total / count if count else None

    stage_ms = {stage: mean(STAGE_METRIC, f"/{stage}") for stage in STAGES}
    images = sum(len(r) for r in requests)
    return Row(path, str(clients), images, images / seconds, latencies_ms=latencies_ms,
               mean_encoder_batch=mean(BATCH_SIZE_METRIC), errors=errors,
               stage_ms={stage: value * 1000 for stage, value in stage_ms.items() if value is not None})


def benchmark_http(args: argparse.Namespace, payloads: list[bytes], work_dir: Path) -> tuple[dict, list[Row]]:
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    log_path = work_dir / "server.log"
    with open(log_path, "wb") as log:
        server = subprocess.Popen([sys.executable, "-m", "app", "serve"], cwd=REPO_ROOT, stdout=log,
                                  stderr=subprocess.STDOUT, env=server_env(args, work_dir / "data", port))
    try:
        readiness = wait_ready(base_url, server, log_path)
        asyncio.run(post_all(base_url, [[data] for data in payloads[:WARM_UP_REQUESTS]], "/classify",
                             args.label_set, 1))
        rows = []
        for clients in args.concurrency:
            progress(f"HTTP /classify, {clients} client(s)")
            rows.append(measure_http(base_url, [[data] for data in payloads], "/classify", args.label_set,
                                     clients, "HTTP `/classify`"))
        if args.batch_files:
            progress(f"HTTP /classify/batch, {args.batch_files} files per request")
            requests = [payloads[i:i + args.batch_files] for i in range(0, len(payloads), args.batch_files)]
            rows.append(measure_http(base_url, requests, "/classify/batch", args.label_set, args.batch_clients,
                                     f"HTTP `/classify/batch`, {args.batch_files} files per request"))
        if server.poll() is not None:
            raise SystemExit(f"server died during the benchmark:\n{tail(log_path)}")
        return readiness, rows
    finally:
        stop_server(server)
        if server.returncode not in (0, -signal.SIGTERM, -signal.SIGINT):
            progress(f"server exited with {server.returncode}; its log:\n{tail(log_path)}")


def stop_server(server: subprocess.Popen) -> None:
    if server.poll() is None:
        server.terminate()   # uvicorn drains, then exits
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


# -- report

def format_table(rows: list[Row]) -> str:
    raw_encode, raw_end_to_end = rows[0].images_per_second, rows[1].images_per_second
    lines = ["| path | clients | images | img/s | ÷ raw encode | ÷ raw end-to-end | p50 ms | p95 ms "
             "| mean images per forward | non-200 |",
             "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|"]
    for row in rows:
        p50, p95 = (f"{np.percentile(row.latencies_ms, q):.1f}" for q in (50, 95)) if row.latencies_ms else ("–", "–")
        mean_batch = f"{row.mean_encoder_batch:.1f}" if row.mean_encoder_batch is not None else "–"
        errors = ", ".join(f"{count}× {status}" for status, count in sorted(row.errors.items())) or "0"
        if not row.latencies_ms:
            errors = "–"
        lines.append(f"| {row.path} | {row.clients} | {row.images} | {row.images_per_second:,.1f} "
                     f"| {row.images_per_second / raw_encode:.3f} | {row.images_per_second / raw_end_to_end:.3f} "
                     f"| {p50} | {p95} | {mean_batch} | {errors} |")
    return "\n".join(lines)


def format_stage_table(rows: list[Row]) -> str:
    """Where a request's time goes inside the server, from medzero_stage_duration_seconds."""
    lines = ["| path | clients | decode + preprocess ms/image | queue ms/image | encode ms/forward | score ms/image |",
             "|---|--:|--:|--:|--:|--:|"]
    for row in rows:
        if row.stage_ms:
            cells = " | ".join(f"{row.stage_ms[s]:.1f}" if s in row.stage_ms else "–" for s in STAGES)
            lines.append(f"| {row.path} | {row.clients} | {cells} |")
    return "\n".join(lines)


def progress(message: str) -> None:
    print(f"[throughput] {message}", file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model-name", default=DEMO_MODEL_NAME, help="open_clip model id (MEDZERO_MODEL_NAME)")
    parser.add_argument("--pretrained", help="pretrained tag or checkpoint path (MEDZERO_PRETRAINED)")
    parser.add_argument("--precision", default="fp32", choices=("fp32", "fp16", "bf16"))
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--images", type=int, default=256, help="images per run")
    parser.add_argument("--batch-size", type=int, default=32,
                        help="raw batch size, and the server's MEDZERO_MAX_BATCH_SIZE")
    parser.add_argument("--concurrency", default="1,4,16,32", help="comma-separated client counts for /classify")
    parser.add_argument("--batch-files", type=int, default=16, help="files per /classify/batch request; 0 skips it")
    parser.add_argument("--batch-clients", type=int, default=1, help="concurrent clients for /classify/batch")
    parser.add_argument("--label-set", default="chest-xray-pneumonia", help="a built-in label set")
    parser.add_argument("--data-dir", type=Path,
                        help=f"<dataset>/<class>/*.png images (default {DEFAULT_DATA_DIR} if present, "
                             "else synthesised images)")
    args = parser.parse_args(argv)
    args.concurrency = [int(n) for n in args.concurrency.split(",") if n.strip()]
    if args.images < 1 or args.batch_size < 1 or any(n < 1 for n in args.concurrency) or args.batch_clients < 1:
        parser.error("--images, --batch-size, --concurrency and --batch-clients must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    load_average = os.getloadavg()[0]   # other work on the machine skews every number below
    # SIGTERM unwinds like Ctrl-C, so the `finally` that stops the server always runs
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))

    data_dir = args.data_dir or (DEFAULT_DATA_DIR if DEFAULT_DATA_DIR.is_dir() else None)
    if data_dir is not None:
        if not data_dir.is_dir():
            raise SystemExit(f"--data-dir {data_dir} is not a directory")
        payloads, source = load_images(data_dir, args.images), f"images from {data_dir}"
    else:
        payloads = synthesise_images(args.images)
        source = f"SYNTHESISED images (224×224 grey noise; no {DEFAULT_DATA_DIR} on this machine)"

    settings = Settings(model_name=args.model_name, pretrained=args.pretrained, precision=args.precision,
                        device=args.device)
    progress(f"raw path: {args.model_name}, {args.precision}, device {args.device}")
    model_id, device, rows = benchmark_raw(settings, payloads, args.batch_size)
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()   # the raw encoder is gone; the server process loads its own copy
    with tempfile.TemporaryDirectory(prefix="medzero-bench-") as work_dir:
        progress("HTTP path: starting the server")
        readiness, http_rows = benchmark_http(args, payloads, Path(work_dir))
    rows += http_rows

    print(f"model `{model_id}` · precision {args.precision} · device {device} "
          f"(server: `{readiness.get('model')}` on {readiness.get('device')})")
    print(f"{len(payloads)} {source}; label set `{args.label_set}`; server MEDZERO_MAX_BATCH_SIZE={args.batch_size}; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, load average "
          f"{load_average:.1f} at start; clients and server share this machine, loopback only")
    if readiness.get("model") != model_id:
        print(f"WARNING: the server loaded `{readiness.get('model')}`, not `{model_id}`; the ratios compare "
              "different models")
    print()
    print(format_table(rows))
    print()
    print(format_stage_table(rows))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:   # the server was stopped on the way out
        progress("interrupted")
        sys.exit(130)
