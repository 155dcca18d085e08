"""`medzero train meduna --label-set NAME --images DIR --out DIR`: MedUnA's offline training (the server stays
training-free and loads the result).

Stage 1 trains the adapter on the label set's description embeddings, taken from the knowledge base's own index
(nothing is embedded twice). Stage 2 refines it with visual prompt tokens on the unlabelled images under DIR
(recursively; unreadable files are skipped and listed), teacher on the model's own preprocess (weak view),
student on a strong augmentation. Every epoch writes a checkpoint; `--resume` continues from the last one to the
same result (each epoch re-seeds from (seed, epoch), so where a run stopped does not matter). The output folder
gets `adapter.safetensors` (adapter weight, prompt tokens) and `manifest.json` (model, label set and version,
class order, corpus hash, every hyper-parameter, per-stage metrics, sha256 per file), written to temporary names
and renamed; existing results are left byte-identical unless `--force`.
"""
import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision import transforms
from tqdm import tqdm

from app.encoders.loader import Encoder
from app.encoders.visual_prompts import init_prompt_tokens, prompts_inserted, vision_width
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
from app.methods.meduna import (
    BUNDLE_FORMAT,
    ImageStageConfig,
    TextStageConfig,
    adapter_logits,
    new_adapter,
    stage2_loss,
    train_text_adapter,
)
from app.runtime import Runtime
from app.settings import Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MedUnAConfig:
    text: TextStageConfig = TextStageConfig()
    image: ImageStageConfig = ImageStageConfig()
    seed: int = 0


@dataclass
class TrainReport:
    out_dir: Path
    manifest: dict
    skipped: list[tuple[str, str]] = field(default_factory=list)


def main(settings: Settings, label_set: str, images_dir: Path, out_dir: Path, *,
         config: MedUnAConfig = MedUnAConfig(), resume: bool = False, force: bool = False,
         progress: bool = True) -> TrainReport:
    if not images_dir.is_dir():
        raise InvalidInput(f"no such folder: {images_dir}")
    refuse_to_overwrite(out_dir, force)
    return asyncio.run(_train(settings, label_set, images_dir, out_dir, config, resume, progress))


async def _train(settings: Settings, label_set: str, images_dir: Path, out_dir: Path, config: MedUnAConfig,
                 resume: bool, progress: bool) -> TrainReport:
    async with Runtime.for_job(settings, progress=progress) as runtime:
        head = await runtime.classifier.head(label_set)
        trainer = MedUnATrainer(runtime.encoder, head, config, settings)
        features, labels = description_features(runtime, head)
        paths, skipped = trainer.usable_images(image_files(images_dir))
        if len(paths) < 2:
            raise InvalidInput(f"stage 2 needs at least 2 usable images under {images_dir}; got {len(paths)} "
                               f"({len(skipped)} could not be used)")
        # the model runs on this thread for the whole job; the batcher is idle
        result = trainer.train(features, labels, paths, out_dir / CHECKPOINTS, resume=resume, progress=progress)
        labelled = trainer.labelled_accuracy(images_dir, set(paths), result)
        manifest = build_manifest(runtime, head, config, result, labelled, len(paths), skipped)
        return TrainReport(out_dir, write_bundle(out_dir, bundle_tensors(result), manifest), skipped)


@dataclass
class TrainResult:
    stage1_weight: torch.Tensor            # (n_classes, dim)
    stage1_losses: list[float]
    adapter_weight: torch.Tensor           # (n_classes, dim), after stage 2
    prompt_tokens: torch.Tensor            # (n_tokens, width)
    epochs: list[dict]                     # per epoch: loss, ce, entropy, pseudo-label balance, seconds
    stage1_train_accuracy: float
    stage1_seconds: float


