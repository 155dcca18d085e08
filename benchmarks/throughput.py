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

With --compare: the raw torch rows, then medzero once per --engines value (MEDZERO_ENGINE), the plain FastAPI +
open_clip peer (benchmarks/peers/plain_server.py) and infinity-emb where --infinity-python can import it, one
after another under the same --clients single-image load; one table of img/s, p50/p95/p99, peak RSS (VmHWM),
start-up seconds and the ratios to raw torch and to medzero:

    .venv/bin/python benchmarks/throughput.py --compare --engines torch,onnxruntime --images 16 --clients 4
"""
import argparse
import asyncio
import base64
import gc
import itertools
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from typing import Any, NoReturn

import httpx
import numpy as np
import open_clip
import torch
from accuracy import cpu_flags  # benchmarks/accuracy.py, beside this script
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from open_clip.factory import parse_model_name
from open_clip.tokenizer import SimpleTokenizer
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from app.encoders.loader import load_encoder
from app.imaging.decode import decode_image
from app.settings import DEMO_MODEL_NAME, Settings

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA_DIR = REPO_ROOT.parent / "shared" / "data" / "datasets"
RAW_MIN_SECONDS = 1.0          # raw passes repeat for at least this long and this many times
RAW_MIN_PASSES = 3
READY_TIMEOUT_SECONDS = 600.0   # ViT-B-16 on 2 CPU threads: an engine probe that exports and compiles takes minutes
REQUEST_TIMEOUT_SECONDS = 120.0
WARM_UP_REQUESTS = 8
BATCH_SIZE_METRIC = "medzero_encoder_batch_size"
STAGE_METRIC = "medzero_stage_duration_seconds"
STAGES = ("decode", "queue", "encode", "score")   # encode is observed once per forward, the others per image
PLAIN_SERVER = REPO_ROOT / "benchmarks" / "peers" / "plain_server.py"
INFINITY_MODEL = "medzero-peer"     # the name infinity serves the model under (--served-model-name)


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


def benchmark_images(data_dir: Path | None, count: int) -> tuple[list[bytes], str]:
    """`count` PNGs from --data-dir (default DEFAULT_DATA_DIR where it exists), else synthesised; and what they are."""
    data_dir = data_dir or (DEFAULT_DATA_DIR if DEFAULT_DATA_DIR.is_dir() else None)
    if data_dir is None:
        return synthesise_images(count), (f"{count} SYNTHESISED PNGs (224×224 grey noise; no {DEFAULT_DATA_DIR} "
                                          "on this machine)")
    if not data_dir.is_dir():
        raise SystemExit(f"--data-dir {data_dir} is not a directory")
    return load_images(data_dir, count), f"{count} PNGs from {data_dir}"


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
    if getattr(args, "engine", None):     # throughput.py's own run: the raw path's engine, on the server too
        env["MEDZERO_ENGINE"] = args.engine
    if args.pretrained:
        env["MEDZERO_PRETRAINED"] = args.pretrained
    else:
        env.pop("MEDZERO_PRETRAINED", None)
    return env


class ServerFailed(SystemExit):
    """A server died or never turned ready: ends a plain run; --compare reports it in that server's row."""


def wait_ready(base_url: str, server: subprocess.Popen, log_path: Path, route: str = "/readyz") -> dict:
    deadline = time.monotonic() + READY_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise ServerFailed(f"server exited with {server.returncode} before ready:\n{tail(log_path)}")
        try:
            response = httpx.get(f"{base_url}{route}", timeout=5)
            if response.status_code == 200:
                return response.json()
        except httpx.TransportError:
            pass
        time.sleep(0.25)
    raise ServerFailed(f"server not ready after {READY_TIMEOUT_SECONDS:.0f} s:\n{tail(log_path)}")


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


Send = Callable[[httpx.AsyncClient, Any], Awaitable[httpx.Response]]   # one request for one item


