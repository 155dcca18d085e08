"""Every image-tower engine side by side, in one run, on the same preprocessed images: img/s at batch 1 and at
--batch, each one's ratio to torch fp32 eager, mean embedding cosine and top-1 agreement with torch fp32 (on a
built-in label set's class embeddings), the fraction of the CPU's arithmetic limit it reaches, and the seconds
it took to build (export, quantise, compile) the first time and from the cache. Then what MEDZERO_ENGINE=auto
picks on this CPU, and why.

The engines are built exactly as the server builds them (app/encoders/engines.py) from one loaded model; the
images go through the server's decoder and the model's own preprocessing.

    .venv/bin/python benchmarks/engines.py                                 # tiny random-init model
    .venv/bin/python benchmarks/engines.py --model-name ViT-B-16 --images 32 --batch 8

The arithmetic limit is 2 FLOPs per FMA x FMA units per core (--fma-units, not readable from the OS; 2 on most
server cores) x fp32 lanes (16 with AVX-512, 8 with AVX2) x the threads torch uses x the clock (cpuinfo_max_freq,
else the current 'cpu MHz'); the model's FLOPs per image are counted by torch.utils.flop_counter on one forward.
"""
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from accuracy import cpu_flags, model_parser  # benchmarks/accuracy.py, beside this script
from throughput import DEFAULT_DATA_DIR, load_images, synthesise_images  # benchmarks/throughput.py
from torch.utils.flop_counter import FlopCounterMode

from app.encoders.engines import (
    EngineCache,
    EngineChoice,
    build_forward,
    choose,
    measure,
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

ALL_ENGINES = ("torch", "torch:bf16", "torch:int8", "onnxruntime", "onnxruntime:int8", "openvino", "openvino:bf16")


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
    parser.add_argument("--batch", type=int, default=8, help="the larger batch size timed (the other is 1)")
    parser.add_argument("--engines", default=",".join(ALL_ENGINES), help="comma-separated engine specs")
    parser.add_argument("--fma-units", type=int, default=2, help="FMA units per core, for the arithmetic limit")
    parser.add_argument("--data-dir", type=Path, help=f"<dataset>/<class>/*.png (default {DEFAULT_DATA_DIR})")
    args = parser.parse_args(argv)
    specs = [spec.strip() for spec in args.engines.split(",") if spec.strip()]

    with tempfile.TemporaryDirectory(prefix="medzero-engines-") as work:
        settings = Settings(model_name=args.model_name, pretrained=args.pretrained, device="cpu",
                            data_dir=Path(work), engine="torch", log_level="warning")
        encoder = load_encoder(settings)
        data_dir = args.data_dir or (DEFAULT_DATA_DIR if DEFAULT_DATA_DIR.is_dir() else None)
        payloads = load_images(data_dir, args.images) if data_dir else synthesise_images(args.images)
        source = f"{args.images} PNGs from {data_dir}" if data_dir else f"{args.images} synthesised PNGs"
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
            choice = parse_engine(spec_text) if spec_text != "torch:bf16" else EngineChoice("torch", "bf16")
            try:
                started = time.perf_counter()
                forward = build_forward(choice, tower, cache, tuple(pixels.shape), threads)
                with torch.inference_mode():
                    forward(pixels[:2])
                first_build = time.perf_counter() - started
                started = time.perf_counter()
                build_forward(choice, tower, cache, tuple(pixels.shape), threads)(pixels[:2])
                cached_build = time.perf_counter() - started
                one = measure(forward, pixels[:1], reference[:1])
                batched = [measure(forward, pixels[i:i + args.batch], reference[i:i + args.batch])
                           for i in range(0, len(pixels) - args.batch + 1, args.batch)] or [one]
                with torch.inference_mode():
                    features = torch.cat([forward(pixels[i:i + args.batch]).float()
                                          for i in range(0, len(pixels), args.batch)])
            except (ImportError, RuntimeError, OSError, ValueError) as exc:
                rows.append(f"| {spec_text} | – | – | – | – | – | – | – | not here: {type(exc).__name__}: "
                            f"{str(exc).splitlines()[0][:80] if str(exc) else ''} |")
                continue
            cosine = F.cosine_similarity(features, reference, dim=-1)
            top1 = (F.normalize(features, dim=-1) @ class_weights.T).argmax(dim=-1)
            batch_rate = float(np.median([b.images_per_second for b in batched]))
            rows.append((spec_text, one.images_per_second, batch_rate, float(cosine.mean()), float(cosine.min()),
                         float((top1 == reference_top1).float().mean()), first_build, cached_build))
            probe_results.append(measure(forward, pixels[:min(8, len(pixels))], reference[:min(8, len(pixels))]))
            probe_results[-1].spec = spec_text

    base = next((r for r in rows if isinstance(r, tuple) and r[0] == "torch"), None)
    print(f"model `{encoder.model_id}` ({'pretrained' if encoder.has_pretrained_weights else 'random'} weights), "
          f"image tower {flops / 1e9:.2f} GFLOPs / image; {source}; {threads} torch threads; "
          f"batches of 1 and {args.batch}")
    print(cpu_flags())
    print(peak_text)
    print()
    print(f"| engine | img/s b1 | img/s b{args.batch} | × torch fp32 b1 / b{args.batch} | mean cosine | min cosine | "
          f"top-1 agreement | % of fp32 peak b{args.batch} | build s (first / cached) |")
    print("|---|--:|--:|--:|--:|--:|--:|--:|---|")
    for row in rows:
        if isinstance(row, str):
            print(row)
            continue
        name, b1, bn, mean_cos, min_cos, agreement, first, cached = row
        ratio = f"{b1 / base[1]:.2f} / {bn / base[2]:.2f}" if base else "–"
        limit = f"{100 * bn * flops / peak:.1f}" if peak else "–"
        print(f"| {name} | {b1:.2f} | {bn:.2f} | {ratio} | {mean_cos:.6f} | {min_cos:.6f} | {100 * agreement:.1f} % "
              f"| {limit} | {first:.1f} / {cached:.1f} |")
    print()
    if any(r.spec == "torch" for r in probe_results):
        spec_chosen, reason = choose(probe_results)
        print(f"MEDZERO_ENGINE=auto's rule on these measurements: {spec_chosen} ({reason})")
    with tempfile.TemporaryDirectory(prefix="medzero-engines-auto-") as work:
        started = time.perf_counter()
        auto = select_engine("auto", tower, model_id=encoder.model_id, pixel_shape=tuple(pixels.shape),
                             cache_root=Path(work), threads=threads, batch=min(args.batch, 8),
                             device=torch.device("cpu"), precision="fp32")
        print(f"MEDZERO_ENGINE=auto at start-up: {auto.choice.spec} ({auto.reason}); probe {time.perf_counter() - started:.1f} s "
              f"cold, candidates {', '.join(r.spec for r in auto.probe)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
