"""MedUnA's hyper-parameters with the reference defaults (../shared/notes/meduna.md), torch-free so the CLI can
show them without loading torch."""
from dataclasses import dataclass


@dataclass(frozen=True)
class TextStageConfig:
    steps: int = 4000                 # the script's text_cls_epochs for every medical dataset
    lr: float = 5e-4
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.01        # AdamW's decoupled decay
    noise_std: float = 0.1            # fresh Gaussian noise on the (normalised) embeddings each step
    smoothing: float = 0.1


@dataclass(frozen=True)
class ImageStageConfig:
    n_prompt_tokens: int = 50         # the script's setting for CLIP ViTs
    epochs: int = 5
    batch_size: int = 50
    lr: float = 5e-4                  # SGD
    momentum: float = 0.0
    weight_decay: float = 0.01        # none on biases and norms
    ce_weight: float = 0.7
    entropy_weight: float = 1.5
    selection: float = 0.1            # share of a batch's most confident rows in the entropy term
    smoothing: float = 0.1
    lr_decay: float = 0.6             # MultiStepLR gamma; the script passes no milestones: a constant rate
    lr_milestones: tuple[int, ...] = ()
    # the student's strong view: RandomResizedCrop, flip, ColorJitter with p, grayscale with p, Gaussian blur
    crop_scale: tuple[float, float] = (0.2, 1.0)
    color_jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.1)   # brightness, contrast, saturation, hue
    color_jitter_p: float = 0.8
    grayscale_p: float = 0.2
    blur_sigma: tuple[float, float] = (0.1, 2.0)   # always applied
