"""Visual prompt tokens on both tower kinds the project serves: open_clip's own ViT (medzero-tiny) and a timm ViT trunk
inside open_clip's TimmModel (the tiny BiomedCLIP). The oracle runs each model's own sub-modules by hand in VPT
order; the hook must agree with it, vanish after its context, and train only the prompts."""
import copy
from collections.abc import Callable

import open_clip
import pytest
import timm
import torch
from open_clip.modified_resnet import ModifiedResNet
from open_clip.timm_model import TimmModel
from open_clip.transformer import VisionTransformer

from app.encoders.visual_prompts import (
    find_prenorm,
    init_prompt_tokens,
    patch_size,
    prompted_image_features,
    prompts_inserted,
    vision_width,
)
from app.settings import BUNDLED_MODEL_DIR
from tests.conftest import TINY_MODEL
from tests.encoders.biomedclip_tiny import IMAGE_SIZE, build_tiny_biomedclip

N_PROMPTS = 5


@pytest.fixture(scope="module")
def open_clip_visual() -> VisionTransformer:
    open_clip.add_model_config(BUNDLED_MODEL_DIR)
    torch.manual_seed(0)
    visual = open_clip.create_model(TINY_MODEL).visual.eval()
    assert isinstance(visual, VisionTransformer) and isinstance(visual.ln_pre, torch.nn.LayerNorm)
    return visual


@pytest.fixture(scope="module")
def timm_visual(tmp_path_factory: pytest.TempPathFactory) -> TimmModel:
    with pytest.MonkeyPatch.context() as patch:           # what loads here comes from the files just written
        from huggingface_hub import constants
        patch.setenv("HF_HUB_OFFLINE", "1")
        patch.setattr(constants, "HF_HUB_OFFLINE", True)
        model_dir = build_tiny_biomedclip(tmp_path_factory.mktemp("tiny-biomedclip"), seed=7)
        visual = open_clip.create_model(f"local-dir:{model_dir}").visual.eval()
    assert isinstance(visual, TimmModel) and isinstance(visual.trunk, timm.models.VisionTransformer)
    assert isinstance(visual.trunk.norm_pre, torch.nn.Identity)     # BiomedCLIP's trunk has no pre-norm layer
    return visual


@pytest.fixture(params=["open_clip", "timm"])
def visual(request: pytest.FixtureRequest) -> torch.nn.Module:
    return request.getfixturevalue(f"{request.param}_visual")


def pixels_for(visual: torch.nn.Module, n: int = 3, seed: int = 1) -> torch.Tensor:
    size = visual.image_size[0] if isinstance(visual, VisionTransformer) else IMAGE_SIZE
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def random_prompts(visual: torch.nn.Module, n_tokens: int = N_PROMPTS, seed: int = 2) -> torch.Tensor:
    return torch.randn(n_tokens, vision_width(visual), generator=torch.Generator().manual_seed(seed))


def spliced(tokens: torch.Tensor, prompts: torch.Tensor, position: int) -> torch.Tensor:
    batch_prompts = prompts.expand(tokens.shape[0], -1, -1)
    return torch.cat([tokens[:, :position], batch_prompts, tokens[:, position:]], dim=1)


def open_clip_reference(visual: VisionTransformer, pixels: torch.Tensor, prompts: torch.Tensor,
                        position: int = 1) -> torch.Tensor:
    """open_clip's VisionTransformer modules in VPT order (the oracle, not production code); the prompts go at
    `position`, after the class token unless a test asks for a wrong placement."""
    x = visual.conv1(pixels)                                          # (n, width, grid, grid)
    x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)        # (n, grid², width)
    x = torch.cat([visual.class_embedding.expand(x.shape[0], 1, -1), x], dim=1)
    x = x + visual.positional_embedding
    x = visual.patch_dropout(x)       # before the splice: prompt tokens are not patches to drop
    x = spliced(x, prompts, position)                                 # no positional embedding for the prompts
    x = visual.transformer(visual.ln_pre(x))
    pooled, _ = visual._pool(x)
    return pooled @ visual.proj


def timm_reference(visual: TimmModel, pixels: torch.Tensor, prompts: torch.Tensor,
                   position: int | None = None) -> torch.Tensor:
    """The timm trunk's modules in VPT order, then TimmModel's head (the oracle, not production code); the prompts go
    after every prefix token unless a test asks for another `position`."""
    trunk = visual.trunk
    x = trunk.patch_drop(trunk._pos_embed(trunk.patch_embed(pixels)))  # [prefix tokens, patches] + positional emb.
    x = spliced(x, prompts, trunk.num_prefix_tokens if position is None else position)
    x = trunk.norm(trunk.blocks(trunk.norm_pre(x)))
    return visual.head(trunk.forward_head(x))