class MedUnATrainer:
    def __init__(self, encoder: Encoder, head: ClassHead, config: MedUnAConfig, settings: Settings) -> None:
        self.encoder, self.head, self.config, self.settings = encoder, head, config, settings
        self.visual = encoder.model.visual
        self.weak = encoder.preprocess
        self.strong = strong_view(encoder.preprocess, config.image)

    def usable_images(self, paths: Sequence[Path]) -> tuple[list[Path], list[tuple[str, str]]]:
        return usable_images(paths, self.settings)

    def _decode(self, path: Path) -> Image.Image:
        return decode_training_image(path, self.settings)

    def train(self, features: torch.Tensor, labels: torch.Tensor, paths: list[Path], checkpoints: Path, *,
              resume: bool, progress: bool) -> TrainResult:
        checkpoints.mkdir(parents=True, exist_ok=True)
        fingerprint = self._fingerprint(features, paths)
        state = latest_checkpoint(checkpoints, fingerprint) if resume else None
        if state is None:
            start_fresh(checkpoints)
            state = self._stage1(features, labels, progress)
            state["fingerprint"] = fingerprint
            save_checkpoint(state, checkpoints / "stage1.pt")
        device = self.encoder.device
        frozen = [p for p in self.encoder.model.parameters() if p.requires_grad]
        for parameter in frozen:
            parameter.requires_grad_(False)
        try:
            teacher_logits = self._teacher_logits(paths, state["stage1_weight"], progress)
            prompts = state["prompt_tokens"].to(device).requires_grad_(True)
            adapter = new_adapter(len(self.head.class_names), features.shape[1], init=state["adapter_weight"])
            adapter = adapter.to(device)
            optimizer, scheduler = self._optimizer(prompts, adapter)
            if "optimizer" in state:
                optimizer.load_state_dict(state["optimizer"])
                scheduler.load_state_dict(state["scheduler"])
            epochs = list(state.get("epochs", []))
            for epoch in range(len(epochs), self.config.image.epochs):
                epochs.append(self._epoch(epoch, paths, teacher_logits, prompts, adapter, optimizer, progress))
                scheduler.step()
                state = {**state, "epochs": epochs, "prompt_tokens": prompts.detach().cpu().clone(),
                         "adapter_weight": adapter.weight.detach().cpu().clone(),
                         "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}
                save_checkpoint(state, checkpoints / f"epoch-{epoch + 1:03d}.pt")
        finally:
            for parameter in frozen:
                parameter.requires_grad_(True)
        return TrainResult(state["stage1_weight"], state["stage1_losses"], state["adapter_weight"],
                           state["prompt_tokens"], epochs, state["stage1_train_accuracy"], state["stage1_seconds"])

    def _fingerprint(self, features: torch.Tensor, paths: list[Path]) -> str:
        """What a checkpoint must match to be resumed from: model, label set, descriptions, images, settings."""
        return run_fingerprint({"model": self.encoder.model_id, "label_set": self.head.label_set,
                                "version": self.head.version, "config": dataclasses.asdict(self.config),
                                "images": [str(p) for p in paths]}, features)

    def _stage1(self, features: torch.Tensor, labels: torch.Tensor, progress: bool) -> dict:
        started = time.perf_counter()
        generator = torch.Generator().manual_seed(self.config.seed)
        with tqdm(total=self.config.text.steps, desc="stage 1: adapter on descriptions", unit="step",
                  disable=not progress) as bar:
            weight, losses = train_text_adapter(features, labels, len(self.head.class_names),
                                                config=self.config.text, generator=generator,
                                                progress=lambda _: bar.update(1))
        accuracy = float((adapter_logits(features, weight).argmax(dim=1) == labels).float().mean())
        log.info("stage 1: %d steps, loss %.4f -> %.4f, train accuracy on descriptions %.1f%%",
                 self.config.text.steps, losses[0], losses[-1], 100 * accuracy)
        prompts = init_prompt_tokens(self.visual, self.config.image.n_prompt_tokens, generator=generator)
        return {"stage1_weight": weight, "stage1_losses": losses, "stage1_train_accuracy": accuracy,
                "stage1_seconds": round(time.perf_counter() - started, 3), "adapter_weight": weight.clone(),
                "prompt_tokens": prompts, "epochs": []}

    @torch.no_grad()
    def _teacher_logits(self, paths: list[Path], stage1_weight: torch.Tensor, progress: bool) -> torch.Tensor:
        """Frozen encoder, no prompts, weak view, stage-1 adapter: fixed for every epoch, so computed once."""
        logits = []
        batch = self.config.image.batch_size
        for start in tqdm(range(0, len(paths), batch), desc="teacher pseudo-labels", unit="batch",
                          disable=not progress):
            pixels = torch.stack([self.weak(self._decode(p)) for p in paths[start:start + batch]])
            logits.append(adapter_logits(self._features(pixels).cpu(), stage1_weight))
        return torch.cat(logits)

    def _features(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.encoder.model.encode_image(pixels.to(self.encoder.device, self.encoder.dtype)).float()

    def _optimizer(self, prompts: torch.Tensor, adapter: torch.nn.Linear):
        image = self.config.image
        optimizer = torch.optim.SGD([prompts, adapter.weight], lr=image.lr, momentum=image.momentum,
                                    weight_decay=image.weight_decay)   # neither is a bias or a norm
        scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=list(image.lr_milestones),
                                                         gamma=image.lr_decay)
        return optimizer, scheduler

    def _epoch(self, epoch: int, paths: list[Path], teacher_logits: torch.Tensor, prompts: torch.Tensor,
               adapter: torch.nn.Linear, optimizer: torch.optim.Optimizer, progress: bool) -> dict:
        image = self.config.image
        seed = self.config.seed * 1_000_003 + epoch + 1
        torch.manual_seed(seed)          # the strong view's random draws (torchvision uses torch's global RNG)
        order = torch.randperm(len(paths), generator=torch.Generator().manual_seed(seed)).tolist()
        started, totals, seen = time.perf_counter(), np.zeros(3), 0
        pseudo = teacher_logits.argmax(dim=1)
        batches = [order[i:i + image.batch_size] for i in range(0, len(order), image.batch_size)]
        for batch in tqdm(batches, desc=f"stage 2: epoch {epoch + 1}/{image.epochs}", unit="batch",
                          disable=not progress):
            pixels = torch.stack([self.strong(self._decode(paths[i])) for i in batch])
            with prompts_inserted(self.visual, prompts):
                student = adapter(F.normalize(self._features(pixels), dim=-1))
            total, ce, entropy = stage2_loss(student, teacher_logits[batch].to(student.device),
                                             ce_weight=image.ce_weight, entropy_weight=image.entropy_weight,
                                             selection=image.selection, smoothing=image.smoothing)
            optimizer.zero_grad()
            total.backward()
            optimizer.step()
            totals += len(batch) * np.array([total.item(), ce.item(), entropy.item()])
            seen += len(batch)
        balance = torch.bincount(pseudo, minlength=len(self.head.class_names)).float() / len(pseudo)
        row = {"epoch": epoch + 1, "loss": totals[0] / seen, "ce": totals[1] / seen, "entropy": totals[2] / seen,
               "pseudo_label_balance": {name: round(float(share), 4)
                                        for name, share in zip(self.head.class_names, balance)},
               "seconds": round(time.perf_counter() - started, 3)}
        log.info("stage 2 epoch %d/%d: loss %.4f (CE %.4f, entropy %.4f), pseudo-labels %s", epoch + 1,
                 image.epochs, row["loss"], row["ce"], row["entropy"],
                 ", ".join(f"{k} {v:.0%}" for k, v in row["pseudo_label_balance"].items()))
        return row

    @torch.no_grad()
    def labelled_accuracy(self, images_dir: Path, usable: set[Path], result: TrainResult) -> dict | None:
        """Where DIR has class sub-folders named as the label set's classes: accuracy of zeroshot, stage 1 and
        stage 2 on its usable images (weak view), so the job says what it bought."""
        try:
            labelled = load_labelled(images_dir, self.head.class_names)
        except InvalidInput:
            return None
        kept = [(path, label) for path, label in zip(labelled.paths, labelled.labels) if path in usable]
        y = torch.tensor([self.head.class_names.index(label) for _, label in kept])
        paths = [path for path, _ in kept]
        plain, prompted = [], []
        for start in range(0, len(paths), self.config.image.batch_size):
            chunk = paths[start:start + self.config.image.batch_size]
            pixels = torch.stack([self.weak(self._decode(p)) for p in chunk])
            plain.append(F.normalize(self._features(pixels).cpu(), dim=-1))
            with prompts_inserted(self.visual, result.prompt_tokens.to(self.encoder.device)):
                prompted.append(F.normalize(self._features(pixels).cpu(), dim=-1))
        plain_features, prompted_features = torch.cat(plain), torch.cat(prompted)

        def accuracy(logits: torch.Tensor) -> float:
            return round(float((logits.argmax(dim=1) == y).float().mean()), 4)

        return {"images": len(y), "zeroshot": accuracy(plain_features @ self.head.class_weights.T),
                "stage1": accuracy(adapter_logits(plain_features, result.stage1_weight)),
                "stage2": accuracy(adapter_logits(prompted_features, result.adapter_weight))}


def strong_view(preprocess: Callable, image: ImageStageConfig = ImageStageConfig()) -> transforms.Compose:
    """The note's strong augmentation at the model's own input size and normalisation."""
    steps = getattr(preprocess, "transforms", [])
    normalise = next((t for t in steps if isinstance(t, transforms.Normalize)), None)
    size = next((t.size for t in steps if isinstance(t, transforms.CenterCrop)), (224, 224))
    size = size if isinstance(size, int) else size[0]
    kernel = max(3, int(0.1 * size) // 2 * 2 + 1)        # odd, about a tenth of the image (SimCLR's choice)
    return transforms.Compose([
        transforms.RandomResizedCrop(size, scale=image.crop_scale, interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.RandomHorizontalFlip(),
        transforms.RandomApply([transforms.ColorJitter(*image.color_jitter)], p=image.color_jitter_p),
        transforms.RandomGrayscale(p=image.grayscale_p),
        transforms.GaussianBlur(kernel, sigma=image.blur_sigma),
        transforms.ToTensor(),
        *([normalise] if normalise is not None else []),
    ])


def bundle_tensors(result: TrainResult) -> dict[str, torch.Tensor]:
    return {"adapter": result.adapter_weight, "prompt_tokens": result.prompt_tokens}


def build_manifest(runtime: Runtime, head: ClassHead, config: MedUnAConfig, result: TrainResult,
                   labelled: dict | None, n_images: int, skipped: list[tuple[str, str]]) -> dict:
    last = result.epochs[-1] if result.epochs else {}
    return {
        **manifest_identity(runtime, head, method="meduna", bundle_format=BUNDLE_FORMAT),
        "embed_dim": int(result.adapter_weight.shape[1]),
        "prompt_tokens": list(result.prompt_tokens.shape), "vision_width": vision_width(runtime.encoder.model.visual),
        "config": dataclasses.asdict(config),
        "metrics": {"stage1": {"train_accuracy": result.stage1_train_accuracy,
                               "first_loss": result.stage1_losses[0], "final_loss": result.stage1_losses[-1],
                               "seconds": result.stage1_seconds},
                    "stage2": {"epochs": result.epochs, "final": {k: last.get(k) for k in ("loss", "ce", "entropy")}},
                    "labelled_accuracy": labelled},
        "images": {"used": n_images, "skipped": [{"file": f, "error": e} for f, e in skipped]},
    }
