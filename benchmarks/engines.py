"""Every image-tower engine side by side, in one run, on the same preprocessed images: img/s at each of
--batches (and which is the smallest batch that loses nothing), each one's ratio to torch fp32 eager, mean embedding cosine and top-1 agreement with torch fp32 (on a
built-in label set's class embeddings), the fraction of the CPU's arithmetic limit it reaches, and the seconds
it took to build (export, quantise, compile) the first time and from the cache. Then what MEDZERO_ENGINE=auto
picks on this CPU, and why.

The engines are built exactly as the server builds them (app/encoders/engines.py) from one loaded model; the
images go through the server's decoder and the model's own preprocessing.

    .venv/bin/python benchmarks/engines.py                                 # tiny random-init model
    .venv/bin/python benchmarks/engines.py --model-name ViT-B-16 --images 32 --batches 1,8
    .venv/bin/python benchmarks/engines.py --model-name ViT-B-16 --batches 1,2,4,8,16,32 --experiments

The arithmetic limit is 2 FLOPs per FMA x FMA units per core (--fma-units, not readable from the OS; 2 on most
server cores) x fp32 lanes (16 with AVX-512, 8 with AVX2) x the threads torch uses x the clock (cpuinfo_max_freq,
else the current 'cpu MHz'); the model's FLOPs per image are counted by torch.utils.flop_counter on one forward.
"""
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from accuracy import cpu_flags, model_parser  # benchmarks/accuracy.py, beside this script
from throughput import DEFAULT_DATA_DIR, benchmark_images  # benchmarks/throughput.py
from torch.utils.flop_counter import FlopCounterMode

from app.encoders.engines import (
    EngineCache,
    EngineChoice,
    build_forward,
    choose,
    measure,
    onnx_graph,
    parse_engine,
    select_engine,
    weights_digest,
)
from app.encoders.engines import cpu_flags as cpu_flag_set
from app.encoders.loader import load_encoder
from app.imaging.decode import decode_image
from app.methods.zero_shot import build_class_weights
from app.services.builtin_label_sets import BUILTIN_LABEL_SETS
from app.settings import Settings

ALL_ENGINES = ("torch", "torch:bf16", "torch:int8", "onnxruntime", "onnxruntime:int8", "openvino", "openvino:bf16",
               "openvino:int8")
# tried for the issue and kept out of the server, each slower or no faster than a server engine here (README):
SLICES_PER_BATCH = 4
EXPERIMENTS = ("torch+compile", "torch:int8+compile", "openvino+throughput", "openvino:bf16+throughput")


