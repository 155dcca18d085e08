"""Image-tower engines: the same open_clip vision tower run by torch, ONNX Runtime or OpenVINO, at fp32, bf16 or
int8, and `auto`, which measures the candidates this CPU supports on the loaded model and keeps the fastest that
meets the quality bar (never one slower than torch fp32).

Which one is fastest depends on the CPU, and a wrong choice is slower than doing nothing (OpenVINO bf16 is
several times torch fp32 where AVX-512 BF16 or AMX exist and emulated elsewhere; dynamic int8 without VNNI
saturates), so `auto` does not guess: a short start-up probe times each candidate at one batch size and compares
its embeddings with torch fp32's on the same pixels. The exported graphs and the probe's verdict are cached on
disk under MEDZERO_DATA_DIR/engines, keyed by the tower's weights, engine, precision and library versions, so a
warm restart neither exports nor probes again.

The text tower always stays torch (it runs when label sets are written, not per request), and so do forwards
with a method's tower variant (MedUnA prompts, HiCA weights), which only the torch model can run.
"""
import copy
import hashlib
import importlib.metadata
import json
import logging
import os
import re
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from app.errors import ModelLoadError

log = logging.getLogger(__name__)

ENGINES = ("torch", "onnxruntime", "openvino")
PRECISIONS = ("fp32", "bf16", "int8")
MIN_MEAN_COSINE = 0.999          # the quality bar against torch fp32, on the probe's pixels
MIN_COSINE = 0.995               # and for every single image
MIN_SPEED_UP = 1.05              # below this over torch fp32, the probe's noise: torch it is
# Above this torch fp32 rate a forward costs under 1 ms an image, less than the server spends decoding and
# answering one request (~9 ms of CPU for the tiny model on 2 cores: 229 img/s over HTTP against 22,000 raw), so a
# faster engine cannot speed the server up and only adds a thread pool beside the decode workers: torch it is
NOT_THE_BOTTLENECK_IMAGES_PER_SECOND = 1000.0
PROBE_MIN_SECONDS = 1.0          # each candidate is timed for at least this long and PROBE_MIN_PASSES passes
PROBE_MIN_PASSES = 2
_ONNX_OPSET = 17

ImageForward = Callable[[torch.Tensor], torch.Tensor]    # (n, 3, H, W) float32 pixels -> (n, dim) features


@dataclass(frozen=True)
class EngineChoice:
    engine: str
    precision: str

    @property
    def spec(self) -> str:
        return self.engine if self.precision == "fp32" else f"{self.engine}:{self.precision}"


@dataclass
class ProbeResult:
    spec: str
    images_per_second: float | None   # None: could not be built or run here (`error` says why)
    mean_cosine: float | None
    min_cosine: float | None
    error: str | None = None

    def meets_bar(self) -> bool:
        return (self.images_per_second is not None and self.mean_cosine is not None
                and self.mean_cosine >= MIN_MEAN_COSINE and self.min_cosine >= MIN_COSINE)


@dataclass
class ImageEngine:
    """What the encoder runs per request: `forward`, and why this one."""
    choice: EngineChoice
    forward: ImageForward
    reason: str
    probe: list[ProbeResult]
    seconds: float                     # building (export, compile) and probing, at start-up


def parse_engine(value: str) -> EngineChoice | None:
    """MEDZERO_ENGINE: auto (None), or ENGINE[:PRECISION], e.g. openvino:bf16; ModelLoadError names a bad one."""
    if value == "auto":
        return None
    engine, _, precision = value.partition(":")
    precision = precision or "fp32"
    if engine not in ENGINES or precision not in PRECISIONS or (engine, precision) == ("onnxruntime", "bf16"):
        raise ModelLoadError(f"MEDZERO_ENGINE={value!r}: use auto, or one of {', '.join(ENGINES)} optionally with "
                             ":fp32, :bf16 (torch, openvino) or :int8, e.g. openvino:bf16")
    return EngineChoice(engine, precision)


