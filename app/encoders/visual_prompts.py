"""MedUnA's visual prompt tokens (VPT-shallow) on an open_clip vision tower, by a hook, not a copy of its forward.

n learnable tokens P (n_tokens, width) join the token sequence after the positional embedding has been added and
before the pre-norm; they get no positional embedding, and everything from the pre-norm on (blocks, final norm,
pooling, head, projection) is the model's own. Two towers take them:

- open_clip's `VisionTransformer` (ViT-B-16, `medzero-tiny`): the hook goes on `visual.ln_pre` (an `nn.Identity`
  with `no_ln_pre`, still called). `_embeds` runs conv1 -> [class, patches] + positional embedding ->
  patch_dropout -> ln_pre, so the tokens arrive after patch dropout and are never dropped as if they were patches.
  The class token is always position 0; the prompts go at 1.
- a timm `VisionTransformer` trunk inside open_clip's `TimmModel` (BiomedCLIP): the hook goes on `trunk.norm_pre`
  (`nn.Identity` unless `pre_norm`, still called by `forward_features`). There `_pos_embed` prepends
  `num_prefix_tokens` tokens: the class token, then DeiT's distillation token or register tokens. The prompts go
  after all of them, not between the class token and the registers, because timm's pooling and heads slice
  `x[:, :num_prefix_tokens]` / `x[:, num_prefix_tokens:]`; a model with no prefix token at all gets them at the front.

What the extra tokens do downstream: class-token pooling ignores them except through attention, as VPT intends;
average pooling (open_clip `pool_type="avg"`, timm `global_pool="avg"/"max"/"avgmax"`) and attention pooling
(open_clip `attentional_pool`, timm `map`) include them, as VPT-shallow does with such heads. A tower whose output
is the unpooled token sequence (open_clip `pool_type="none"` without an attention pooler, timm `global_pool=""`
without `attn_pool`) cannot give an (n, d) feature with a prompt-free length, so it is refused. Inside the context,
`forward_intermediates` would also see the prompts and its NCHW reshape fails; only `forward` is supported, and
open_clip's `output_tokens` second output includes the prompts after the class token.

Not thread-safe: the hook is on the module, so every forward of the tower while the context is open is prompted.
The server runs prompted and plain forwards one at a time on its one encoder thread, which is what makes a
context-manager hook enough.
"""
import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from open_clip.timm_model import TimmModel
from open_clip.transformer import VisionTransformer as OpenClipVisionTransformer
from timm.models.vision_transformer import VisionTransformer as TimmVisionTransformer
from torch import nn

_NEEDS_VIT = "visual prompt tokens need a vision transformer"


def _timm_trunk(visual: nn.Module) -> TimmVisionTransformer:
    if not isinstance(visual, TimmModel):
        raise TypeError(f"{_NEEDS_VIT} (open_clip VisionTransformer or TimmModel), got {type(visual).__name__}")
    if not isinstance(visual.trunk, TimmVisionTransformer):
        raise TypeError(f"{_NEEDS_VIT}: TimmModel trunk is {type(visual.trunk).__name__}, not a timm VisionTransformer")
    return visual.trunk


def find_prenorm(visual: nn.Module) -> nn.Module:
    """The module the hook goes on: open_clip's `ln_pre` or the timm trunk's `norm_pre`. TypeError otherwise."""
    if isinstance(visual, OpenClipVisionTransformer):
        prenorm = visual.ln_pre
    else:
        prenorm = _timm_trunk(visual).norm_pre
    # a hook is per instance: an instance registered twice (a shared nn.Identity) would splice the prompts twice
    registrations = sum(module is prenorm for _, module in visual.named_modules(remove_duplicate=False))
    if registrations != 1:
        raise TypeError(f"{type(visual).__name__}'s pre-norm module is used {registrations} times; cannot hook it")
    return prenorm


def vision_width(visual: nn.Module) -> int:
    """Token width of the vision transformer (open_clip: conv1.out_channels; TimmModel: trunk.embed_dim)."""
    if isinstance(visual, OpenClipVisionTransformer):
        return int(visual.conv1.out_channels)
    return int(_timm_trunk(visual).embed_dim)


def patch_size(visual: nn.Module) -> int:
    """Side of the tower's square patches, in pixels."""
    if isinstance(visual, OpenClipVisionTransformer):
        height, width = visual.patch_size
    else:
        height, width = _timm_trunk(visual).patch_embed.patch_size
    if height != width:
        raise ValueError(f"{type(visual).__name__} has {height}x{width} patches; prompt init expects square ones")
    return int(height)


