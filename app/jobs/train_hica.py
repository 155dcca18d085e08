"""`medzero train hica --label-set NAME --shots DIR --out DIR`: HiCA's offline training (app.methods.hica states
every loss); the server loads the result and serves it as method=hica.

--shots is a folder of class folders (or a path,label CSV) of labelled images; `--shots-per-class k` draws k per
class with --seed and holds the rest back to report on. --images is a folder of unlabelled site images for stage 1
(recursively); without it stage 1 clusters the shots themselves, unlabelled. Files that cannot be read as /classify
reads them are skipped and listed. Stage 1 (text projection, then the k-means pseudo-label pass over the tower)
writes checkpoints/stage1.pt, every stage-2 epoch checkpoints/epoch-NNN.pt; `--resume` continues from the last one
to the same result (each epoch re-seeds from (seed, stage, epoch)). The output folder gets adapter.safetensors
(class embeddings, text projection, tuned tower tensors) and manifest.json, the bundle format MedUnA's job writes
(app.jobs.training), each written to a temporary name and renamed; existing results are kept unless `--force`.
"""
import asyncio
import dataclasses
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.cluster import KMeans
from torch.func import functional_call
from tqdm import tqdm

from app.encoders.loader import Encoder
from app.errors import InvalidInput
from app.evaluation.dataset import load_labelled
from app.imaging.files import image_files
from app.jobs.training import (
    CHECKPOINTS,
    decode_training_image,
    description_features,
    latest_checkpoint,
    manifest_identity,
    refuse_to_overwrite,
    run_fingerprint,
    save_checkpoint,
    start_fresh,
    usable_images,
    write_bundle,
)
from app.methods.base import ClassHead
from app.methods.hica import (
    BUNDLE_FORMAT,
    align_loss,
    cluster_loss,
    init_trainable,
    project_text,
    supervised_contrastive,
    tuned_weights,
)
from app.methods.hica_config import AlignConfig, PreAdaptConfig, TuningConfig
from app.runtime import Runtime
from app.settings import Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HiCAConfig:
    tuning: TuningConfig = field(default_factory=TuningConfig)
    pre: PreAdaptConfig = field(default_factory=PreAdaptConfig)
    align: AlignConfig = field(default_factory=AlignConfig)
    seed: int = 0


@dataclass(frozen=True)
class Shots:
    """Labelled images: paths and class indices, in the order drawn."""
    paths: list[Path]
    labels: list[int]


@dataclass
class HiCAResult:
    trainable: dict[str, torch.Tensor]     # the tower tensors trained (LoRA factors or block weights), on the CPU
    text_projection: torch.Tensor          # M (dim, dim)
    class_embeddings: torch.Tensor         # t_c = g(e_c), (n_classes, dim)
    temperature: float                     # τ_g
    stage1: dict                           # metrics: text losses, clusters, pseudo-label epochs
    epochs: list[dict]                     # stage 2, per epoch: every loss term, seconds


@dataclass
class TrainReport:
    out_dir: Path
    manifest: dict
    skipped: list[tuple[str, str]] = field(default_factory=list)


def main(settings: Settings, label_set: str, shots_dir: Path, out_dir: Path, *, images_dir: Path | None = None,
         shots_per_class: int | None = None, config: HiCAConfig = HiCAConfig(), resume: bool = False,
         force: bool = False, progress: bool = True) -> TrainReport:
    if images_dir is not None and not images_dir.is_dir():
        raise InvalidInput(f"no such folder: {images_dir}")
    if shots_per_class is not None and shots_per_class < 1:
        raise InvalidInput(f"--shots-per-class must be at least 1; got {shots_per_class}")
    refuse_to_overwrite(out_dir, force)
    return asyncio.run(_train(settings, label_set, shots_dir, out_dir, images_dir, shots_per_class, config, resume,
                              progress))