def cpu_flags() -> set[str]:
    """The CPU feature flags that decide the candidates (Linux /proc/cpuinfo; empty elsewhere)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    match = re.search(r"^flags\s*:\s*(.*)$", text, re.MULTILINE)
    return set(match.group(1).split()) if match else set()


def has_native_bf16(flags: set[str]) -> bool:
    return bool({"avx512_bf16", "amx_bf16"} & flags)


def candidates(flags: set[str]) -> list[EngineChoice]:
    """What `auto` measures on this CPU: fp32 and OpenVINO int8 weights (NNCF; computing in bf16 where native)
    everywhere, bf16 only with native bf16 (emulated it is a fraction of fp32), dynamic int8 (torch, ONNX Runtime)
    where there is no bf16 to do better."""
    found = [EngineChoice("torch", "fp32"), EngineChoice("onnxruntime", "fp32"), EngineChoice("openvino", "fp32"),
             EngineChoice("openvino", "int8")]
    if has_native_bf16(flags):
        found.append(EngineChoice("openvino", "bf16"))
    else:
        found += [EngineChoice("torch", "int8"), EngineChoice("onnxruntime", "int8")]
    return found


def choose(results: list[ProbeResult]) -> tuple[str, str]:
    """(spec, reason): the fastest candidate meeting the quality bar, if it beats torch fp32 by MIN_SPEED_UP and
    torch fp32 is slow enough for the engine to matter."""
    baseline = next(r for r in results if r.spec == "torch")
    if baseline.images_per_second >= NOT_THE_BOTTLENECK_IMAGES_PER_SECOND:
        return "torch", (f"auto: torch fp32 ({baseline.images_per_second:.0f} img/s) is already faster than the "
                         f"server around it ({NOT_THE_BOTTLENECK_IMAGES_PER_SECOND:.0f}+ img/s): no other engine "
                         "can speed up requests")
    usable = [r for r in results if r.meets_bar()]
    best = max(usable, key=lambda r: r.images_per_second, default=baseline)
    if best.spec == "torch" or best.images_per_second < MIN_SPEED_UP * baseline.images_per_second:
        return "torch", (f"auto: torch fp32 ({baseline.images_per_second:.1f} img/s); no candidate meeting the "
                         f"quality bar was {MIN_SPEED_UP:g}x faster")
    return best.spec, (f"auto: {best.spec} at {best.images_per_second:.1f} img/s, "
                       f"{best.images_per_second / baseline.images_per_second:.2f}x torch fp32 "
                       f"({baseline.images_per_second:.1f}), embedding cosine to fp32 {best.mean_cosine:.5f}")


# -- building one engine

def weights_digest(tower: torch.nn.Module) -> str:
    """sha256 over the tower's parameters and buffers: an exported graph holds the weights, so it is only reused
    for the same weights (random-init models included)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(tower.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes()
                      if tensor.numel() else b"")
    return digest.hexdigest()


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "absent"


class EngineCache:
    """MEDZERO_DATA_DIR/engines/<model>-<key>/: the exported graphs and the probe's verdict for one tower."""

    def __init__(self, root: Path, model_id: str, tower_digest: str, pixel_shape: tuple[int, ...]) -> None:
        versions = {package: _version(package) for package in ("torch", "onnxruntime", "openvino", "onnx")}
        key = hashlib.sha256(json.dumps([model_id, tower_digest, pixel_shape, versions]).encode()).hexdigest()
        self.directory = root / f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', model_id)[:80]}-{key[:16]}"
        self.versions = versions

    def path(self, name: str) -> Path:
        return self.directory / name

    def write_atomically(self, name: str, write: Callable[[Path], None]) -> Path:
        """write(temporary path) then rename: a crash mid-export leaves no half-written graph behind."""
        self.directory.mkdir(parents=True, exist_ok=True)
        final = self.path(name)
        with tempfile.TemporaryDirectory(dir=self.directory, prefix=".export-") as staging:
            temporary = Path(staging) / name
            write(temporary)
            os.replace(temporary, final)
        return final

    def load_probe(self, flags: set[str], threads: int, batch: int) -> dict | None:
        try:
            saved = json.loads(self.path("probe.json").read_text())
        except (OSError, ValueError):
            return None
        same = saved.get("flags") == sorted(flags) and saved.get("threads") == threads and saved.get("batch") == batch
        return saved if same else None

    def save_probe(self, flags: set[str], threads: int, batch: int, results: list[ProbeResult], spec: str,
                   reason: str) -> None:
        body = {"flags": sorted(flags), "threads": threads, "batch": batch, "chosen": spec, "reason": reason,
                "results": [asdict(r) for r in results], "versions": self.versions}
        self.write_atomically("probe.json", lambda path: path.write_text(json.dumps(body, indent=2)))


def onnx_graph(tower: torch.nn.Module, cache: EngineCache, pixel_shape: tuple[int, ...]) -> Path:
    """The tower as ONNX (fp32), exported once. A batch-2 example with a dynamic batch axis: a batch-1 example
    lets the exporter fix the batch size silently."""
    path = cache.path("image_tower.onnx")
    if path.is_file():
        return path

    def export(target: Path) -> None:
        example = torch.zeros((2, *pixel_shape[1:]))
        # with grad on: under no_grad nn.MultiheadAttention takes a fused fast path ONNX cannot express
        with torch.inference_mode(False), torch.enable_grad():
            torch.onnx.export(tower, (example,), str(target), input_names=["pixels"], output_names=["features"],
                              dynamic_axes={"pixels": {0: "batch"}, "features": {0: "batch"}},
                              opset_version=_ONNX_OPSET, dynamo=False)

    log.info("exporting the image tower to ONNX under %s", cache.directory)
    return cache.write_atomically(path.name, export)