async def run_clients(base_url: str, items: list, clients: int, send: Send) -> tuple[float, list[float], Counter]:
    """`clients` concurrent clients take items off one queue and `send` each until none are left;
    returns (wall seconds, per-request latencies in ms, non-200 statuses)."""
    pending: Iterator = iter(items)
    latencies_ms: list[float] = []
    errors: Counter = Counter()
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)

    async def client_loop(client: httpx.AsyncClient) -> None:
        for item in pending:   # a shared iterator: each request is taken by exactly one client
            started = time.perf_counter()
            response = await send(client, item)
            latencies_ms.append((time.perf_counter() - started) * 1000)
            if response.status_code != 200:
                errors[response.status_code] += 1

    async with httpx.AsyncClient(base_url=base_url, limits=limits, timeout=REQUEST_TIMEOUT_SECONDS) as client:
        started = time.perf_counter()
        await asyncio.gather(*(client_loop(client) for _ in range(clients)))
        return time.perf_counter() - started, latencies_ms, errors


def multipart_sender(route: str, label_set: str) -> Send:
    """Posts a request's PNG payloads as multipart `file` (`files` for /classify/batch) with the label set."""
    field_name = "files" if route.endswith("/batch") else "file"

    def send(client: httpx.AsyncClient, payloads: list[bytes]) -> Awaitable[httpx.Response]:
        files = [(field_name, (f"image{i}.png", data, "image/png")) for i, data in enumerate(payloads)]
        return client.post(route, files=files, data={"label_set": label_set})

    return send


async def post_all(base_url: str, requests: list[list[bytes]], route: str, label_set: str,
                   clients: int) -> tuple[float, list[float], Counter]:
    """`clients` concurrent clients post requests (lists of PNG payloads) to `route` until none are left."""
    return await run_clients(base_url, requests, clients, multipart_sender(route, label_set))


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
    shared_index, index_seconds = build_shared_index(args, work_dir)
    shutil.copytree(shared_index, work_dir / "data" / "kb")
    progress("description index for the server: " + (f"`medzero kb build` {index_seconds:.1f} s" if index_seconds
                                                      else f"from --index-cache {args.index_cache}"))
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


# -- --compare: medzero once per engine, the plain peer and infinity, one after another

@dataclass
class PeerRow:
    name: str
    engine: str                                               # engine / precision, as the server reports it
    images_per_second: float | None = None                    # None: skipped or failed (`note` says why)
    latencies_ms: list[float] = field(default_factory=list)   # per request, client-side
    peak_rss_mib: float | None = None                         # VmHWM of the server process
    ready_rss_mib: float | None = None                        # its VmRSS when it first answered ready
    startup_seconds: float | None = None                      # process start to the first 200 of its ready route
    errors: Counter = field(default_factory=Counter)          # HTTP status -> count
    note: str = ""


@dataclass
class Peer:
    """One server for --compare: how to start it, when it is ready and what one client request is."""
    name: str
    command: list[str]
    env: dict[str, str]
    port: int
    send: Send
    items: list                                               # one per image, what `send` takes
    ready_route: str = "/readyz"
    engine: str = ""                                          # when the ready route does not say


def peak_rss_mib(pid: int, field_name: str = "VmHWM") -> float | None:
    """VmHWM (peak resident set), or another /proc/<pid>/status size such as VmRSS, of a live process (Linux)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    line = next((line for line in status.splitlines() if line.startswith(f"{field_name}:")), None)
    return int(line.split()[1]) / 1024 if line else None


def run_peer(peer: Peer, clients: int, log_path: Path) -> tuple[PeerRow, dict]:
    """Start the server, time it to ready, warm it up, then `clients` clients send every item once; the row and
    the ready route's JSON. ServerFailed when it dies or never turns ready; it is stopped either way."""
    base_url = f"http://127.0.0.1:{peer.port}"
    started = time.perf_counter()
    with open(log_path, "wb") as log:
        server = subprocess.Popen(peer.command, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT, env=peer.env)
    try:
        readiness = wait_ready(base_url, server, log_path, peer.ready_route)
        startup_seconds = time.perf_counter() - started
        ready_rss = peak_rss_mib(server.pid, "VmRSS")
        asyncio.run(run_clients(base_url, peer.items[:WARM_UP_REQUESTS], 1, peer.send))
        seconds, latencies_ms, errors = asyncio.run(run_clients(base_url, peer.items, clients, peer.send))
        peak = peak_rss_mib(server.pid)
        if server.poll() is not None:
            raise ServerFailed(f"server died during the benchmark:\n{tail(log_path)}")
    finally:
        stop_server(server)
    return PeerRow(peer.name, "", len(peer.items) / seconds, latencies_ms, peak, ready_rss, startup_seconds,
                   errors), readiness


