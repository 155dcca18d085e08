"""Accuracy and calibration of every method on every built-in label set that has labelled development images in
../shared/data/datasets, through `medzero eval`'s own code (one model load for all of them).

    .venv/bin/python benchmarks/accuracy.py                         # the tiny random model: pipeline check only
    .venv/bin/python benchmarks/accuracy.py --model-name hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224

Writes benchmarks/accuracy.md (or --out) and, per dataset, the full eval folder (results.json, results.md, plots)
under --results-dir. With random weights the table says so at the top, loudly.
"""
import argparse
import asyncio
import os
import platform
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path

import torch

from app.jobs.evaluate import EvalOptions, evaluate_with, write_results
from app.runtime import Runtime
from app.settings import DEMO_MODEL_NAME, Settings

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA_ROOT = ROOT.parent / "shared" / "data" / "datasets"
# dataset folder -> the built-in label set whose class names are its folder names
DATASET_LABEL_SETS = {"pneumonia_cxr": "chest-xray-pneumonia", "covid_cxr": "chest-xray-covid",
                      "ham10000": "ham10000", "aptos_dr": "diabetic-retinopathy", "busi": "breast-ultrasound"}
CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16")


async def evaluate_all(args: argparse.Namespace, work_dir: Path) -> tuple[list[dict], list[str]]:
    settings = Settings(model_name=args.model_name, pretrained=args.pretrained, device=args.device,
                        data_dir=work_dir / "data", log_level="warning")
    options = EvalOptions(seed=args.seed, n_bootstrap=args.bootstrap, progress=True)
    summaries, skipped = [], []
    async with Runtime.for_job(settings, progress=True) as runtime:
        for dataset, label_set in DATASET_LABEL_SETS.items():
            folder = args.data_root / dataset
            if not folder.is_dir():
                skipped.append(f"`{dataset}`: no folder {folder}")
                continue
            evaluation = await evaluate_with(runtime, folder, label_set, {}, options)
            summary = write_results(evaluation, args.results_dir / dataset, options)
            summaries.append({**summary, "dataset_name": dataset})
    return summaries, skipped


def render(summaries: list[dict], skipped: list[str], args: argparse.Namespace) -> str:
    model = summaries[0]["model_id"] if summaries else args.model_name
    random_weights = any(s["pretrained_weights"] is False for s in summaries)
    lines = ["# Accuracy on the labelled development images", ""]
    if random_weights:
        lines += [f"> **WARNING: `{model}` has RANDOM weights (no pretrained weights reach this machine). Every "
                  "number below is chance level and only shows that evaluation runs end to end on real images. "
                  "Run `benchmarks/accuracy.py --model-name <real model>` where the weights are present for the "
                  "real table.**", ""]
    lines += [f"- model `{model}` ({'random' if random_weights else 'pretrained'} weights), torch "
              f"{torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, "
              f"Python {platform.python_version()}; {cpu_flags()}",
              f"- written {datetime.now(UTC):%Y-%m-%d %H:%M} UTC by `benchmarks/accuracy.py`; per-dataset results, "
              f"per-image predictions and plots in `{args.results_dir}`",
              f"- 95 % intervals: percentile bootstrap ({args.bootstrap} resamples, seed {args.seed}); ECE over 15 "
              "bins; transductive rows fit KPL on the evaluated images themselves (no labels), each balancing "
              "reading of the reference code", ""]
    lines += ["| dataset | label set | images | chance | method | acc1 | balanced acc. | macro-F1 | macro AUROC "
              "| acc5 | ECE | NLL | seconds |", "|---|---|--:|--:|---|--:|--:|--:|--:|--:|--:|--:|--:|"]
    for summary in summaries:
        for i, method in enumerate(summary["methods"]):
            m = method["metrics"]
            first = i == 0
            lines.append(
                f"| {summary['dataset_name'] if first else ''} | {summary['label_set'] if first else ''} "
                f"| {summary['dataset']['scored'] if first else ''} "
                f"| {pct(1 / len(summary['dataset']['per_class'])) if first else ''} | {method['name']} "
                f"| {interval(m['acc1'], m['intervals']['accuracy'])} "
                f"| {interval(m['balanced_accuracy'], m['intervals']['balanced_accuracy'])} | {pct(m['macro_f1'])} "
                f"| {interval(m['macro_auroc'], m['intervals']['macro_auroc'])} | {pct(m['acc5'])} "
                f"| {m['ece']:.3f} | {m['nll']:.3f} | {method['seconds']:.2f} |")
    names = list(dict.fromkeys(m["name"] for s in summaries for m in s["methods"]))
    if summaries:
        lines += ["", f"Mean over {len(summaries)} datasets (balanced accuracy, macro-F1, macro AUROC, %):", "",
                  "| method | balanced acc. | macro-F1 | macro AUROC |", "|---|--:|--:|--:|"]
        for name in names:
            rows = [m["metrics"] for s in summaries for m in s["methods"] if m["name"] == name]
            aurocs = [r["macro_auroc"] for r in rows if r["macro_auroc"] is not None]
            lines.append(f"| {name} | {pct(mean([r['balanced_accuracy'] for r in rows]))} "
                         f"| {pct(mean([r['macro_f1'] for r in rows]))} | {pct(mean(aurocs)) if aurocs else '–'} |")
    if skipped:
        lines += ["", "Skipped: " + "; ".join(skipped)]
    return "\n".join(lines) + "\n"


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


def pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}"


def interval(value: float | None, bounds: list[float] | None) -> str:
    return pct(value) + (f" [{pct(bounds[0])}–{pct(bounds[1])}]" if bounds and value is not None else "")


def cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            flags = next((line.split(":", 1)[1].split() for line in cpuinfo if line.startswith("flags")), [])
    except OSError:
        return "CPU flags: no /proc/cpuinfo"
    return "CPU flags: " + ", ".join(f"{flag} {'yes' if flag in flags else 'no'}" for flag in CPU_FLAGS)


def model_parser(doc: str) -> argparse.ArgumentParser:
    """A benchmark's argument parser with the model options every benchmark takes (as the server reads them)."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model-name", default=DEMO_MODEL_NAME, help="open_clip model id (MEDZERO_MODEL_NAME)")
    parser.add_argument("--pretrained", help="pretrained tag or checkpoint path (MEDZERO_PRETRAINED)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    return parser


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = model_parser(__doc__)
    parser.add_argument("--data-root", type=Path, default=DEFAULT_DATA_ROOT, help="<dataset>/<class>/*.png")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "accuracy.md")
    parser.add_argument("--results-dir", type=Path, default=Path(tempfile.gettempdir()) / "medzero-accuracy",
                        help="per-dataset eval folders (results.json, results.md, plots)")
    parser.add_argument("--bootstrap", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.data_root.is_dir():
        print(f"no {args.data_root} on this machine (see ../shared/data/README.md); nothing to evaluate",
              file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory(prefix="medzero-accuracy-") as work_dir:
        summaries, skipped = asyncio.run(evaluate_all(args, Path(work_dir)))
        table = render(summaries, skipped, args)
    args.out.write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