def onnx_int8_graph(tower: torch.nn.Module, cache: EngineCache, pixel_shape: tuple[int, ...]) -> Path:
    """ONNX Runtime dynamic int8 (weights QUInt8: signed weights saturate without VNNI)."""
    path = cache.path("image_tower.int8.onnx")
    if path.is_file():
        return path
    from onnxruntime.quantization import QuantType, quantize_dynamic
    source = onnx_graph(tower, cache, pixel_shape)
    return cache.write_atomically(path.name, lambda target: quantize_dynamic(str(source), str(target),
                                                                              weight_type=QuantType.QUInt8))


def build_forward(choice: EngineChoice, tower: torch.nn.Module, cache: EngineCache, pixel_shape: tuple[int, ...],
                  threads: int) -> ImageForward:
    """One engine's forward; ImportError / RuntimeError / OSError when it cannot run here."""
    if choice.engine == "torch":
        if choice.precision == "fp32":
            return tower
        if choice.precision == "int8":
            quantized = torch.ao.quantization.quantize_dynamic(copy.deepcopy(tower), {torch.nn.Linear},
                                                               dtype=torch.qint8)
            return quantized
        def bf16_forward(pixels: torch.Tensor) -> torch.Tensor:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return tower(pixels).float()
        return bf16_forward
    if choice.engine == "onnxruntime":
        import onnxruntime
        graph = onnx_int8_graph(tower, cache, pixel_shape) if choice.precision == "int8" else onnx_graph(
            tower, cache, pixel_shape)
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        session = onnxruntime.InferenceSession(str(graph), options, providers=["CPUExecutionProvider"])
        return lambda pixels: torch.from_numpy(session.run(None, {"pixels": pixels.numpy()})[0])
    import openvino
    core = openvino.Core()
    core.set_property({"CACHE_DIR": str(cache.path("openvino-cache"))})   # compiled blobs: a warm start reuses
    # int8 weights are dequantised into the activations' precision: bf16 where the CPU computes it natively
    compute_bf16 = choice.precision == "bf16" or (choice.precision == "int8" and has_native_bf16(cpu_flags()))
    # no CPU pinning: the event loop and the decode workers share these cores, and a pinned inference thread
    # cannot move off a core they are busy on
    config = {"INFERENCE_PRECISION_HINT": "bf16" if compute_bf16 else "f32",
              "PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": threads, "ENABLE_CPU_PINNING": False}
    graph = openvino_int8_graph(tower, cache, pixel_shape) if choice.precision == "int8" else onnx_graph(
        tower, cache, pixel_shape)
    compiled = core.compile_model(str(graph), "CPU", config)
    return lambda pixels: torch.from_numpy(compiled(pixels.numpy())[0].copy())


def openvino_int8_graph(tower: torch.nn.Module, cache: EngineCache, pixel_shape: tuple[int, ...]) -> Path:
    """OpenVINO IR with NNCF's int8 weight compression (asymmetric, per output channel; activations stay float),
    written once: image_tower.int8.bin, then image_tower.int8.xml, which marks it complete."""
    path = cache.path("image_tower.int8.xml")
    if path.is_file():
        return path
    import nncf
    import openvino
    from nncf.common.logging.logger import set_log_level
    set_log_level(logging.WARNING)       # its bit-width table is for notebooks, not a server's log
    log.info("compressing the image tower's weights to int8 (NNCF) under %s", cache.directory)
    compressed = nncf.compress_weights(openvino.Core().read_model(str(onnx_graph(tower, cache, pixel_shape))))
    cache.directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache.directory, prefix=".export-") as staging:
        openvino.save_model(compressed, str(Path(staging) / path.name), compress_to_fp16=False)
        os.replace(Path(staging) / path.with_suffix(".bin").name, path.with_suffix(".bin"))
        os.replace(Path(staging) / path.name, path)
    return path


# -- the probe and the choice

