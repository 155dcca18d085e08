"""What every classification method provides, and the class head it scores against."""
from dataclasses import dataclass, field
from typing import Literal, Protocol

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
    probabilities: torch.Tensor        # (n_images, n_classes), rows sum to 1
    similarities: torch.Tensor         # (n_images, n_classes), cosine similarity to each class's proxy
    evidence: list[list[ClassEvidence]] | None = None   # per image, per class; None for methods without any
    details: dict = field(default_factory=dict)          # method-specific facts about this scoring (e.g. a fit)


class Method(Protocol):
    name: str                          # one lowercase string everywhere: API, metric label, manifest
    supports_transductive: bool

    def score(self, image_features: torch.Tensor, head: ClassHead, *, logit_scale: float,
              transductive: bool = False) -> Scores:
        """(n_images, dim) L2-normalised image embeddings -> per-class probabilities and similarities.
        `transductive`: the images are an unlabelled pool to adapt to before predicting them."""
        ...
