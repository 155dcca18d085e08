"""What every classification method provides, and the class head it scores against."""
from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass(frozen=True)
class ClassHead:
    """A label-set version turned into vectors for one model: what methods compare images with."""
    label_set: str
    version: int
    model_id: str
    class_names: tuple[str, ...]
    class_weights: torch.Tensor        # (n_classes, dim), L2-normalised text embeddings (prompt ensembles)


@dataclass(frozen=True)
class Scores:
    probabilities: torch.Tensor        # (n_images, n_classes), rows sum to 1
    similarities: torch.Tensor         # (n_images, n_classes), cosine similarity to each class's proxy


class Method(Protocol):
    name: str                          # one lowercase string everywhere: API, metric label, manifest

    def score(self, image_features: torch.Tensor, head: ClassHead, *, logit_scale: float) -> Scores:
        """(n_images, dim) L2-normalised image embeddings -> per-class probabilities and similarities."""
        ...
