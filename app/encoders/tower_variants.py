"""Ways a method's state changes the vision tower for its own forwards, without copying the model.

- `PromptTokens` (MedUnA): visual prompt tokens spliced into the token sequence (app.encoders.visual_prompts).
- `TunedWeights` (HiCA): some of the tower's parameters replaced for the forward by `torch.func.functional_call`,
  the rest (and every buffer) the loaded model's own.

The batcher groups images by the identity of their variant (one forward never mixes variants), so a state object
builds its variant once and hands out the same one on every request (method states are cached decoded).
Neither is thread-safe on the same tower: the server runs every forward on its one encoder thread.
"""
from dataclasses import dataclass, field

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
    weights: dict[str, torch.Tensor]   # parameter name inside the vision tower -> its replacement
    _placed: dict = field(default_factory=dict, repr=False)   # (device, dtype) -> weights moved there, built once

    def image_features(self, visual: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
        output = functional_call(visual, self._on(pixels.device, pixels.dtype), (pixels,), strict=False)
        return output[0] if isinstance(output, tuple) else output

    def _on(self, device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        key = (str(device), dtype)
        if key not in self._placed:
            self._placed[key] = {name: value.to(device, dtype) for name, value in self.weights.items()}
        return self._placed[key]


TowerVariant = PromptTokens | TunedWeights
