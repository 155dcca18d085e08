"""MedUnA's cost and what it buys: stage-1 and stage-2 time per epoch and peak RSS for each --timing-models (each
in a fresh process, so peak RSS is that model's alone), and the zeroshot / stage 1 / stage 2 accuracy on every
built-in label set with labelled images in ../shared/data/datasets, through `medzero eval`'s own code (the
stage-1 adapter is served as a bundle with zero prompt tokens, the stage-2 one as trained).

    .venv/bin/python benchmarks/meduna.py                                   # tiny + ViT-B-16 timing, tiny accuracy
    .venv/bin/python benchmarks/meduna.py --accuracy-model local-dir:/weights/BiomedCLIP   # real weights

Random weights are fine for time; the accuracy table says loudly when its model has random weights.
"""
import argparse
import asyncio
import dataclasses
import multiprocessing
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch
from accuracy import DATASET_LABEL_SETS, DEFAULT_DATA_ROOT, cpu_flags  # benchmarks/accuracy.py, beside this script

from app.evaluation.scoring import classification_metrics
from app.imaging.files import image_files
from app.jobs.evaluate import EvalOptions, evaluate_with
from app.jobs.train_meduna import MedUnAConfig, MedUnATrainer, build_manifest, bundle_tensors
from app.jobs.training import description_features, write_bundle
from app.methods.bundle import ADAPTER_FILE, MANIFEST_FILE
from app.methods.meduna import ImageStageConfig, TextStageConfig
from app.runtime import Runtime
from app.settings import DEMO_MODEL_NAME, Settings

TIMING_DATASET, TIMING_LABEL_SET = "pneumonia_cxr", "chest-xray-pneumonia"


async def timed_training(settings: Settings, config: MedUnAConfig, images: list[Path], work: Path) -> dict:
    async with Runtime.for_job(settings, progress=False) as runtime:
        head = await runtime.classifier.head(TIMING_LABEL_SET)
        trainer = MedUnATrainer(runtime.encoder, head, config, settings)
        features, labels = description_features(runtime, head)
        paths, _ = trainer.usable_images(images)
        started = time.perf_counter()
        result = trainer.train(features, labels, paths, work / "checkpoints", resume=False, progress=False)
        total = time.perf_counter() - started
        epoch_seconds = [e["seconds"] for e in result.epochs]
        return {"model": runtime.encoder.model_id, "descriptions": len(features), "images": len(paths),
                "stage1_steps": config.text.steps, "stage1_seconds": result.stage1_seconds,
                "teacher_and_setup_seconds": total - result.stage1_seconds - sum(epoch_seconds),
                "epoch_seconds": sum(epoch_seconds) / len(epoch_seconds),
                "images_per_second": len(paths) / (sum(epoch_seconds) / len(epoch_seconds)),
                "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def timing_in_fresh_process(model: str, args: argparse.Namespace, queue: multiprocessing.Queue) -> None:
    torch.set_num_threads(args.threads or torch.get_num_threads())
    with tempfile.TemporaryDirectory(prefix="medzero-meduna-") as work:
        settings = Settings(model_name=model, data_dir=Path(work) / "data", log_level="warning")
        config = MedUnAConfig(text=TextStageConfig(steps=args.text_steps),
                              image=ImageStageConfig(epochs=args.timing_epochs, batch_size=args.batch_size))
        images = image_files(args.data_root / TIMING_DATASET)[:args.timing_images]
        queue.put(asyncio.run(timed_training(settings, config, images, Path(work))))


async def accuracy_rows(args: argparse.Namespace, work: Path) -> tuple[list[dict], bool | None, str]:
    settings = Settings(model_name=args.accuracy_model, data_dir=work / "data", log_level="warning")
    config = MedUnAConfig(text=TextStageConfig(steps=args.text_steps),
                          image=ImageStageConfig(epochs=args.epochs, batch_size=args.batch_size))
    options = EvalOptions(methods=("zeroshot", "meduna"), transductive=False, n_bootstrap=args.bootstrap,
                          progress=False)
    rows = []
    async with Runtime.for_job(settings, progress=False) as runtime:
        for dataset, label_set in DATASET_LABEL_SETS.items():
            folder = args.data_root / dataset
            if not folder.is_dir():
                continue
            head = await runtime.classifier.head(label_set)
            trainer = MedUnATrainer(runtime.encoder, head, config, settings)
            features, labels = description_features(runtime, head)
            paths, _ = trainer.usable_images(image_files(folder))
            result = trainer.train(features, labels, paths, work / dataset / "checkpoints", resume=False,
                                   progress=True)
            stage1 = dataclasses.replace(result, adapter_weight=result.stage1_weight,
                                         prompt_tokens=result.prompt_tokens[:0])
            for stage, trained in (("stage 1", stage1), ("stage 2", result)):
                manifest = build_manifest(runtime, head, config, trained, None, len(paths), [])
                bundle = work / dataset / stage.replace(" ", "")
                write_bundle(bundle, bundle_tensors(trained), manifest)
                runtime.adapters.install({name: (bundle / name).read_bytes() for name in (ADAPTER_FILE, MANIFEST_FILE)})
                evaluation = await evaluate_with(runtime, folder, label_set, {}, options)
                by_name = {row.name: row for row in evaluation.rows}
                if stage == "stage 1":
                    rows.append(summarise(dataset, label_set, "zeroshot", by_name["zeroshot"], evaluation))
                rows.append(summarise(dataset, label_set, f"meduna {stage}", by_name["meduna"], evaluation))
        return rows, runtime.encoder.has_pretrained_weights, runtime.encoder.model_id


def summarise(dataset: str, label_set: str, name: str, row, evaluation) -> dict:
    metrics = classification_metrics(evaluation.y_true, row.probabilities, evaluation.class_names, n_bootstrap=0)
    return {"dataset": dataset, "label_set": label_set, "method": name, "images": len(evaluation.used),
            "accuracy": metrics["accuracy"], "balanced_accuracy": metrics["balanced_accuracy"],
            "macro_f1": metrics["macro_f1"], "macro_auroc": metrics["macro_auroc"], "ece": metrics["ece"]}


def pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}"


