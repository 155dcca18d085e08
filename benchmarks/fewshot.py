"""Few-shot against zero-shot: accuracy of zeroshot vs fewshot (the training-free cache, method=fewshot) at 1, 4
and 16 labelled shots per class, mean over 3 seeds, on every built-in label set with labelled development images
in ../shared/data/datasets, and of HiCA (method=hica) trained on the same shots.

Each dataset is encoded once through the server's own path (Runtime.for_job, Classifier.encode_pool); per shot
count and seed, k images per class are drawn as the support set and every other image is a query, so zero-shot and
few-shot are scored on exactly the same queries with the same features (FewShot.score, the /classify code). HiCA is
trained per shot count and seed by the job's own trainer (app.jobs.train_hica: stage 1 on the whole dataset,
unlabelled, as a site's archive; stage 2 on the shots), then the queries are encoded through its tuned tower the
way the server does (Classifier.encode_pool with the adapter's tower variant) and scored by HiCA.score.

    .venv/bin/python benchmarks/fewshot.py                       # the tiny random model: pipeline check only
    .venv/bin/python benchmarks/fewshot.py --model-name hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224
"""
import argparse
import asyncio
import dataclasses
import statistics
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from accuracy import (  # benchmarks/accuracy.py, beside this script
    DATASET_LABEL_SETS,
    DEFAULT_DATA_ROOT,
    cpu_flags,
    model_parser,
)
from sklearn.metrics import accuracy_score, balanced_accuracy_score

from app.evaluation.dataset import load_labelled
from app.jobs.train_hica import HiCAConfig, HiCATrainer, Shots
from app.jobs.training import description_features
from app.methods.fewshot import FewShot, FewShotConfig, SupportSet
from app.methods.hica import HiCA
from app.methods.hica_config import AlignConfig
from app.methods.zero_shot import ZeroShot
from app.runtime import Runtime
from app.services.uploads import on_disk
from app.settings import Settings


@dataclass(frozen=True)
class Row:
    dataset: str
    shots: int
    queries: int
    zeroshot: tuple[float, float]          # (accuracy, balanced accuracy), mean over seeds
    fewshot: tuple[float, float]
    fewshot_sd: float                      # balanced accuracy's standard deviation over seeds
    hica: tuple[float, float] | None       # None: not trained (--no-hica)
    hica_sd: float | None


def draw_support(labels: np.ndarray, shots: int, seed: int) -> np.ndarray | None:
    """`shots` indices per class (None when a class has no image left over as a query)."""
    rng = np.random.default_rng(seed)
    chosen = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        if len(members) <= shots:
            return None
        chosen.extend(rng.choice(members, shots, replace=False))
    return np.sort(np.array(chosen))


async def run(args: argparse.Namespace, work_dir: Path) -> tuple[list[Row], str, bool, list[str]]:
    settings = Settings(model_name=args.model_name, pretrained=args.pretrained, device=args.device,
                        data_dir=work_dir / "data", log_level="warning")
    rows, skipped = [], []
    async with Runtime.for_job(settings, progress=True) as runtime:
        classifier, logit_scale = runtime.classifier, runtime.encoder.logit_scale
        fewshot = FewShot(FewShotConfig(alpha=args.alpha, beta=args.beta))
        hica = HiCA(runtime.encoder.model.visual)
        for dataset, label_set in DATASET_LABEL_SETS.items():
            folder = args.data_root / dataset
            if not folder.is_dir():
                skipped.append(f"`{dataset}`: no folder {folder}")
                continue
            head = await classifier.head(label_set)
            images = load_labelled(folder, head.class_names)
            files = [on_disk(path, str(path), settings.max_upload_bytes) for path in images.paths]
            pool = await classifier.encode_pool(files, progress=True, description=f"encoding {dataset}")
            features = pool.features.float()
            labels = np.array([head.class_names.index(images.labels[i]) for i in pool.used])
            paths = [images.paths[i] for i in pool.used]
            descriptions = description_features(runtime, head)
            for shots in args.shots:
                scores = {"zeroshot": [], "fewshot": [], "hica": []}
                queries = 0
                for seed in range(args.seeds):
                    support_rows = draw_support(labels, shots, seed)
                    if support_rows is None:
                        break
                    query = np.setdiff1d(np.arange(len(labels)), support_rows)
                    support = SupportSet(label_set, head.version, head.model_id, head.class_names,
                                         features[support_rows], torch.from_numpy(labels[support_rows]))
                    truth, queries = labels[query], len(query)
                    for name, method, state in (("zeroshot", ZeroShot(), None), ("fewshot", fewshot, support)):
                        predicted = method.score(features[query], head, state, logit_scale=logit_scale) \
                            .logits.argmax(dim=-1).numpy()
                        scores[name].append((accuracy_score(truth, predicted),
                                             balanced_accuracy_score(truth, predicted)))
                    if args.hica:
                        predicted = await hica_predictions(runtime, hica, head, descriptions, paths, labels,
                                                           support_rows, [files[pool.used[i]] for i in query],
                                                           HiCAConfig(align=AlignConfig(epochs=args.hica_epochs),
                                                                      seed=seed), work_dir / "checkpoints")
                        scores["hica"].append((accuracy_score(truth, predicted),
                                               balanced_accuracy_score(truth, predicted)))
                if not scores["fewshot"]:
                    skipped.append(f"`{dataset}` at {shots} shots: a class has no image left as a query")
                    continue
                hica_scores = scores["hica"] or None
                rows.append(Row(dataset, shots, queries, _mean(scores["zeroshot"]), _mean(scores["fewshot"]),
                                statistics.pstdev(b for _, b in scores["fewshot"]),
                                hica_scores and _mean(hica_scores),
                                hica_scores and statistics.pstdev(b for _, b in hica_scores)))
        return rows, runtime.encoder.model_id, runtime.encoder.has_pretrained_weights, skipped