def probe_pixels(pixel_shape: tuple[int, ...], batch: int) -> torch.Tensor:
    """Deterministic inputs shaped like preprocessed images: smooth gradients plus noise, in the normalised range."""
    generator = torch.Generator().manual_seed(0)
    _, channels, height, width = pixel_shape
    ramp = torch.linspace(-1.8, 2.0, width).expand(height, width)
    pixels = torch.stack([ramp.roll(i * 7, dims=1).expand(channels, height, width) for i in range(batch)])
    return (pixels + 0.3 * torch.randn(pixels.shape, generator=generator)).contiguous()


def measure(forward: ImageForward, pixels: torch.Tensor, reference: torch.Tensor) -> ProbeResult:
    with torch.inference_mode():
        features = forward(pixels).float()           # the first pass warms up (and compiles, for some)
        passes, started = 0, time.perf_counter()
        while passes < PROBE_MIN_PASSES or time.perf_counter() - started < PROBE_MIN_SECONDS:
            features = forward(pixels).float()
            passes += 1
        seconds = (time.perf_counter() - started) / passes
    cosine = F.cosine_similarity(features, reference, dim=-1)
    return ProbeResult("", len(pixels) / seconds, float(cosine.mean()), float(cosine.min()))


def select_engine(setting: str, tower: torch.nn.Module, *, model_id: str, pixel_shape: tuple[int, ...],
                  cache_root: Path, threads: int, batch: int, device: torch.device, precision: str) -> ImageEngine:
    """The image engine MEDZERO_ENGINE asks for: a named one (built, checked once against torch fp32), or `auto`.
    `precision`: MEDZERO_PRECISION, the torch model's; the other engines start from fp32 weights on the CPU."""
    started = time.perf_counter()
    chosen = parse_engine(setting)
    if device.type != "cpu" or precision != "fp32":
        if chosen is not None and chosen != EngineChoice("torch", "fp32"):
            raise ModelLoadError(f"MEDZERO_ENGINE={setting} runs on the CPU from fp32 weights; this model is on "
                                 f"{device} at MEDZERO_PRECISION={precision}: use MEDZERO_ENGINE=torch or auto")
        return ImageEngine(EngineChoice("torch", precision), tower,
                           f"torch on {device} at MEDZERO_PRECISION={precision}", [], 0.0)
    if chosen == EngineChoice("torch", "fp32"):
        return ImageEngine(chosen, tower, "MEDZERO_ENGINE=torch", [], 0.0)

    cache = EngineCache(cache_root, model_id, weights_digest(tower), pixel_shape)
    flags = cpu_flags()
    pixels = probe_pixels(pixel_shape, batch)
    with torch.inference_mode():
        reference = tower(pixels).float()
    if chosen is not None:
        try:
            forward = build_forward(chosen, tower, cache, pixel_shape, threads)
            result = measure(forward, pixels, reference)
        except (ImportError, RuntimeError, OSError) as exc:
            raise ModelLoadError(f"MEDZERO_ENGINE={setting} cannot run here: {type(exc).__name__}: "
                                 f"{str(exc).splitlines()[0][:300] if str(exc) else ''}") from exc
        result.spec = chosen.spec
        if not result.meets_bar():
            log.warning("MEDZERO_ENGINE=%s: embedding cosine to torch fp32 %.5f (min %.5f), below the bar %.3f",
                        setting, result.mean_cosine, result.min_cosine, MIN_MEAN_COSINE)
        return ImageEngine(chosen, forward, f"MEDZERO_ENGINE={setting}", [result], time.perf_counter() - started)

    saved = cache.load_probe(flags, threads, batch)
    if saved is not None:
        spec, reason = saved["chosen"], saved["reason"] + " (probe cached)"
        results = [ProbeResult(**r) for r in saved["results"]]
    else:
        results = []
        for candidate in candidates(flags):
            try:
                result = measure(build_forward(candidate, tower, cache, pixel_shape, threads), pixels, reference)
            except (ImportError, RuntimeError, OSError, ValueError) as exc:   # not installed, cannot export...
                result = ProbeResult("", None, None, None, f"{type(exc).__name__}: {str(exc)[:200]}")
            result.spec = candidate.spec
            results.append(result)
            log.info("engine probe: %s", result)
        # torch once more, after the others: the baseline is its better run, so a burst of other load on the
        # machine during its first run cannot make a slower engine look faster
        again = measure(tower, pixels, reference)
        results[0].images_per_second = max(results[0].images_per_second, again.images_per_second)
        spec, reason = choose(results)
        cache.save_probe(flags, threads, batch, results, spec, reason)
    choice = parse_engine(spec) or EngineChoice("torch", "fp32")
    forward = tower if choice == EngineChoice("torch", "fp32") else build_forward(choice, tower, cache, pixel_shape,
                                                                                   threads)
    return ImageEngine(choice, forward, reason, results, time.perf_counter() - started)