def _prefix_token_count(visual: nn.Module) -> int:
    """Tokens before the patches when the pre-norm runs: the prompts go right after them."""
    if isinstance(visual, OpenClipVisionTransformer):
        return 1                                     # the class token, always there in open_clip's ViT
    return int(_timm_trunk(visual).num_prefix_tokens)   # class + distillation/register tokens; 0 without any


def _check_pooled_output(visual: nn.Module) -> None:
    if isinstance(visual, OpenClipVisionTransformer):
        unpooled = visual.attn_pool is None and visual.pool_type == "none"
    else:
        trunk = _timm_trunk(visual)
        unpooled = trunk.attn_pool is None and not trunk.global_pool
    if unpooled:
        raise ValueError(f"{type(visual).__name__} returns its token sequence unpooled; prompt tokens would change "
                         "its length, so they need a tower with class-token, average or attention pooling")


def init_prompt_tokens(visual: nn.Module, n_tokens: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """(n_tokens, width) float32, uniform in ±v with v = sqrt(6 / (3 * patch**2 + width)): VPT's Xavier-style init,
    the patch embedding's fan-in (3 channels × patch²) plus the token width."""
    width = vision_width(visual)
    bound = math.sqrt(6.0 / (3 * patch_size(visual) ** 2 + width))
    return torch.empty(n_tokens, width, dtype=torch.float32).uniform_(-bound, bound, generator=generator)


def _check_prompts(visual: nn.Module, prompts: torch.Tensor) -> None:
    width = vision_width(visual)
    if prompts.dim() != 2 or prompts.shape[1] != width:
        raise ValueError(f"prompts must be (n_tokens, {width}) for {type(visual).__name__}, got {tuple(prompts.shape)}")


def _splice(tokens: torch.Tensor, prompts: torch.Tensor, position: int) -> torch.Tensor:
    """(n, L, width) tokens -> (n, L + n_tokens, width) with the prompts at `position` in every row."""
    batch_prompts = prompts.to(tokens.device, tokens.dtype).unsqueeze(0).expand(tokens.shape[0], -1, -1)
    return torch.cat([tokens[:, :position], batch_prompts, tokens[:, position:]], dim=1)


@contextmanager
def _prompt_hook(visual: nn.Module, prompts: torch.Tensor, calls: list[int]) -> Iterator[None]:
    _check_prompts(visual, prompts)
    _check_pooled_output(visual)
    prenorm, position = find_prenorm(visual), _prefix_token_count(visual)

    def splice_before_prenorm(module: nn.Module, args: tuple) -> tuple | None:
        calls.append(1)
        if prompts.shape[0] == 0:
            return None                              # untouched input: zero prompts give the plain forward bit for bit
        tokens = args[0]                             # (n, L, width): [prefix tokens, patches] + positional embedding
        return (_splice(tokens, prompts, position), *args[1:])

    handle = prenorm.register_forward_pre_hook(splice_before_prenorm)
    try:
        yield
    finally:
        handle.remove()


@contextmanager
def prompts_inserted(visual: nn.Module, prompts: torch.Tensor) -> Iterator[None]:
    """While active, every forward of `visual` has `prompts` (n_tokens, width) spliced in after the class token (after
    all of timm's prefix tokens; at the front if there are none), broadcast over the batch, on the activations'
    device and dtype; gradients flow to `prompts`. Removes the hook on exit, also on exceptions.

    Not thread-safe: a forward of `visual` on another thread meanwhile is prompted too. The server runs prompted and
    plain forwards one at a time on its one encoder thread."""
    with _prompt_hook(visual, prompts, calls=[]):
        yield


def prompted_image_features(visual: nn.Module, pixels: torch.Tensor, prompts: torch.Tensor) -> torch.Tensor:
    """(n, 3, H, W) preprocessed pixels -> (n, d) the vision tower's output with prompt tokens inserted (not
    normalised). With zero prompt tokens (shape (0, width)) it equals visual(pixels) exactly. Of a tower built with
    `output_tokens` it returns the pooled output only."""
    calls: list[int] = []
    with _prompt_hook(visual, prompts, calls):
        output = visual(pixels)
    if len(calls) != 1:      # e.g. a scripted tower, or a forward that skips the pre-norm: the prompts went nowhere
        raise RuntimeError(f"{type(visual).__name__}'s pre-norm ran {len(calls)} times in one forward, not once")
    return output[0] if isinstance(output, tuple) else output
