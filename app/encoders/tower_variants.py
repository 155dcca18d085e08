"""Ways a method's state changes the vision tower for its own forwards, without copying the model.

- `PromptTokens` (MedUnA): visual prompt tokens spliced into the token sequence (app.encoders.visual_prompts).
- `TunedWeights` (HiCA): some of the tower's parameters replaced for the forward by `torch.func.functional_call`,
  the rest (and every buffer) the loaded model's own.

The batcher groups images by the identity of their variant (one forward never mixes variants), so a state object
builds its variant once and hands out the same one on every request (method states are cached decoded).
Neither is thread-safe on the same tower: the server runs every forward on its one encoder thread. While a tuned
forward runs, the tower's attributes ARE the replacement tensors, so code that needs the loaded weights (HiCA's
LoRA merge, on a request thread) must hold references to them taken before serving starts.
"""
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call

from app.encoders.visual_prompts import prompted_image_features


@dataclass(frozen=True, eq=False)
class PromptTokens:
    tokens: torch.Tensor               # (n_tokens, width)

    def image_features(self, visual: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
        return prompted_image_features(visual, pixels, self.tokens.to(pixels.device))


@dataclass(frozen=True, eq=False)
class TunedWeights:
    # parameter name inside the vision tower -> its replacement, on the parameter's own device and dtype (at fp16
    # open_clip keeps LayerNorms in fp32, so the pixels' dtype is not every parameter's)
    weights: dict[str, torch.Tensor]

    def image_features(self, visual: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
        output = functional_call(visual, self.weights, (pixels,))
        return output[0] if isinstance(output, tuple) else output


TowerVariant = PromptTokens | TunedWeights
