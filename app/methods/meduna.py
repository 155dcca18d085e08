"""MedUnA (unsupervised adaptation): the pure maths, as ../shared/notes/meduna.md states the authors' code.

Stage 1 trains a bias-free linear adapter W (n_classes, dim) on the label set's description embeddings alone
(fresh Gaussian noise each step, label-smoothed cross-entropy, AdamW, full batch). The trained adapter already
classifies images (image and text share the space): logits = normalised image features · Wᵀ, no logit scale.
Stage 2 refines W together with visual prompt tokens on unlabelled images: a frozen teacher (plain encoder,
weak view, stage-1 adapter) gives pseudo-labels; the student (prompted encoder, strong view, trainable adapter)
minimises 0.7 · LS-CE + 1.5 · H(mean prediction of its most confident rows).

Where we deliberately differ from the script: student features are normalised (as stage 1 and the teacher's
are), and the confident subset keeps at least one row (the script's int() keeps none below 10 rows).
"""
import math
from dataclasses import dataclass, field
from datetime import datetime
from functools import cached_property

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from app.encoders.tower_variants import PromptTokens
from app.errors import AdapterNotFound, InvalidAdapter
from app.methods.base import ClassHead, Scores
from app.methods.bundle import ADAPTER_FILE
from app.methods.meduna_config import ImageStageConfig, TextStageConfig  # noqa: F401  (re-exported)


def label_smoothed_ce(logits: torch.Tensor, labels: torch.Tensor, smoothing: float = 0.1) -> torch.Tensor:
    """Cross-entropy against (1 - ε)·one-hot + ε/c, averaged over rows (torch's label_smoothing)."""
    return F.cross_entropy(logits, labels, label_smoothing=smoothing)


def confident_rows(logits: torch.Tensor, selection: float = 0.1) -> torch.Tensor:
    """Indices of the ⌊selection · n⌋ rows (at least one) with the lowest prediction entropy, most confident
    first."""
    log_p = logits.log_softmax(dim=1)
    entropy = -(log_p.exp() * log_p).sum(dim=1)
    keep = max(1, int(selection * len(logits)))
    return torch.argsort(entropy, stable=True)[:keep]