def build_shared_index(args: argparse.Namespace, work_dir: Path) -> tuple[Path, float | None]:
    """`medzero kb build` (which builds from scratch) once into work_dir/seed, or into --index-cache unless a
    run before built it there: every medzero run starts from a copy of this description index, so start-up
    measures the engine and the server, not the index build (timed here, once). (the kb folder, seconds or None)."""
    seed = args.index_cache or work_dir / "seed"
    if args.index_cache and any((seed / "kb").glob("*/manifest.json")):
        return seed / "kb", None
    env = server_env(args, seed, free_port())
    started = time.perf_counter()
    build = subprocess.run([sys.executable, "-m", "app", "kb", "build", "--no-progress"], cwd=REPO_ROOT, env=env,
                           check=False, capture_output=True, text=True)
    if build.returncode != 0:
        raise SystemExit(f"medzero kb build failed ({build.returncode}):\n{build.stderr[-3000:]}")
    return seed / "kb", time.perf_counter() - started


def medzero_peer(args: argparse.Namespace, engine: str, payloads: list[bytes], work_dir: Path,
                 shared_index: Path) -> Peer:
    """`python -m app serve` with MEDZERO_ENGINE=engine and a fresh data dir holding a copy of the shared
    description index; its engines/ folder is shared by every medzero run of this comparison (graphs exported
    once); no run sees another's database."""
    data_dir = work_dir / f"medzero-{engine.replace(':', '-')}" / "data"
    data_dir.mkdir(parents=True)
    shutil.copytree(shared_index, data_dir / "kb")
    (work_dir / "engines").mkdir(exist_ok=True)
    (data_dir / "engines").symlink_to(work_dir / "engines", target_is_directory=True)
    port = free_port()
    env = {**server_env(args, data_dir, port), "MEDZERO_ENGINE": engine}
    return Peer(f"medzero `{engine}`", [sys.executable, "-m", "app", "serve"], env, port,
                multipart_sender("/classify", args.label_set), [[data] for data in payloads])


def plain_peer(args: argparse.Namespace, payloads: list[bytes]) -> Peer:
    port = free_port()
    command = [sys.executable, str(PLAIN_SERVER), "--model-name", args.model_name, "--port", str(port),
               "--device", args.device]
    if args.pretrained:
        command += ["--pretrained", args.pretrained]
    # the same multipart request as medzero's; the plain server ignores the label_set field (its prompts are fixed)
    return Peer("plain FastAPI + open_clip", command, dict(os.environ), port,
                multipart_sender("/classify", args.label_set), [[data] for data in payloads])