def reference_for(visual: torch.nn.Module) -> Callable[..., torch.Tensor]:
    return open_clip_reference if isinstance(visual, VisionTransformer) else timm_reference


def test_zero_prompt_tokens_give_the_plain_forward_exactly(visual: torch.nn.Module) -> None:
    pixels = pixels_for(visual)
    with torch.no_grad():
        plain = visual(pixels)
        prompted = prompted_image_features(visual, pixels, torch.zeros(0, vision_width(visual)))
    assert prompted.shape == plain.shape and torch.equal(prompted, plain)


def test_prompted_forward_equals_the_modules_run_in_vpt_order(visual: torch.nn.Module) -> None:
    pixels, prompts = pixels_for(visual), random_prompts(visual)
    with torch.no_grad():
        prompted = prompted_image_features(visual, pixels, prompts)
        expected = reference_for(visual)(visual, pixels, prompts)
        plain = visual(pixels)
    assert prompted.shape == plain.shape and prompted.shape[0] == 3
    torch.testing.assert_close(prompted, expected, atol=1e-6, rtol=0)
    assert (prompted - plain).abs().max() > 1e-3                      # the prompts reached the blocks


def test_prompts_go_after_the_class_token_without_positional_embedding(visual: torch.nn.Module) -> None:
    """The oracle run with two wrong placements gives another answer: before the class token, and with the positional
    embedding of the first patches added to the prompts. So the agreement above pins the placement down."""
    pixels, prompts = pixels_for(visual), random_prompts(visual)
    reference = reference_for(visual)
    if isinstance(visual, VisionTransformer):
        first_patches = visual.positional_embedding[1:1 + N_PROMPTS]
    else:
        first_patches = visual.trunk.pos_embed[0, visual.trunk.num_prefix_tokens:][:N_PROMPTS]
    with torch.no_grad():
        prompted = prompted_image_features(visual, pixels, prompts)
        in_front = reference(visual, pixels, prompts, position=0)
        with_positions = reference(visual, pixels, prompts + first_patches)
    assert (prompted - in_front).abs().max() > 1e-3
    assert (prompted - with_positions).abs().max() > 1e-3


@pytest.mark.parametrize("trunk_args", [{"reg_tokens": 2, "global_pool": "avg"},
                                        {"class_token": False, "global_pool": "avg"},
                                        {"reg_tokens": 1, "global_pool": "token", "pre_norm": True}],
                         ids=["registers-avg", "no-class-token", "registers-token-prenorm"])
def test_timm_prefix_tokens_stay_first(timm_visual: TimmModel, trunk_args: dict) -> None:
    """Register tokens and trunks without a class token: the prompts go after every prefix token (at the front when
    there are none), so timm's `num_prefix_tokens` slicing in pooling still skips exactly the prefix tokens."""
    visual = copy.deepcopy(timm_visual)
    torch.manual_seed(3)
    visual.trunk = timm.create_model("test_vit", num_classes=0, **trunk_args).eval()
    pixels, prompts = pixels_for(visual), random_prompts(visual)
    with torch.no_grad():
        prompted = prompted_image_features(visual, pixels, prompts)
        torch.testing.assert_close(prompted, timm_reference(visual, pixels, prompts), atol=1e-6, rtol=0)
        assert (prompted - visual(pixels)).abs().max() > 1e-3
        assert torch.equal(prompted_image_features(visual, pixels, prompts[:0]), visual(pixels))


def test_only_the_prompts_train(visual: torch.nn.Module) -> None:
    frozen = copy.deepcopy(visual).requires_grad_(False)
    before = {name: value.clone() for name, value in frozen.state_dict().items()}
    prompts = random_prompts(frozen).requires_grad_(True)
    start = prompts.detach().clone()
    optimizer = torch.optim.SGD([prompts], lr=0.1)

    features = prompted_image_features(frozen, pixels_for(frozen), prompts)
    features.pow(2).sum().backward()
    optimizer.step()

    assert prompts.grad is not None and prompts.grad.abs().sum() > 0
    assert not torch.equal(prompts.detach(), start)
    after = frozen.state_dict()
    assert all(torch.equal(before[name], after[name]) for name in before)
    assert all(parameter.grad is None for parameter in frozen.parameters())