async def hica_predictions(runtime: Runtime, hica: HiCA, head, descriptions: tuple[torch.Tensor, torch.Tensor],
                           paths: list[Path], labels: np.ndarray, support_rows: np.ndarray, query_files: list,
                           config: HiCAConfig, checkpoints: Path) -> np.ndarray:
    """Train HiCA on the support rows (stage 1 on every image, unlabelled), then predict the query files through
    the served path: its tuned tower in Classifier.encode_pool, HiCA.score."""
    trainer = HiCATrainer(runtime.encoder, head, config, runtime.settings)
    shots = Shots([paths[i] for i in support_rows], [int(labels[i]) for i in support_rows])
    # the model runs on this thread for the training, as in the job; the batcher is idle meanwhile
    result = trainer.train(*descriptions, paths, shots, checkpoints, resume=False, progress=False)
    manifest = {"label_set": head.label_set, "label_set_version": head.version, "model_id": head.model_id,
                "class_names": list(head.class_names), "tuning": dataclasses.asdict(config.tuning)}
    adapter = hica.adapter(adapter_id=f"benchmark-seed-{config.seed}", manifest=manifest,
                           class_embeddings=result.class_embeddings, text_projection=result.text_projection,
                           trainable=result.trainable, temperature=result.temperature)
    queries = await runtime.classifier.encode_pool(query_files, variant=adapter.tower_variant)
    if len(queries.used) != len(query_files):
        raise RuntimeError(f"{len(query_files) - len(queries.used)} query files did not encode a second time")
    return hica.score(queries.features, head, adapter, logit_scale=runtime.encoder.logit_scale).logits \
        .argmax(dim=-1).numpy()


def _mean(pairs: list[tuple[float, float]]) -> tuple[float, float]:
    return (statistics.fmean(a for a, _ in pairs), statistics.fmean(b for _, b in pairs))


def _ratio(balanced: float, baseline: float) -> str:
    return f"{balanced / baseline:.2f}" if baseline else "n/a"


def render(rows: list[Row], model_id: str, pretrained: bool, skipped: list[str], args: argparse.Namespace) -> str:
    lines = []
    if not pretrained:
        lines += [(f"> **`{model_id}` has RANDOM weights: the numbers only show that the pipeline runs. The cache "
                  "still learns from the support images' own embeddings, so fewshot can beat chance here.**"), ""]
    lines += [(f"model `{model_id}`, alpha {args.alpha}, beta {args.beta}, HiCA defaults with {args.hica_epochs} "
               f"stage-2 epochs, mean over {args.seeds} seeds; "
              f"{cpu_flags()}"), "",
              ("| dataset | shots / class | queries | zeroshot acc | zeroshot bal. acc | fewshot acc | fewshot bal. acc "
              "(± sd) | hica acc | hica bal. acc (± sd) | bal. acc fewshot / zeroshot | hica / zeroshot |"),
              "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|"]
    for row in rows:
        hica = (f"| – | – | {_ratio(row.fewshot[1], row.zeroshot[1])} | – " if row.hica is None else
                f"| {100 * row.hica[0]:.1f} | {100 * row.hica[1]:.1f} ± {100 * row.hica_sd:.1f} "
                f"| {_ratio(row.fewshot[1], row.zeroshot[1])} | {_ratio(row.hica[1], row.zeroshot[1])} ")
        lines.append(f"| {row.dataset} | {row.shots} | {row.queries} | {100 * row.zeroshot[0]:.1f} "
                     f"| {100 * row.zeroshot[1]:.1f} | {100 * row.fewshot[0]:.1f} "
                     f"| {100 * row.fewshot[1]:.1f} ± {100 * row.fewshot_sd:.1f} {hica}|")
    if skipped:
        lines += ["", "Skipped: " + "; ".join(skipped)]
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = model_parser(__doc__)
    parser.add_argument("--data-root", type=Path, default=DEFAULT_DATA_ROOT, help="<dataset>/<class>/*.png")
    parser.add_argument("--shots", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--alpha", type=float, default=1.0, help="MEDZERO_FEWSHOT_ALPHA")
    parser.add_argument("--beta", type=float, default=5.5, help="MEDZERO_FEWSHOT_BETA")
    parser.add_argument("--hica-epochs", type=int, default=AlignConfig().epochs, help="HiCA stage 2 epochs")
    parser.add_argument("--no-hica", dest="hica", action="store_false", help="zeroshot and fewshot only")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="medzero-fewshot-bench-") as work_dir:
        rows, model_id, pretrained, skipped = asyncio.run(run(args, Path(work_dir)))
    print(render(rows, model_id, pretrained, skipped, args))


if __name__ == "__main__":
    main()