def render(timings: list[dict], rows: list[dict], pretrained: bool | None, model: str,
           args: argparse.Namespace) -> str:
    flags = cpu_flags()
    lines = [f"torch {torch.__version__}, {args.threads or torch.get_num_threads()} threads, {os.cpu_count()} CPUs; "
             f"{flags}", "",
             f"### Training time: {TIMING_DATASET}, {args.timing_images} images, stage 1 {args.text_steps} steps, "
             f"stage 2 batch {args.batch_size}, 50 prompt tokens, CPU", "",
             "| model | descriptions | stage 1 s | teacher pass s | stage 2 s / epoch | images/s | ÷ first "
             "| peak RSS MB |",
             "|---|--:|--:|--:|--:|--:|--:|--:|"]
    base = timings[0]["epoch_seconds"] if timings else 1.0
    for t in timings:
        lines.append(f"| `{t['model']}` | {t['descriptions']} | {t['stage1_seconds']:.1f} "
                     f"| {t['teacher_and_setup_seconds']:.1f} | {t['epoch_seconds']:.1f} "
                     f"| {t['images_per_second']:.1f} "
                     f"| {t['epoch_seconds'] / base:.1f} | {t['peak_rss_mb']:.0f} |")
    lines += ["", f"### Accuracy through `medzero eval`: `{model}`, {args.epochs} stage-2 epochs "
                  f"(trained on the same unlabelled images it is evaluated on: MedUnA is transductive by design)", ""]
    if pretrained is False:
        lines += [f"> **WARNING: `{model}` has RANDOM weights: these numbers are chance level and only show that "
                  "training, serving and evaluation run end to end.**", ""]
    lines += ["| dataset | label set | images | method | accuracy % | balanced acc. % | macro-F1 % | macro AUROC % "
              "| ECE |",
              "|---|---|--:|---|--:|--:|--:|--:|--:|"]
    for r in rows:
        lines.append(f"| {r['dataset']} | {r['label_set']} | {r['images']} | {r['method']} | {pct(r['accuracy'])} "
                     f"| {pct(r['balanced_accuracy'])} | {pct(r['macro_f1'])} | {pct(r['macro_auroc'])} "
                     f"| {r['ece']:.3f} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--timing-models", default=f"{DEMO_MODEL_NAME},ViT-B-16")
    parser.add_argument("--timing-images", type=int, default=64)
    parser.add_argument("--timing-epochs", type=int, default=1)
    parser.add_argument("--accuracy-model", default=DEMO_MODEL_NAME)
    parser.add_argument("--epochs", type=int, default=5, help="stage-2 epochs for the accuracy table")
    parser.add_argument("--text-steps", type=int, default=4000)
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--bootstrap", type=int, default=0)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--data-root", type=Path, default=DEFAULT_DATA_ROOT)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.data_root.is_dir():
        print(f"no {args.data_root} on this machine; nothing to train on", file=sys.stderr)
        return 1
    timings = []
    context = multiprocessing.get_context("spawn")
    for model in filter(None, args.timing_models.split(",")):
        print(f"[meduna] timing {model}", file=sys.stderr, flush=True)
        queue = context.Queue()
        child = context.Process(target=timing_in_fresh_process, args=(model, args, queue))
        child.start()
        timings.append(queue.get())
        child.join()
    with tempfile.TemporaryDirectory(prefix="medzero-meduna-acc-") as work:
        rows, pretrained, model = asyncio.run(accuracy_rows(args, Path(work)))
    print(render(timings, rows, pretrained, model, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