def infinity_peer(args: argparse.Namespace, payloads: list[bytes], work_dir: Path) -> tuple[Peer | None, str]:
    """infinity-emb serving a transformers CLIPModel of the same shapes, or (None, why not)."""
    python = args.infinity_python
    try:
        probe = subprocess.run([python, "-c", "import infinity_emb, aiohttp; print(infinity_emb.__version__)"],
                               check=False, capture_output=True, text=True, timeout=120)
    except OSError as exc:
        return None, f"{python} cannot run: {exc.strerror} (see --infinity-python)"
    if probe.returncode != 0:
        last = (probe.stderr.strip().splitlines() or ["no output"])[-1]
        return None, f"`import infinity_emb, aiohttp` fails in {python}: {last} (see --infinity-python)"
    version = probe.stdout.strip()
    if args.infinity_model:
        model, what = args.infinity_model, f"`{args.infinity_model}`"
    else:
        folder = work_dir / "infinity-model"
        why_not = write_transformers_clip(args.model_name, folder)
        if why_not:
            return None, f"infinity-emb {version} is installed, but {why_not}; pass --infinity-model"
        model = str(folder)
        what = (f"a transformers `CLIPModel` with `{args.model_name}`'s shapes and random weights (infinity loads "
                "transformers models, not open_clip ones)")
    port = free_port()
    dtype = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}[args.precision]
    command = [python, "-m", "infinity_emb.cli", "v2", "--model-id", model, "--served-model-name", INFINITY_MODEL,
               "--host", "127.0.0.1", "--port", str(port), "--engine", "torch", "--device", args.device,
               "--dtype", dtype, "--batch-size", str(args.batch_size), "--log-level", "warning"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "DO_NOT_TRACK": "1", "INFINITY_ANONYMOUS_USAGE_STATS": "0"}

    def send(client: httpx.AsyncClient, data_uri: str) -> Awaitable[httpx.Response]:
        return client.post("/embeddings", json={"model": INFINITY_MODEL, "input": [data_uri], "modality": "image"})

    items = [f"data:image/png;base64,{base64.b64encode(data).decode()}" for data in payloads]
    return Peer(f"infinity-emb {version}", command, env, port, send, items, ready_route="/health",
                engine=f"torch {args.precision} (transformers)"), (
        f"infinity-emb {version} served {what}; POST /embeddings (modality image, one base64 data URI per "
        "request): it answers the embedding, no class scores")


def write_transformers_clip(model_name: str, folder: Path) -> str | None:
    """A transformers CLIPModel with the open_clip config's shapes (random init, seed 0) and a CLIP tokenizer and
    image processor to match, saved under `folder`; or why this model has none."""
    if parse_model_name(model_name)[0] is not None:
        return f"`{model_name}` is not an open_clip architecture config to rebuild in transformers"
    open_clip.add_model_config(REPO_ROOT / "models")
    config = open_clip.get_model_config(model_name)
    if config is None:
        return f"open_clip has no config named `{model_name}`"
    vision, text = config["vision_cfg"], config["text_cfg"]
    if (vision.get("timm_model_name") or not isinstance(vision.get("layers"), int) or text.get("hf_model_name")
            or config.get("custom_text")):
        return f"`{model_name}` is not a plain ViT + text transformer (timm, ResNet or Hugging Face tower)"
    try:
        from transformers import CLIPConfig, CLIPModel
    except ImportError as exc:
        return f"transformers is not importable here ({exc})"
    activation = "quick_gelu" if config.get("quick_gelu") else "gelu"
    embed_dim, vision_width, text_width = config["embed_dim"], vision["width"], text["width"]
    clip_config = CLIPConfig(
        projection_dim=embed_dim,
        vision_config={"hidden_size": vision_width, "num_hidden_layers": vision["layers"],
                       "num_attention_heads": vision_width // vision.get("head_width", 64),
                       "intermediate_size": int(vision_width * vision.get("mlp_ratio", 4.0)),
                       "image_size": vision["image_size"], "patch_size": vision["patch_size"],
                       "hidden_act": activation, "projection_dim": embed_dim},
        text_config={"hidden_size": text_width, "num_hidden_layers": text["layers"],
                     "num_attention_heads": text["heads"],
                     "intermediate_size": int(text_width * text.get("mlp_ratio", 4.0)),
                     "vocab_size": text["vocab_size"], "max_position_embeddings": text["context_length"],
                     "hidden_act": activation, "projection_dim": embed_dim,
                     "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 49407})
    torch.manual_seed(0)
    CLIPModel(clip_config).eval().save_pretrained(folder)
    # open_clip's BPE is OpenAI CLIP's: the same vocabulary and merges, under transformers' special-token names
    tokenizer = SimpleTokenizer()
    renamed = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    (folder / "vocab.json").write_text(json.dumps({renamed.get(token, token): i for token, i
                                                   in tokenizer.encoder.items()}))
    merges = sorted(tokenizer.bpe_ranks, key=tokenizer.bpe_ranks.get)
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "CLIPTokenizer", "model_max_length": text["context_length"], "do_lower_case": True,
        "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>"}))
    size = vision["image_size"]
    (folder / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "CLIPImageProcessor", "do_resize": True, "size": {"shortest_edge": size},
        "resample": 3, "do_center_crop": True, "crop_size": {"height": size, "width": size}, "do_rescale": True,
        "rescale_factor": 1 / 255, "do_normalize": True, "do_convert_rgb": True,
        "image_mean": list(config.get("mean", OPENAI_DATASET_MEAN)),
        "image_std": list(config.get("std", OPENAI_DATASET_STD))}))
    (folder / "processor_config.json").write_text(json.dumps({"processor_class": "CLIPProcessor"}))
    return None