async def _train(settings: Settings, label_set: str, shots_dir: Path, out_dir: Path, images_dir: Path | None,
                 shots_per_class: int | None, config: HiCAConfig, resume: bool, progress: bool) -> TrainReport:
    async with Runtime.for_job(settings, progress=progress) as runtime:
        head = await runtime.classifier.head(label_set)
        labelled = load_labelled(shots_dir, head.class_names)
        usable, skipped = usable_images(labelled.paths, settings)
        by_path = dict(zip(labelled.paths, labelled.labels))
        shots, held_out = draw_shots([(p, head.class_names.index(by_path[p])) for p in usable], len(head.class_names),
                                     shots_per_class, config.seed, head.class_names)
        if images_dir is not None:
            unlabelled, more_skipped = usable_images(image_files(images_dir), settings)
            skipped += more_skipped
        else:
            unlabelled = list(shots.paths)
        if len(unlabelled) < 2:
            raise InvalidInput(f"stage 1 needs at least 2 usable unlabelled images; got {len(unlabelled)}")
        trainer = HiCATrainer(runtime.encoder, head, config, settings)
        descriptions, description_classes = description_features(runtime, head)
        # the model runs on this thread for the whole job; the batcher is idle
        result = trainer.train(descriptions, description_classes, unlabelled, shots, out_dir / CHECKPOINTS,
                               resume=resume, progress=progress)
        accuracy = {"shots": trainer.accuracy(shots, result)}
        if held_out.paths:
            accuracy["held_out"] = trainer.accuracy(held_out, result)
        manifest = build_manifest(runtime, head, config, result, accuracy, shots, len(unlabelled), skipped)
        return TrainReport(out_dir, write_bundle(out_dir, bundle_tensors(result), manifest), skipped)


def draw_shots(labelled: Sequence[tuple[Path, int]], n_classes: int, per_class: int | None, seed: int,
               class_names: Sequence[str]) -> tuple[Shots, Shots]:
    """(shots, held out): `per_class` images of every class drawn with `seed` (all of them when None), the rest
    held back. Every class needs at least one shot."""
    rng = np.random.default_rng(seed)
    chosen: list[tuple[Path, int]] = []
    rest: list[tuple[Path, int]] = []
    for c in range(n_classes):
        members = [item for item in labelled if item[1] == c]
        if not members:
            raise InvalidInput(f"no usable labelled image of class {class_names[c]!r}; HiCA needs at least one shot "
                               "per class")
        if per_class is not None and len(members) < per_class:
            raise InvalidInput(f"class {class_names[c]!r} has {len(members)} usable images; --shots-per-class is "
                               f"{per_class}")
        order = rng.permutation(len(members)) if per_class is not None else np.arange(len(members))
        take = len(members) if per_class is None else per_class
        chosen += [members[i] for i in order[:take]]
        rest += [members[i] for i in order[take:]]
    return (Shots([p for p, _ in chosen], [y for _, y in chosen]), Shots([p for p, _ in rest], [y for _, y in rest]))


def grid_tiles(pixels: torch.Tensor, grid: int) -> torch.Tensor:
    """(n, 3, H, W) -> (n · grid², 3, H, W): each image cut into grid × grid tiles (row by row), each resized back
    to the input size (bilinear), so the unchanged tower encodes a region as an image."""
    height, width = pixels.shape[-2:]
    tiles = [tile for band in torch.tensor_split(pixels, grid, dim=-2)
             for tile in torch.tensor_split(band, grid, dim=-1)]
    resized = [F.interpolate(tile, size=(height, width), mode="bilinear", align_corners=False) for tile in tiles]
    return torch.stack(resized, dim=1).flatten(0, 1)