def mean_prediction_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the averaged prediction, in log space (the script's `avg_entropy`): the log of the mean
    softmax is logsumexp of the log-softmaxes minus log n."""
    log_p = logits.log_softmax(dim=1)
    log_mean = torch.logsumexp(log_p, dim=0) - math.log(len(logits))
    min_real = torch.finfo(log_mean.dtype).min
    log_mean = torch.clamp(log_mean, min=min_real)
    return -(log_mean.exp() * log_mean).sum()


def stage2_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, ce_weight: float = 0.7,
                entropy_weight: float = 1.5, selection: float = 0.1,
                smoothing: float = 0.1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(total, ce, entropy): LS-CE of the student against the teacher's pseudo-labels, plus the entropy of the
    student's mean prediction over its most confident rows (minimised: it sharpens their consensus)."""
    pseudo_labels = teacher_logits.argmax(dim=1)
    ce = label_smoothed_ce(student_logits, pseudo_labels, smoothing)
    entropy = mean_prediction_entropy(student_logits[confident_rows(student_logits, selection)])
    return ce_weight * ce + entropy_weight * entropy, ce, entropy


def new_adapter(n_classes: int, dim: int, *, init: torch.Tensor | None = None,
                generator: torch.Generator | None = None, dtype: torch.dtype = torch.float32) -> nn.Linear:
    """Bias-free linear (n_classes, dim): nn.Linear's default init drawn from `generator`, or `init`."""
    adapter = nn.Linear(dim, n_classes, bias=False, dtype=dtype)
    with torch.no_grad():
        if init is not None:
            adapter.weight.copy_(init)
        else:
            bound = 1 / math.sqrt(dim)       # kaiming_uniform(a=√5) as nn.Linear.reset_parameters draws it
            adapter.weight.uniform_(-bound, bound, generator=generator)
    return adapter


def train_text_adapter(features: torch.Tensor, labels: torch.Tensor, n_classes: int | None = None, *,
                       config: TextStageConfig = TextStageConfig(), init: torch.Tensor | None = None,
                       noise: torch.Tensor | None = None, generator: torch.Generator | None = None,
                       progress=None) -> tuple[torch.Tensor, list[float]]:
    """Stage 1. (m, d) normalised description embeddings and their (m,) classes -> (W (c, d), the loss before
    each step). `init` (c, d) and `noise` (steps, m, d, already scaled) are given by tests; otherwise drawn from
    `generator`. `progress(step)` is called after each step (a progress bar)."""
    n_classes = n_classes if n_classes is not None else int(labels.max()) + 1
    adapter = new_adapter(n_classes, features.shape[1], init=init, generator=generator, dtype=features.dtype)
    optimizer = torch.optim.AdamW(adapter.parameters(), lr=config.lr, betas=config.betas, eps=config.eps,
                                  weight_decay=config.weight_decay)
    losses = []
    for step in range(config.steps):
        step_noise = (noise[step] if noise is not None else
                      config.noise_std * torch.randn(features.shape, generator=generator, dtype=features.dtype))
        loss = label_smoothed_ce(adapter(features + step_noise), labels, config.smoothing)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if progress is not None:
            progress(step)
    return adapter.weight.detach().clone(), losses


def adapter_logits(image_features: torch.Tensor, adapter_weight: torch.Tensor) -> torch.Tensor:
    """(n, d) image features (normalised here) · Wᵀ -> (n, c) logits; the adapter carries its own scale."""
    return F.normalize(image_features, dim=-1) @ adapter_weight.T

BUNDLE_FORMAT = "medzero-meduna/1"               # what `medzero train meduna` writes and the server reads
MAX_PROMPT_TOKENS = 1024


@dataclass(frozen=True)
class MedUnAAdapter:
    """A trained adapter as the server keeps it (method state kind "meduna" of its label-set version)."""
    adapter_id: str                    # sha256 of its adapter.safetensors
    label_set: str
    label_set_version: int
    model_id: str
    class_names: tuple[str, ...]
    adapter_weight: torch.Tensor       # (n_classes, dim)
    prompt_tokens: torch.Tensor        # (n_tokens, width): the encoder runs with these for method=meduna
    manifest: dict = field(default_factory=dict)
    version: int = 0
    created_at: datetime | None = None

    @cached_property
    def tower_variant(self) -> PromptTokens:
        """The prompted tower the encoder runs for method=meduna: one object per decoded state (batching key)."""
        return PromptTokens(self.prompt_tokens)

    def to_state(self) -> tuple[dict[str, np.ndarray], dict]:
        arrays = {"adapter": self.adapter_weight.numpy(), "prompt_tokens": self.prompt_tokens.numpy()}
        return arrays, {"adapter_id": self.adapter_id, "class_names": list(self.class_names),
                        "manifest": self.manifest}

    @classmethod
    def from_state(cls, arrays: dict[str, np.ndarray], meta: dict, version: int,
                   created_at: datetime) -> "MedUnAAdapter":
        manifest = meta["manifest"]
        return cls(meta["adapter_id"], manifest["label_set"], manifest["label_set_version"], manifest["model_id"],
                   tuple(meta["class_names"]), torch.from_numpy(arrays["adapter"]),
                   torch.from_numpy(arrays["prompt_tokens"]), manifest, version, created_at)


class MedUnA:
    """method=meduna: the label set's trained adapter on the features of the encoder prompted with its tokens
    (the service encodes with `state.prompt_tokens`); no adapter -> 409 naming the job that trains one."""
    name = "meduna"
    state_kind = "meduna"
    supports_transductive = False
    bundle_format = BUNDLE_FORMAT

    def from_bundle(self, tensors: dict[str, torch.Tensor], manifest: dict, head: ClassHead, adapter_id: str, *,
                    embed_dim: int, vision_width: int | None) -> MedUnAAdapter:
        """A bundle's adapter and prompt tokens checked against this model and label set."""
        weight, prompts = tensors.get("adapter"), tensors.get("prompt_tokens")
        if weight is None or prompts is None:
            raise InvalidAdapter(f"{ADAPTER_FILE} needs tensors 'adapter' and 'prompt_tokens'; has {sorted(tensors)}")
        weight, prompts = weight.float().contiguous(), prompts.float().contiguous()   # any stored dtype: checkable
        if tuple(weight.shape) != (len(head.class_names), embed_dim):
            raise InvalidAdapter(f"adapter shape {tuple(weight.shape)}; the label set and model need "
                                 f"{(len(head.class_names), embed_dim)}")
        if vision_width is None or prompts.ndim != 2 or prompts.shape[1] != vision_width:
            raise InvalidAdapter(f"prompt tokens of shape {tuple(prompts.shape)} do not fit this model's vision "
                                 f"tower (width {vision_width})")
        if len(prompts) > MAX_PROMPT_TOKENS:
            raise InvalidAdapter(f"{len(prompts)} prompt tokens; at most {MAX_PROMPT_TOKENS} (every request pays "
                                 "for them in attention)")
        if not (torch.isfinite(weight).all() and torch.isfinite(prompts).all()):
            raise InvalidAdapter(f"{ADAPTER_FILE} holds NaN or infinite values")
        return MedUnAAdapter(adapter_id, head.label_set, head.version, head.model_id, head.class_names,
                             weight, prompts, manifest)

    def load_state(self, arrays: dict[str, np.ndarray], meta: dict, version: int,
                   created_at: datetime) -> MedUnAAdapter:
        return MedUnAAdapter.from_state(arrays, meta, version, created_at)

    def require(self, head: ClassHead, state: MedUnAAdapter | None) -> MedUnAAdapter:
        if state is None:
            raise AdapterNotFound(
                f"label set {head.label_set!r} v{head.version} has no MedUnA adapter under {head.model_id}; train "
                f"one with `medzero train meduna --label-set {head.label_set} --images DIR --out DIR` and load it "
                "with POST /adapters (or put it under MEDZERO_ADAPTERS_DIR)")
        return state

    def score(self, image_features: torch.Tensor, head: ClassHead, state: MedUnAAdapter | None, *,
              logit_scale: float, transductive: bool = False) -> Scores:
        adapter = self.require(head, state)
        weight = adapter.adapter_weight.to(image_features.dtype)
        similarities = F.normalize(image_features, dim=-1) @ F.normalize(weight, dim=-1).T
        return Scores(adapter_logits(image_features, weight), similarities,
                      details={"adapter_id": adapter.adapter_id, "adapter_version": adapter.version})