def test_prompts_follow_the_activations_dtype(visual: torch.nn.Module) -> None:
    """float32 prompts on a bfloat16 tower: cast on the way in, gradients still reach the float32 leaf."""
    tower = copy.deepcopy(visual).to(torch.bfloat16).requires_grad_(False)
    prompts = random_prompts(tower).requires_grad_(True)
    features = prompted_image_features(tower, pixels_for(tower).to(torch.bfloat16), prompts)
    assert features.dtype == torch.bfloat16
    features.float().sum().backward()
    assert prompts.grad is not None and prompts.grad.dtype == torch.float32 and prompts.grad.abs().sum() > 0


def test_context_prompts_every_forward_then_removes_its_hook(visual: torch.nn.Module) -> None:
    pixels, prompts = pixels_for(visual), random_prompts(visual)
    with torch.no_grad():
        plain = visual(pixels)
        with prompts_inserted(visual, prompts):
            first, second = visual(pixels), visual(pixels)
        after = visual(pixels)
        torch.testing.assert_close(first, prompted_image_features(visual, pixels, prompts), atol=0, rtol=0)
    assert torch.equal(first, second) and (first - plain).abs().max() > 1e-3
    assert torch.equal(after, plain) and not find_prenorm(visual)._forward_pre_hooks


def test_hook_is_removed_when_the_context_raises(visual: torch.nn.Module) -> None:
    pixels = pixels_for(visual)
    with torch.no_grad():
        plain = visual(pixels)
        with pytest.raises(RuntimeError, match="inside"), prompts_inserted(visual, random_prompts(visual)):
            visual(pixels)
            raise RuntimeError("failed inside the context")
        assert torch.equal(visual(pixels), plain)
    assert not find_prenorm(visual)._forward_pre_hooks


def test_prompts_of_the_wrong_width_are_refused(visual: torch.nn.Module) -> None:
    with pytest.raises(ValueError, match=f"\\(n_tokens, {vision_width(visual)}\\)"):
        prompted_image_features(visual, pixels_for(visual), torch.zeros(2, vision_width(visual) + 1))
    assert not find_prenorm(visual)._forward_pre_hooks


def test_init_prompt_tokens_shape_bound_and_seed(visual: torch.nn.Module) -> None:
    width, patch = vision_width(visual), patch_size(visual)
    assert (width, patch) == (64, 16)                                 # both tiny towers: width 64, 16-px patches
    bound = (6 / (3 * patch**2 + width)) ** 0.5
    tokens = init_prompt_tokens(visual, 50, torch.Generator().manual_seed(0))
    assert tokens.shape == (50, width) and tokens.dtype == torch.float32
    assert tokens.abs().max() <= bound and tokens.abs().max() > 0.9 * bound   # uniform over the whole ±v range
    assert torch.equal(tokens, init_prompt_tokens(visual, 50, torch.Generator().manual_seed(0)))
    assert not torch.equal(tokens, init_prompt_tokens(visual, 50, torch.Generator().manual_seed(1)))


def test_prenorm_is_the_module_the_forward_calls(open_clip_visual: VisionTransformer, timm_visual: TimmModel) -> None:
    assert find_prenorm(open_clip_visual) is open_clip_visual.ln_pre
    assert find_prenorm(timm_visual) is timm_visual.trunk.norm_pre


def test_towers_without_a_vision_transformer_are_refused() -> None:
    resnet = ModifiedResNet(layers=[1, 1, 1, 1], output_dim=32, heads=2, image_size=64, width=16)
    with pytest.raises(TypeError, match="prompt tokens need a vision transformer.*ModifiedResNet"):
        find_prenorm(resnet)
    with pytest.raises(TypeError, match="prompt tokens need a vision transformer"):
        init_prompt_tokens(resnet, 4)
    timm_resnet = TimmModel("test_resnet", embed_dim=32, image_size=64)
    with pytest.raises(TypeError, match="prompt tokens need a vision transformer.*ResNet"):
        prompted_image_features(timm_resnet, torch.zeros(1, 3, 64, 64), torch.zeros(0, 32))


def test_unpooled_token_output_is_refused() -> None:
    tower = VisionTransformer(image_size=32, patch_size=16, width=32, layers=1, heads=2, mlp_ratio=2.0,
                              output_dim=16, pool_type="none").eval()
    with pytest.raises(ValueError, match="unpooled"), prompts_inserted(tower, torch.zeros(2, 32)):
        pass
    assert not tower.ln_pre._forward_pre_hooks
