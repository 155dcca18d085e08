"""method=fewshot: a training-free cache model over a few labelled support images (Tip-Adapter, Zhang et al.,
ECCV 2022), blended with the zero-shot logits -- or, with base=kpl, with KPL's.

For an image f (L2-normalised) and the label set's support embeddings S (m, d) with one-hot labels L (m, c):

    affinity = exp(-beta * (1 - f Sᵀ))           (1, m): 1 for an identical support image, falling with distance
    cache    = affinity L                         (1, c): summed affinity to each class's support images
    logits   = base_logits + alpha * cache        base_logits = logit_scale * f Wᵀ (zero-shot) or KPL's logits

beta (sharpness, default 5.5) and alpha (the cache's weight, default 1) are Tip-Adapter's defaults; both are
settings (MEDZERO_FEWSHOT_BETA / _ALPHA) and per-request fields. Nothing is trained: the support set is method
state of the label-set version (kind "fewshot"), embedded once when uploaded.
"""
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from app.errors import InvalidInput, SupportSetNotFound
from app.methods.base import ClassHead, Method, Scores

Base = Literal["zeroshot", "kpl"]
BASES: tuple[Base, ...] = ("zeroshot", "kpl")


def cache_logits(image_features: torch.Tensor, support_features: torch.Tensor, support_labels: torch.Tensor,
                 n_classes: int, beta: float) -> torch.Tensor:
    """(n, d) images, (m, d) support embeddings (both L2-normalised), (m,) class indices -> (n, c) cache logits."""
    affinity = torch.exp(-beta * (1 - image_features @ support_features.T))        # (n, m)
    return affinity @ F.one_hot(support_labels, n_classes).to(affinity.dtype)       # (n, c)


@dataclass(frozen=True)
class FewShotConfig:
    alpha: float = 1.0        # weight of the cache logits
    beta: float = 5.5         # sharpness of the affinity
    base: Base = "zeroshot"   # whose logits the cache is added to

    def __post_init__(self) -> None:
        if not (self.alpha >= 0 and np.isfinite(self.alpha)):
            raise InvalidInput(f"cache_alpha must be a finite number >= 0, not {self.alpha}")
        if not (self.beta > 0 and np.isfinite(self.beta)):
            raise InvalidInput(f"cache_beta must be a finite number > 0, not {self.beta}")
        if self.base not in BASES:
            raise InvalidInput(f"cache_base must be one of {', '.join(BASES)}, not {self.base!r}")


@dataclass(frozen=True)
class SupportSet:
    """A label-set version's labelled support images under one model, as embeddings (method state "fewshot")."""
    label_set: str
    label_set_version: int
    model_id: str
    class_names: tuple[str, ...]
    features: torch.Tensor             # (m, dim), L2-normalised
    labels: torch.Tensor               # (m,), int64 class indices into class_names
    file_names: tuple[str, ...] = ()   # as uploaded, for the listing
    version: int = 0
    created_at: datetime | None = None

    @property
    def counts(self) -> dict[str, int]:
        """Support images per class, every class listed (0 for those without)."""
        per_class = torch.bincount(self.labels, minlength=len(self.class_names)).tolist()
        return dict(zip(self.class_names, per_class))

    def to_state(self) -> tuple[dict[str, np.ndarray], dict]:
        arrays = {"features": self.features.numpy().astype(np.float32), "labels": self.labels.numpy()}
        return arrays, {"label_set": self.label_set, "label_set_version": self.label_set_version,
                        "model_id": self.model_id, "class_names": list(self.class_names),
                        "file_names": list(self.file_names)}

    @classmethod
    def from_state(cls, arrays: dict[str, np.ndarray], meta: dict, version: int,
                   created_at: datetime) -> "SupportSet":
        return cls(meta["label_set"], meta["label_set_version"], meta["model_id"], tuple(meta["class_names"]),
                   torch.from_numpy(arrays["features"]), torch.from_numpy(arrays["labels"]).long(),
                   tuple(meta.get("file_names", ())), version, created_at)


@dataclass(frozen=True)
class FewShot:
    """The cache model on the label set's support set; no support set -> 409 saying what to upload."""
    config: FewShotConfig = field(default_factory=FewShotConfig)
    kpl: Method | None = None                                   # base=kpl scores through it ...
    kpl_state: Callable[[ClassHead], object | None] = lambda head: None   # ... with the label set's KPL fit
    name: str = "fewshot"
    state_kind: str = "fewshot"
    supports_transductive: bool = False

    def configured(self, *, alpha: float | None = None, beta: float | None = None,
                   base: Base | None = None) -> "FewShot":
        """This method with a request's own alpha / beta / base (None keeps the setting)."""
        changes = {key: value for key, value in (("alpha", alpha), ("beta", beta), ("base", base))
                   if value is not None}
        return dataclasses.replace(self, config=dataclasses.replace(self.config, **changes))

    def load_state(self, arrays: dict[str, np.ndarray], meta: dict, version: int,
                   created_at: datetime) -> SupportSet:
        return SupportSet.from_state(arrays, meta, version, created_at)

    def require(self, head: ClassHead, state: SupportSet | None) -> SupportSet:
        if state is None:
            raise SupportSetNotFound(
                f"label set {head.label_set!r} v{head.version} has no few-shot support set under {head.model_id}; "
                f"upload a few labelled images per class ({', '.join(head.class_names)}) with POST "
                f"/labels/{head.label_set}/support (files plus a class per file)")
        return state

    def score(self, image_features: torch.Tensor, head: ClassHead, state: SupportSet | None, *,
              logit_scale: float, transductive: bool = False) -> Scores:
        support = self.require(head, state)
        config = self.config
        if config.base == "kpl" and self.kpl is not None:
            base = self.kpl.score(image_features, head, self.kpl_state(head), logit_scale=logit_scale)
        else:
            similarities = image_features @ head.class_weights.T
            base = Scores(logits=logit_scale * similarities, similarities=similarities)
        cache = cache_logits(image_features, support.features.to(image_features.dtype), support.labels,
                             len(head.class_names), config.beta)
        details = {**base.details, "support_version": support.version, "shots": support.counts,
                   "cache_alpha": config.alpha, "cache_beta": config.beta, "cache_base": config.base}
        return Scores(base.logits + config.alpha * cache, base.similarities, base.evidence, details)
