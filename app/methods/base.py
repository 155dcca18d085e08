"""What every classification method provides, and the class head it scores against.

Methods are pure: tensors in (image features, the label set's class head, and the state the method learned for
it, already resolved by the service), scores out. A method that learns per label set names its `state_kind`; the
service layer loads that state from app.storage.method_states once per request and hands it to `score`.
"""
from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal, Protocol

import numpy as np
import torch

ProxyKind = Literal["prompts", "per-image", "fitted", "transductive"]


@dataclass(frozen=True)
class ClassHead:
    """A label-set version turned into vectors for one model: what methods compare images with."""
    label_set: str
    version: int
    model_id: str
    class_names: tuple[str, ...]
    class_weights: torch.Tensor        # (n_classes, dim), L2-normalised text embeddings (prompt ensembles)
    abstain_threshold: float | None = None   # the label set's: below this top probability, decide 'uncertain'


@dataclass(frozen=True)
class EvidenceItem:
    """A description that shaped a class's proxy, and how well it fits this image."""
    text: str
    source: str                        # curated | llm:<model> | label_set
    similarity: float                  # cosine between this image and the description's embedding


@dataclass(frozen=True)
class ClassEvidence:
    proxy: ProxyKind                   # what the class was compared through
    descriptions: tuple[EvidenceItem, ...] = ()


@dataclass(frozen=True)
class Scores:
    logits: torch.Tensor               # (n_images, n_classes); probabilities are their softmax (what a temperature
                                       # divides: calibration needs the logits, not the rounded-off probabilities)
    similarities: torch.Tensor         # (n_images, n_classes), cosine similarity to each class's proxy
    evidence: list[list[ClassEvidence]] | None = None   # per image, per class; None for methods without any
    details: dict = field(default_factory=dict)          # method-specific facts about this scoring (e.g. a fit)

    @property
    def probabilities(self) -> torch.Tensor:
        """(n_images, n_classes), rows sum to 1."""
        return self.logits.softmax(dim=-1)


class Method(Protocol):
    name: str                          # one lowercase string everywhere: API, metric label, manifest
    state_kind: str | None             # the kind of learned state it reads (MethodStateRepository), or None
    supports_transductive: bool

    def score(self, image_features: torch.Tensor, head: ClassHead, state: object | None, *, logit_scale: float,
              transductive: bool = False) -> Scores:
        """(n_images, dim) L2-normalised image embeddings -> per-class probabilities and similarities.
        `state`: what the method learned for this head (None when nothing is stored or it learns nothing).
        `transductive`: the images are an unlabelled pool to adapt to before predicting them."""
        ...


class StatefulMethod(Method, Protocol):
    def load_state(self, arrays: dict[str, np.ndarray], meta: dict, version: int, created_at: datetime) -> object:
        """The stored form (arrays + JSON, as its state's `to_state` wrote them) back into the method's state."""
        ...