def engine_label(readiness: dict) -> str:
    engine = readiness["engine"]
    return f"{engine.get('engine', '?')} {engine.get('precision', '?')}"


def benchmark_compare(args: argparse.Namespace, payloads: list[bytes], work_dir: Path
                      ) -> tuple[str, str, list[PeerRow], list[str]]:
    """The raw torch rows, then every server one after another under the same client load; (model id, device,
    rows, notes)."""
    notes: list[str] = []
    settings = Settings(model_name=args.model_name, pretrained=args.pretrained, precision=args.precision,
                        device=args.device, engine="torch", data_dir=work_dir / "raw")
    progress(f"raw torch {args.precision}: {args.model_name}, device {args.device}")
    model_id, device, raw_rows = benchmark_raw(settings, payloads, args.batch_size)
    raw_peak = peak_rss_mib(os.getpid())
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    rows = [PeerRow(row.path, f"torch {args.precision}", row.images_per_second, peak_rss_mib=raw_peak)
            for row in raw_rows]
    notes.append(f"raw rows: this process, `load_encoder` with MEDZERO_ENGINE=torch on {device}; peak RSS is its "
                 "VmHWM after both raw runs (before any client ran)")

    progress("medzero kb build: the description index every medzero run starts from")
    shared_index, index_seconds = build_shared_index(args, work_dir)
    built = (f"`medzero kb build` once, {index_seconds:.1f} s (text tower, torch)" if index_seconds is not None
             else f"built by an earlier run into --index-cache {args.index_cache}")
    notes.append(f"description index: {built}, copied into each medzero run's data dir, so their start-up "
                 "excludes it; a first start on an empty data dir adds its build")
    builders: list[Callable[[], tuple[Peer | None, str]]] = [
        lambda engine=engine: (medzero_peer(args, engine, payloads, work_dir, shared_index), "")
        for engine in args.engines]
    builders += [lambda: (plain_peer(args, payloads), ""), lambda: infinity_peer(args, payloads, work_dir)]
    for index, build in enumerate(builders):
        peer, note = build()
        if peer is None:
            rows.append(PeerRow("infinity-emb", "–", note=f"skipped: {note}"))
            continue
        progress(f"{peer.name}: starting, then {args.clients} client(s) × {len(peer.items)} images")
        try:
            row, readiness = run_peer(peer, args.clients, work_dir / f"server-{index}.log")
        except ServerFailed as exc:
            rows.append(PeerRow(peer.name, "–", note=f"failed: {str(exc).strip().splitlines()[-1][:240]}"))
            continue
        row.name, row.engine = peer.name, engine_label(readiness) if readiness.get("engine") else peer.engine
        if peer.name.startswith("medzero"):
            engine = readiness.get("engine") or {}
            notes.append(f"{row.name}: {engine.get('reason')}; engine set-up {engine.get('setup_seconds')} s, "
                         f"server start-up {readiness.get('startup_seconds') or 0:.1f} s (its own clock)")
            if readiness.get("model") != model_id:
                notes.append(f"WARNING: {row.name} loaded `{readiness.get('model')}`, not `{model_id}`")
        if note:
            notes.append(note)
        rows.append(row)
    return model_id, device, rows, notes


