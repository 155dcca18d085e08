"""HiCA's hyper-parameters (app.methods.hica states what each one does in the losses), torch-free so the CLI can
show them without loading torch. The paper gives no values for most of them; these defaults are ours."""
from dataclasses import dataclass
from typing import Literal

TuningMode = Literal["lora", "blocks"]


@dataclass(frozen=True)
class TuningConfig:
    """What of the image tower is trained, and the optimiser (AdamW, both stages)."""
    mode: TuningMode = "lora"         # lora: low-rank updates of the attention weights; blocks: every weight
    blocks: int = 2                   # how many of the last transformer blocks are tuned
    lora_rank: int = 4
    lora_alpha: float = 8.0           # the update is (alpha / rank) · B A
    lr: float = 1e-3                  # tower parameters
    text_lr: float = 1e-3             # the text projection
    weight_decay: float = 0.01


@dataclass(frozen=True)
class PreAdaptConfig:
    """Stage 1: k-means pseudo-labels for the image tower, supervised contrast over descriptions for the text
    projection."""
    clusters_per_class: int = 4       # k = classes × this, unless `clusters` is set
    clusters: int | None = None
    epochs: int = 2                   # passes over the unlabelled images
    batch_size: int = 32
    cluster_temperature: float = 0.1
    text_steps: int = 200             # full-batch steps over the descriptions
    text_temperature: float = 0.07


@dataclass(frozen=True)
class AlignConfig:
    """Stage 2: hierarchical contrastive alignment on the labelled shots."""
    epochs: int = 20
    batch_size: int = 16
    global_weight: float = 1.0
    local_weight: float = 0.5
    cross_weight: float = 0.5
    global_temperature: float | None = None   # None: the model's own 1 / logit scale, so HiCA starts as zero-shot
    local_temperature: float = 0.07
    margin: float = 0.2               # hard negatives: the true class must win by this cosine margin
    grid: int = 2                     # local regions: a grid × grid tiling of each image