class HiCATrainer:
    def __init__(self, encoder: Encoder, head: ClassHead, config: HiCAConfig, settings: Settings) -> None:
        self.encoder, self.head, self.config, self.settings = encoder, head, config, settings
        self.visual = encoder.model.visual
        self.base = {name: p.detach() for name, p in self.visual.named_parameters()}
        self.lora_scale = config.tuning.lora_alpha / config.tuning.lora_rank
        self.temperature = (1.0 / encoder.logit_scale if config.align.global_temperature is None
                            else config.align.global_temperature)
        self.class_text = head.class_weights.float()

    def _pixels(self, paths: Sequence[Path]) -> torch.Tensor:
        return torch.stack([self.encoder.preprocess(decode_training_image(p, self.settings)) for p in paths])

    def features(self, pixels: torch.Tensor, trainable: dict[str, torch.Tensor] | None) -> torch.Tensor:
        """Normalised embeddings of the tower with `trainable` applied (None: the loaded tower), differentiable
        in `trainable`."""
        pixels = pixels.to(self.encoder.device, self.encoder.dtype)
        if trainable is None:
            output = self.visual(pixels)
        else:
            weights = tuned_weights(self.base, trainable, self.config.tuning.mode, self.lora_scale)
            weights = {name: w.to(self.base[name].dtype) for name, w in weights.items()}
            output = functional_call(self.visual, weights, (pixels,))
        output = output[0] if isinstance(output, tuple) else output
        return F.normalize(output.float(), dim=-1)

    def train(self, descriptions: torch.Tensor, description_classes: torch.Tensor, unlabelled: list[Path],
              shots: Shots, checkpoints: Path, *, resume: bool, progress: bool) -> HiCAResult:
        fingerprint = run_fingerprint({"model": self.encoder.model_id, "label_set": self.head.label_set,
                                       "version": self.head.version, "config": dataclasses.asdict(self.config),
                                       "unlabelled": [str(p) for p in unlabelled],
                                       "shots": [[str(p), y] for p, y in zip(shots.paths, shots.labels)]},
                                      descriptions, self.class_text)
        checkpoints.mkdir(parents=True, exist_ok=True)
        state = latest_checkpoint(checkpoints, fingerprint) if resume else None
        frozen = [p for p in self.encoder.model.parameters() if p.requires_grad]
        for parameter in frozen:          # only the trainable tensors get gradients, never the loaded model
            parameter.requires_grad_(False)
        try:
            if state is None:
                start_fresh(checkpoints)
                state = self._stage1(descriptions, description_classes, unlabelled, progress)
                state["fingerprint"] = fingerprint
                save_checkpoint(state, checkpoints / "stage1.pt")
            state = self._stage2(state, descriptions, description_classes, shots, checkpoints, progress)
        finally:
            for parameter in frozen:
                parameter.requires_grad_(True)
        projection = state["text_projection"]
        return HiCAResult(state["trainable"], projection, project_text(self.class_text, projection),
                          self.temperature, state["stage1"], state["epochs"])

    # --- stage 1 -------------------------------------------------------------------------------------------------

    def _stage1(self, descriptions: torch.Tensor, description_classes: torch.Tensor, unlabelled: list[Path],
                progress: bool) -> dict:
        pre, tuning = self.config.pre, self.config.tuning
        generator = torch.Generator().manual_seed(self.config.seed)
        started = time.perf_counter()
        projection, text_losses = self._text_stage(descriptions, description_classes, progress)
        trainable = {name: value.to(self.encoder.device).requires_grad_(True)
                     for name, value in init_trainable(self.visual, tuning, generator).items()}
        centroids, assignments = self._clusters(unlabelled, progress)
        optimizer = torch.optim.AdamW(trainable.values(), lr=tuning.lr, weight_decay=tuning.weight_decay)
        cluster_epochs = []
        for epoch in range(pre.epochs):
            cluster_epochs.append(self._cluster_epoch(epoch, unlabelled, centroids, assignments, trainable,
                                                      optimizer, progress))
        counts = np.bincount(assignments.numpy(), minlength=len(centroids))
        stage1 = {"text": {"steps": pre.text_steps, "first_loss": text_losses[0] if text_losses else None,
                           "final_loss": text_losses[-1] if text_losses else None},
                  "clusters": {"k": len(centroids), "images": len(unlabelled), "sizes": counts.tolist()},
                  "cluster_epochs": cluster_epochs, "seconds": round(time.perf_counter() - started, 3)}
        return {"stage1": stage1, "text_projection": projection,
                "trainable": {name: value.detach().cpu().clone() for name, value in trainable.items()},
                "epochs": []}

    def _text_stage(self, descriptions: torch.Tensor, description_classes: torch.Tensor,
                    progress: bool) -> tuple[torch.Tensor, list[float]]:
        """L_text over the descriptions and the class prompt ensembles, training the projection M (from zero)."""
        pre, tuning = self.config.pre, self.config.tuning
        texts = torch.cat([descriptions, self.class_text])
        labels = torch.cat([description_classes, torch.arange(len(self.class_text))])
        projection = torch.zeros(texts.shape[1], texts.shape[1], requires_grad=True)
        optimizer = torch.optim.AdamW([projection], lr=tuning.text_lr, weight_decay=tuning.weight_decay)
        losses = []
        for _ in tqdm(range(pre.text_steps), desc="stage 1: text projection", unit="step", disable=not progress):
            loss = supervised_contrastive(project_text(texts, projection), labels, pre.text_temperature)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        if losses:
            log.info("stage 1 text: %d steps, SupCon loss %.4f -> %.4f", len(losses), losses[0], losses[-1])
        return projection.detach().clone(), losses

    @torch.no_grad()
    def _clusters(self, unlabelled: list[Path], progress: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """k-means on the loaded tower's embeddings -> (normalised centroids (k, d), assignments (n,))."""
        pre = self.config.pre
        wanted = pre.clusters_per_class * len(self.head.class_names) if pre.clusters is None else pre.clusters
        k = max(1, min(wanted, len(unlabelled)))
        if k < wanted:
            log.warning("stage 1: %d clusters asked for, %d unlabelled images: clustering into %d", wanted,
                        len(unlabelled), k)
        batch = pre.batch_size
        features = torch.cat([self.features(self._pixels(unlabelled[i:i + batch]), None).cpu()
                              for i in tqdm(range(0, len(unlabelled), batch), desc="stage 1: clustering",
                                            unit="batch", disable=not progress)])
        kmeans = KMeans(n_clusters=k, n_init=4, random_state=self.config.seed).fit(features.double().numpy())
        centroids = F.normalize(torch.from_numpy(kmeans.cluster_centers_).float(), dim=-1)
        return centroids, torch.from_numpy(kmeans.labels_.astype(np.int64))

    def _cluster_epoch(self, epoch: int, unlabelled: list[Path], centroids: torch.Tensor, assignments: torch.Tensor,
                       trainable: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer, progress: bool) -> dict:
        pre = self.config.pre
        order = torch.randperm(len(unlabelled), generator=self._epoch_generator(1, epoch)).tolist()
        started, total, seen = time.perf_counter(), 0.0, 0
        device_centroids = centroids.to(self.encoder.device)
        batches = [order[i:i + pre.batch_size] for i in range(0, len(order), pre.batch_size)]
        for batch in tqdm(batches, desc=f"stage 1: pseudo-labels, epoch {epoch + 1}/{pre.epochs}", unit="batch",
                          disable=not progress):
            features = self.features(self._pixels([unlabelled[i] for i in batch]), trainable)
            loss = cluster_loss(features, device_centroids, assignments[batch].to(self.encoder.device),
                                pre.cluster_temperature)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += loss.item() * len(batch)
            seen += len(batch)
        row = {"epoch": epoch + 1, "loss": total / seen, "seconds": round(time.perf_counter() - started, 3)}
        log.info("stage 1 pseudo-labels epoch %d/%d: loss %.4f", epoch + 1, pre.epochs, row["loss"])
        return row

    # --- stage 2 -------------------------------------------------------------------------------------------------

    def _stage2(self, state: dict, descriptions: torch.Tensor, description_classes: torch.Tensor, shots: Shots,
                checkpoints: Path, progress: bool) -> dict:
        align, tuning = self.config.align, self.config.tuning
        device = self.encoder.device
        trainable = {name: value.to(device).requires_grad_(True) for name, value in state["trainable"].items()}
        projection = state["text_projection"].clone().requires_grad_(True)
        optimizer = torch.optim.AdamW([{"params": list(trainable.values()), "lr": tuning.lr},
                                       {"params": [projection], "lr": tuning.text_lr}],
                                      weight_decay=tuning.weight_decay)
        if "optimizer" in state:
            optimizer.load_state_dict(state["optimizer"])
        epochs = list(state.get("epochs", []))
        for epoch in range(len(epochs), align.epochs):
            epochs.append(self._align_epoch(epoch, shots, descriptions, description_classes, trainable, projection,
                                            optimizer, progress))
            state = {**state, "epochs": epochs, "text_projection": projection.detach().clone(),
                     "trainable": {name: value.detach().cpu().clone() for name, value in trainable.items()},
                     "optimizer": optimizer.state_dict()}
            save_checkpoint(state, checkpoints / f"epoch-{epoch + 1:03d}.pt")
        return state

    def _align_epoch(self, epoch: int, shots: Shots, descriptions: torch.Tensor, description_classes: torch.Tensor,
                     trainable: dict[str, torch.Tensor], projection: torch.Tensor, optimizer: torch.optim.Optimizer,
                     progress: bool) -> dict:
        align = self.config.align
        order = torch.randperm(len(shots.paths), generator=self._epoch_generator(2, epoch)).tolist()
        labels = torch.tensor(shots.labels)
        started, totals, seen = time.perf_counter(), {}, 0
        batches = [order[i:i + align.batch_size] for i in range(0, len(order), align.batch_size)]
        for batch in tqdm(batches, desc=f"stage 2: alignment, epoch {epoch + 1}/{align.epochs}", unit="batch",
                          disable=not progress):
            terms = self.align_terms([shots.paths[i] for i in batch], labels[batch], descriptions,
                                     description_classes, trainable, projection)
            optimizer.zero_grad()
            terms.total.backward()
            optimizer.step()
            for name, value in terms.as_floats().items():
                totals[name] = totals.get(name, 0.0) + value * len(batch)
            seen += len(batch)
        row = {"epoch": epoch + 1, **{name: value / seen for name, value in totals.items()},
               "seconds": round(time.perf_counter() - started, 3)}
        log.info("stage 2 epoch %d/%d: loss %.4f (global %.4f, local %.4f, hard negative %.4f, separation %.4f)",
                 epoch + 1, align.epochs, row["loss"], row["global"], row["local"], row["hard_negative"],
                 row["separation"])
        return row

    def align_terms(self, paths: Sequence[Path], labels: torch.Tensor, descriptions: torch.Tensor,
                    description_classes: torch.Tensor, trainable: dict[str, torch.Tensor] | None,
                    projection: torch.Tensor):
        """Stage 2's loss terms on these shots with these parameters (what an epoch minimises)."""
        align = self.config.align
        pixels = self._pixels(paths)
        features = self.features(pixels, trainable)
        regions = self.features(grid_tiles(pixels, align.grid), trainable).view(len(paths), align.grid ** 2, -1)
        device = features.device
        class_text = project_text(self.class_text.to(device), projection.to(device))
        description_text = project_text(descriptions.to(device), projection.to(device))
        return align_loss(features, regions, class_text, description_text, description_classes.to(device),
                          labels.to(device), align, self.temperature)

    def _epoch_generator(self, stage: int, epoch: int) -> torch.Generator:
        return torch.Generator().manual_seed(self.config.seed * 1_000_003 + stage * 10_007 + epoch + 1)

    @torch.no_grad()
    def accuracy(self, images: Shots, result: HiCAResult) -> dict:
        """Accuracy of zeroshot and of the trained HiCA on labelled images (weak view)."""
        labels = torch.tensor(images.labels)
        plain, tuned = [], []
        for start in range(0, len(images.paths), self.config.align.batch_size):
            pixels = self._pixels(images.paths[start:start + self.config.align.batch_size])
            plain.append(self.features(pixels, None).cpu())
            trainable = {name: value.to(self.encoder.device) for name, value in result.trainable.items()}
            tuned.append(self.features(pixels, trainable).cpu())

        def share(predicted: torch.Tensor) -> float:
            return round(float((predicted == labels).float().mean()), 4)

        return {"images": len(labels), "zeroshot": share((torch.cat(plain) @ self.class_text.T).argmax(dim=1)),
                "hica": share((torch.cat(tuned) @ result.class_embeddings.T).argmax(dim=1))}


def bundle_tensors(result: HiCAResult) -> dict[str, torch.Tensor]:
    return {"class_embeddings": result.class_embeddings, "text_projection": result.text_projection,
            **{f"tower.{name}": value for name, value in result.trainable.items()}}


def build_manifest(runtime: Runtime, head: ClassHead, config: HiCAConfig, result: HiCAResult, accuracy: dict,
                   shots: Shots, n_unlabelled: int, skipped: list[tuple[str, str]]) -> dict:
    last = result.epochs[-1] if result.epochs else {}
    per_class = np.bincount(shots.labels, minlength=len(head.class_names))
    return {
        **manifest_identity(runtime, head, method="hica", bundle_format=BUNDLE_FORMAT),
        "embed_dim": int(result.class_embeddings.shape[1]),
        "tuning": dataclasses.asdict(config.tuning), "temperature": result.temperature,
        "tuned_weights": sorted({name.split(".lora_")[0] for name in result.trainable}),
        "config": dataclasses.asdict(config),
        "metrics": {"stage1": result.stage1,
                    "stage2": {"epochs": result.epochs,
                               "final": {k: last.get(k) for k in ("loss", "global", "local", "hard_negative",
                                                                  "separation")}},
                    "accuracy": accuracy},
        "images": {"shots": {name: int(n) for name, n in zip(head.class_names, per_class)},
                   "unlabelled": n_unlabelled, "skipped": [{"file": f, "error": e} for f, e in skipped]},
    }