def medzero_reference(rows: list[PeerRow]) -> PeerRow | None:
    """The medzero row the others are divided by: MEDZERO_ENGINE=torch, else auto, else the first that ran."""
    measured = [row for row in rows if row.name.startswith("medzero") and row.images_per_second]
    for wanted in ("medzero `torch`", "medzero `auto`"):
        found = next((row for row in measured if row.name == wanted), None)
        if found:
            return found
    return measured[0] if measured else None


def format_compare_table(rows: list[PeerRow]) -> str:
    raw = rows[0].images_per_second
    reference = medzero_reference(rows)
    reference_name = reference.name.removeprefix("medzero ") if reference else "none ran"
    lines = [(f"| server | engine / precision | img/s | p50 ms | p95 ms | p99 ms | RSS MiB ready / peak | start-up s "
              f"| ÷ raw torch {rows[0].engine.split()[-1]} | ÷ medzero {reference_name} | non-200 |"),
             "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|"]
    for row in rows:
        if row.images_per_second is None:
            lines.append(f"| {row.name} | {row.engine} | {row.note} | | | | | | | | |")
            continue
        ready = f"{row.ready_rss_mib:,.0f} / " if row.ready_rss_mib is not None else ""
        p50, p95, p99 = ((f"{np.percentile(row.latencies_ms, q):.1f}" for q in (50, 95, 99)) if row.latencies_ms
                         else ("–", "–", "–"))
        rss = f"{row.peak_rss_mib:,.0f}" if row.peak_rss_mib is not None else "–"
        startup = f"{row.startup_seconds:.1f}" if row.startup_seconds is not None else "–"
        to_medzero = f"{row.images_per_second / reference.images_per_second:.2f}" if reference else "–"
        errors = (", ".join(f"{count}× {status}" for status, count in sorted(row.errors.items())) or "0"
                  if row.latencies_ms else "–")
        lines.append(f"| {row.name} | {row.engine} | {row.images_per_second:,.1f} | {p50} | {p95} | {p99} | {ready}{rss} "
                     f"| {startup} | {row.images_per_second / raw:.2f} | {to_medzero} | {errors} |")
    return "\n".join(lines)


def main_compare(args: argparse.Namespace, payloads: list[bytes], source: str, load_average: float) -> int:
    with tempfile.TemporaryDirectory(prefix="medzero-compare-") as work_dir:
        model_id, device, rows, notes = benchmark_compare(args, payloads, Path(work_dir))
    print(f"model `{model_id}` · precision {args.precision} · device {device}; {source}; "
          f"{args.clients} concurrent single-image clients against every server, one server at a time; label set "
          f"`{args.label_set}`; MEDZERO_MAX_BATCH_SIZE / infinity --batch-size {args.batch_size}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, load average "
          f"{load_average:.1f} at start and {os.getloadavg()[0]:.1f} at the end; clients and servers share this "
          "machine, loopback only; start-up: process start to its first 200 (/readyz, infinity /health); the "
          "medzero runs share one engines/ graph cache (a later run reuses graphs an earlier one exported)")
    print(cpu_flags())
    print()
    print(format_compare_table(rows))
    print()
    for note in notes:
        print(f"- {note}")
    return 0


# -- report