def experimental_forward(spec: str, tower: torch.nn.Module, cache: EngineCache, pixel_shape: tuple[int, ...],
                         threads: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """torch.compile (inductor) over the fp32 or dynamic-int8 tower; or OpenVINO's THROUGHPUT hint with an
    AsyncInferQueue of its optimal number of requests, a batch split across them (one stream each)."""
    base, _, kind = spec.partition("+")
    if kind == "compile":
        return torch.compile(build_forward(parse_engine(base), tower, cache, pixel_shape, threads), dynamic=False)
    import openvino
    precision = "bf16" if base.endswith(":bf16") else "f32"
    compiled = openvino.Core().compile_model(str(onnx_graph(tower, cache, pixel_shape)), "CPU", {
        "INFERENCE_PRECISION_HINT": precision, "PERFORMANCE_HINT": "THROUGHPUT", "INFERENCE_NUM_THREADS": threads})
    requests = compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS")
    queue = openvino.AsyncInferQueue(compiled, requests)
    parts: dict[int, np.ndarray] = {}
    queue.set_callback(lambda request, i: parts.__setitem__(i, request.get_output_tensor(0).data.copy()))

    def forward(pixels: torch.Tensor) -> torch.Tensor:
        chunks = torch.tensor_split(pixels, min(requests, len(pixels)))
        for i, chunk in enumerate(chunks):
            queue.start_async({0: chunk.numpy()}, i)
        queue.wait_all()
        return torch.from_numpy(np.concatenate([parts.pop(i) for i in range(len(chunks))]))
    return forward


def best_batch(rates: dict[int, float], within: float = 0.95) -> int:
    """The smallest batch within `within` of the best img/s: no throughput lost, the least waiting."""
    best = max(rates.values())
    return min(batch for batch, rate in rates.items() if rate >= within * best)


def clock_hz() -> float | None:
    try:
        return int(Path("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq").read_text()) * 1000.0
    except (OSError, ValueError):
        pass
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("cpu MHz"):
                return float(line.split(":")[1]) * 1e6
    except OSError:
        pass
    return None


def peak_flops(fma_units: int, threads: int) -> tuple[float | None, str]:
    flags = cpu_flag_set()
    lanes = 16 if "avx512f" in flags else 8 if "avx2" in flags else 4
    clock = clock_hz()
    if clock is None:
        return None, "clock unknown"
    peak = 2 * fma_units * lanes * threads * clock
    return peak, (f"fp32 peak {peak / 1e9:.0f} GFLOP/s = 2 x {fma_units} FMA units x {lanes} lanes x {threads} "
                  f"threads x {clock / 1e9:.2f} GHz")


def tower_flops(tower: torch.nn.Module, pixels: torch.Tensor) -> float:
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        tower(pixels[:1])
    return float(counter.get_total_flops())


def main(argv: list[str] | None = None) -> int:
    parser = model_parser(__doc__)
    parser.add_argument("--images", type=int, default=32, help="images, decoded and preprocessed once")
    parser.add_argument("--batches", default="1,8", help="comma-separated batch sizes timed; the first column's "
                        "ratios use the first and the last")
    parser.add_argument("--engines", default=",".join(ALL_ENGINES), help="comma-separated engine specs")
    parser.add_argument("--experiments", action="store_true", help=f"also {', '.join(EXPERIMENTS)}")
    parser.add_argument("--fma-units", type=int, default=2, help="FMA units per core, for the arithmetic limit")
    parser.add_argument("--data-dir", type=Path, help=f"<dataset>/<class>/*.png (default {DEFAULT_DATA_DIR})")
    args = parser.parse_args(argv)
    specs = [spec.strip() for spec in args.engines.split(",") if spec.strip()]
    specs += list(EXPERIMENTS) if args.experiments else []
    batches = sorted({int(b) for b in args.batches.split(",")})
    large = batches[-1]

    with tempfile.TemporaryDirectory(prefix="medzero-engines-") as work:
        settings = Settings(model_name=args.model_name, pretrained=args.pretrained, device="cpu",
                            data_dir=Path(work), engine="torch", log_level="warning")
        encoder = load_encoder(settings)
        payloads, source = benchmark_images(args.data_dir, max(args.images, large))
        pixels = torch.stack([encoder.preprocess(decode_image(p, max_pixels=2**26, max_aspect_ratio=20).image)
                              for p in payloads])
        spec = next(s for s in BUILTIN_LABEL_SETS if s.name == "chest-xray-pneumonia")
        class_weights = build_class_weights(encoder.encode_texts, spec.class_prompts())
        tower, threads = encoder.model.visual, torch.get_num_threads()
        with torch.inference_mode():
            reference = tower(pixels).float()
        reference_top1 = (F.normalize(reference, dim=-1) @ class_weights.T).argmax(dim=-1)
        cache = EngineCache(Path(work) / "engines", encoder.model_id, weights_digest(tower), tuple(pixels.shape))
        flops = tower_flops(tower, pixels)
        peak, peak_text = peak_flops(args.fma_units, threads)

        rows, probe_results = [], []
        for spec_text in specs:
            try:
                started = time.perf_counter()
                if "+" in spec_text:
                    forward = experimental_forward(spec_text, tower, cache, tuple(pixels.shape), threads)
                else:
                    choice = parse_engine(spec_text) if spec_text != "torch:bf16" else EngineChoice("torch", "bf16")
                    forward = build_forward(choice, tower, cache, tuple(pixels.shape), threads)
                with torch.inference_mode():
                    forward(pixels[:2])
                first_build = time.perf_counter() - started
                started = time.perf_counter()
                if "+" not in spec_text:
                    build_forward(choice, tower, cache, tuple(pixels.shape), threads)(pixels[:2])
                cached_build = time.perf_counter() - started if "+" not in spec_text else None
                rates = {}
                for batch in batches:
                    # up to 4 different slices per batch size (each at least a second): medians, not a full pass
                    starts = range(0, len(pixels) - batch + 1, batch)[:SLICES_PER_BATCH]
                    timed = [measure(forward, pixels[i:i + batch], reference[i:i + batch]) for i in starts]
                    rates[batch] = float(np.median([t.images_per_second for t in timed]))
                with torch.inference_mode():
                    features = torch.cat([forward(pixels[i:i + large]).float() for i in range(0, len(pixels), large)])
            except (ImportError, RuntimeError, OSError, ValueError) as exc:
                rows.append(f"| {spec_text} | {' | '.join('–' for _ in batches)} | – | – | – | – | – | – | – | "
                            f"not here: {type(exc).__name__}: {str(exc).splitlines()[0][:80] if str(exc) else ''} |")
                continue
            cosine = F.cosine_similarity(features, reference, dim=-1)
            top1 = (F.normalize(features, dim=-1) @ class_weights.T).argmax(dim=-1)
            rows.append((spec_text, rates, float(cosine.mean()), float(cosine.min()),
                         float((top1 == reference_top1).float().mean()), first_build, cached_build))
            if "+" not in spec_text:
                probe_results.append(measure(forward, pixels[:min(8, len(pixels))], reference[:min(8, len(pixels))]))
                probe_results[-1].spec = spec_text

    base = next((r for r in rows if isinstance(r, tuple) and r[0] == "torch"), None)
    small = batches[0]
    print(f"model `{encoder.model_id}` ({'pretrained' if encoder.has_pretrained_weights else 'random'} weights), "
          f"image tower {flops / 1e9:.2f} GFLOPs / image; {source}; {threads} torch threads; "
          f"batches of {', '.join(map(str, batches))}")
    print(cpu_flags())
    print(peak_text)
    print()
    print(f"| engine | {' | '.join(f'img/s b{b}' for b in batches)} | × torch fp32 b{small} / b{large} | mean cosine "
          f"| min cosine | top-1 agreement | % of fp32 peak b{large} | best batch | build s (first / cached) |")
    print(f"|---|{'--:|' * len(batches)}--:|--:|--:|--:|--:|--:|---|")
    for row in rows:
        if isinstance(row, str):
            print(row)
            continue
        name, rates, mean_cos, min_cos, agreement, first, cached = row
        ratio = f"{rates[small] / base[1][small]:.2f} / {rates[large] / base[1][large]:.2f}" if base else "–"
        limit = f"{100 * rates[large] * flops / peak:.1f}" if peak else "–"
        cached_text = f"{cached:.1f}" if cached is not None else "–"
        print(f"| {name} | {' | '.join(f'{rates[b]:.2f}' for b in batches)} | {ratio} | {mean_cos:.6f} | "
              f"{min_cos:.6f} | {100 * agreement:.1f} % | {limit} | {best_batch(rates)} | {first:.1f} / "
              f"{cached_text} |")
    print()
    print("best batch: the smallest batch within 5 % of that engine's best img/s (MEDZERO_MAX_BATCH_SIZE: a larger "
          "one only makes queued images wait)")
    if any(r.spec == "torch" for r in probe_results):
        spec_chosen, reason = choose(probe_results)
        print(f"MEDZERO_ENGINE=auto's rule on these measurements: {spec_chosen} ({reason})")
    with tempfile.TemporaryDirectory(prefix="medzero-engines-auto-") as work:
        started = time.perf_counter()
        auto = select_engine("auto", tower, model_id=encoder.model_id, pixel_shape=tuple(pixels.shape),
                             cache_root=Path(work), threads=threads, batch=min(large, 8),
                             device=torch.device("cpu"), precision="fp32")
        print(f"MEDZERO_ENGINE=auto at start-up: {auto.choice.spec} ({auto.reason}); probe {time.perf_counter() - started:.1f} s "
              f"cold, candidates {', '.join(r.spec for r in auto.probe)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