def format_table(rows: list[Row]) -> str:
    raw_encode, raw_end_to_end = rows[0].images_per_second, rows[1].images_per_second
    lines = [("| path | clients | images | img/s | ÷ raw encode | ÷ raw end-to-end | p50 ms | p95 ms "
              "| mean images per forward | non-200 |"),
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


def error_log_lines(log_path: Path) -> list[str]:
    """A server's error records (JSON log lines at level error: unhandled exceptions, failed tasks)."""
    return [line for line in log_path.read_text(errors="replace").splitlines()
            if '"level": "error"' in line or '"level": "critical"' in line]


def run_script(main: Callable[[], int], progress: Callable[[str], None]) -> NoReturn:
    """A benchmark's entry point: SIGTERM unwinds like Ctrl-C, so the `finally` that stops its server always runs;
    Ctrl-C exits 130 (the server was stopped on the way out)."""
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        progress("interrupted")
        sys.exit(130)


def progress(message: str) -> None:
    print(f"[throughput] {message}", file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model-name", default=DEMO_MODEL_NAME, help="open_clip model id (MEDZERO_MODEL_NAME)")
    parser.add_argument("--pretrained", help="pretrained tag or checkpoint path (MEDZERO_PRETRAINED)")
    parser.add_argument("--precision", default="fp32", choices=("fp32", "fp16", "bf16"))
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--engine", default="auto",
                        help="MEDZERO_ENGINE of the plain run, for the raw path and the server alike (--compare "
                             "takes --engines)")
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
    parser.add_argument("--index-cache", type=Path,
                        help="a folder keeping the built description index between runs, one per model and corpus "
                             "(ViT-B-16's takes minutes on a CPU); default: built afresh in a temporary folder")
    compare = parser.add_argument_group("--compare", "medzero per engine against the plain peer and infinity-emb")
    compare.add_argument("--compare", action="store_true",
                         help="raw torch, medzero once per --engines, benchmarks/peers/plain_server.py and "
                              "infinity-emb, one after another under the same --clients load; one table")
    compare.add_argument("--engines", default="torch,onnxruntime,openvino,auto",
                         help="comma-separated MEDZERO_ENGINE values, one medzero run each")
    compare.add_argument("--clients", type=int, default=8, help="concurrent single-image clients per server")
    compare.add_argument("--infinity-python", default=sys.executable,
                         help="a Python where `import infinity_emb` works (e.g. a separate venv's bin/python)")
    compare.add_argument("--infinity-model",
                         help="what infinity serves (Hugging Face id or folder); default: a random-init "
                              "transformers CLIPModel with --model-name's shapes")
    args = parser.parse_args(argv)
    args.concurrency = [int(n) for n in args.concurrency.split(",") if n.strip()]
    if args.images < 1 or args.batch_size < 1 or any(n < 1 for n in args.concurrency) or args.batch_clients < 1:
        parser.error("--images, --batch-size, --concurrency and --batch-clients must be positive")
    args.engines = [engine.strip() for engine in args.engines.split(",") if engine.strip()]
    if args.clients < 1 or not args.engines:
        parser.error("--clients must be positive and --engines name at least one engine")
    for engine in args.engines:
        try:
            Settings(engine=engine)
        except ValueError:   # pydantic's ValidationError
            parser.error(f"--engines: {engine!r} is not a MEDZERO_ENGINE value (auto, torch, torch:int8, "
                         "onnxruntime, onnxruntime:int8, openvino, openvino:bf16)")
    if len(set(args.engines)) != len(args.engines):
        parser.error("--engines names an engine twice")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    load_average = os.getloadavg()[0]   # other work on the machine skews every number below

    payloads, source = benchmark_images(args.data_dir, args.images)
    if args.compare:
        return main_compare(args, payloads, source, load_average)

    with tempfile.TemporaryDirectory(prefix="medzero-bench-raw-") as raw_dir:   # its engines/ cache: not ./data
        settings = Settings(model_name=args.model_name, pretrained=args.pretrained, precision=args.precision,
                            device=args.device, engine=args.engine, data_dir=Path(raw_dir))
        progress(f"raw path: {args.model_name}, {args.precision}, device {args.device}, engine {args.engine}")
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
    print(f"{source}; label set `{args.label_set}`; server MEDZERO_MAX_BATCH_SIZE={args.batch_size}; "
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
    run_script(main, progress)
