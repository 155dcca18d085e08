"""HiCA's losses on constructed embeddings, each against a value derived by hand for two classes with two shots
each (2-D unit vectors, so every cosine is a number you can read off), plus the LoRA merge, the grid tiles, the
bundle checks and method=hica's scoring."""
import math

import pytest
import torch
from open_clip.transformer import VisionTransformer
from torch import nn

from app.encoders.tower_variants import TunedWeights
from app.errors import AdapterNotFound, InvalidAdapter
from app.jobs.train_hica import grid_tiles
from app.methods.base import ClassHead
from app.methods.hica import (
    HiCA,
    align_loss,
    check_trainable,
    cluster_loss,
    global_loss,
    hard_negative_loss,
    local_loss,
    local_scores,
    project_text,
    prototype_separation,
    served_weights,
    supervised_contrastive,
    tuned_weights,
)
from app.methods.hica_config import AlignConfig


def vectors(*rows: tuple[float, float]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


# two classes, two shots each: class 0 at (1, 0) and (0.6, 0.8), class 1 at (0, 1) and (0.8, 0.6)
IMAGES = vectors((1, 0), (0.6, 0.8), (0, 1), (0.8, 0.6))
LABELS = torch.tensor([0, 0, 1, 1])
CLASS_TEXT = vectors((1, 0), (0, 1))
DESCRIPTIONS = vectors((1, 0), (0.8, 0.6), (0, 1), (0.6, 0.8))       # two findings per class
DESCRIPTION_CLASSES = torch.tensor([0, 0, 1, 1])


def softplus(x: float) -> float:
    return math.log(1 + math.exp(x))


def test_global_infonce_by_hand() -> None:
    # logits = cosine / 0.5; a 2-class CE is softplus(wrong logit - true logit):
    # f1 (1, 0) vs (1, 0): softplus(0 - 2); f2 (0.6, 0.8): softplus(1.6 - 1.2); f3, f4 mirror f1, f2
    expected = (softplus(-2) + softplus(0.4)) / 2
    assert global_loss(IMAGES, CLASS_TEXT, LABELS, 0.5).item() == pytest.approx(expected, abs=1e-6)


def test_cluster_pseudo_label_loss_by_hand() -> None:
    centroids = vectors((1, 0), (0, 1))
    assignments = torch.tensor([0, 1, 1, 0])            # f2 nearer (0, 1), f4 nearer (1, 0): the clusters' view
    # f1: softplus(0 - 2); f2 -> 1: softplus(1.2 - 1.6); f3 -> 1: softplus(0 - 2); f4 -> 0: softplus(1.2 - 1.6)
    expected = (softplus(-2) + softplus(-0.4)) / 2
    assert cluster_loss(IMAGES, centroids, assignments, 0.5).item() == pytest.approx(expected, abs=1e-6)


def test_supervised_contrast_by_hand() -> None:
    # τ = 1; each text has one positive (cosine 0.6 in every pair); denominators over the other three:
    # z1: e^.6 + e^0 + e^.8, z2: e^.6 + e^.8 + e^.96, z3 mirrors z1, z4 mirrors z2
    expected = (math.log(math.exp(.6) + 1 + math.exp(.8)) + math.log(math.exp(.6) + math.exp(.8) + math.exp(.96))) / 2 - .6
    assert supervised_contrastive(IMAGES, LABELS, 1.0).item() == pytest.approx(expected, abs=1e-6)


def test_supervised_contrast_skips_anchors_without_a_positive() -> None:
    texts = torch.cat([IMAGES, vectors((-1, 0))])
    alone = supervised_contrastive(texts, torch.tensor([0, 0, 1, 1, 2]), 1.0)
    # the lone class-2 text is no anchor but sits in every denominator: z1 gains e^-1, z2 e^-.6, z3 e^0, z4 e^-.8
    expected = (math.log(math.exp(.6) + 1 + math.exp(.8) + math.exp(-1))
                + math.log(math.exp(.6) + math.exp(.8) + math.exp(.96) + math.exp(-.6))
                + math.log(1 + math.exp(.8) + math.exp(.6) + 1)
                + math.log(math.exp(.8) + math.exp(.96) + math.exp(.6) + math.exp(-.8))) / 4 - .6
    assert alone.item() == pytest.approx(expected, abs=1e-6)
    assert supervised_contrastive(IMAGES[:2], torch.tensor([0, 1]), 1.0).item() == 0


def test_local_alignment_by_hand() -> None:
    # image 1's two tiles show one finding of each class; the others' tiles both equal their image
    regions = torch.stack([vectors((1, 0), (0, 1)), *(torch.stack([f, f]) for f in IMAGES[1:])])
    scores = local_scores(regions, DESCRIPTIONS, DESCRIPTION_CLASSES, 2)
    # image 1: class 0 = mean(max(1, .8), max(0, .6)) = .8, class 1 = mean(max(0, .6), max(1, .8)) = .8
    # image 2 (0.6, 0.8): class 0 = max(.6, .96), class 1 = max(.8, 1); image 3: .6 / 1; image 4: 1 / .96
    assert torch.allclose(scores, vectors((.8, .8), (.96, 1), (.6, 1), (1, .96)), atol=1e-6)
    expected = (math.log(2) + softplus(.08) + softplus(-.8) + softplus(.08)) / 4    # τ = 0.5
    loss = local_loss(regions, DESCRIPTIONS, DESCRIPTION_CLASSES, LABELS, 2, 0.5)
    assert loss.item() == pytest.approx(expected, abs=1e-5)


def test_hard_negatives_and_prototype_separation_by_hand() -> None:
    # margin .2: f1 and f3 win by 1 (no loss), f2 and f4 lose by .2, so .2 + .2 each -> mean .2
    assert hard_negative_loss(IMAGES, CLASS_TEXT, LABELS, 0.2).item() == pytest.approx(0.2, abs=1e-6)
    # prototypes: normalise((1.6, .8)) and normalise((.8, 1.6)); cosine 2·1.28 / 3.2 = .8 both ways
    assert prototype_separation(IMAGES, LABELS).item() == pytest.approx(0.8, abs=1e-6)
    assert prototype_separation(IMAGES[:2], LABELS[:2]).item() == 0          # one class: nothing to separate


def test_stage2_total_weighs_the_three_levels() -> None:
    regions = torch.stack([torch.stack([f, f]) for f in IMAGES])
    config = AlignConfig(global_weight=1.0, local_weight=0.5, cross_weight=0.25, local_temperature=0.5, margin=0.2)
    terms = align_loss(IMAGES, regions, CLASS_TEXT, DESCRIPTIONS, DESCRIPTION_CLASSES, LABELS, config, 0.5)
    assert terms.total.item() == pytest.approx(
        terms.global_.item() + 0.5 * terms.local.item() + 0.25 * (0.2 + 0.8), abs=1e-6)
    assert terms.global_.item() == pytest.approx((softplus(-2) + softplus(0.4)) / 2, abs=1e-6)


def test_text_projection_starts_as_the_identity() -> None:
    assert torch.allclose(project_text(IMAGES, torch.zeros(2, 2)), IMAGES)
    swap = vectors((-1, 1), (1, -1))                    # e + M e swaps the axes of a unit vector
    assert torch.allclose(project_text(vectors((1, 0)), swap), vectors((0, 1)))


def test_lora_merge_and_trained_blocks() -> None:
    base = {"attn.weight": torch.ones(2, 3)}
    a, b = torch.tensor([[1.0, 2.0, 3.0]]), torch.tensor([[1.0], [-1.0]])
    merged = tuned_weights(base, {"attn.weight.lora_a": a, "attn.weight.lora_b": b}, "lora", 2.0)
    assert torch.equal(merged["attn.weight"], torch.tensor([[3.0, 5.0, 7.0], [-1.0, -3.0, -5.0]]))
    assert tuned_weights(base, {"attn.weight": a}, "blocks", 2.0) == {"attn.weight": a}


def test_grid_tiles_are_the_quadrants_in_reading_order() -> None:
    quadrants = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).repeat_interleave(4, 0).repeat_interleave(4, 1)
    pixels = quadrants.expand(3, 8, 8).unsqueeze(0)          # (1, 3, 8, 8), constant quadrants 1 2 / 3 4
    tiles = grid_tiles(pixels, 2)
    assert tiles.shape == (4, 3, 8, 8)
    assert [float(t.mean()) for t in tiles] == [1.0, 2.0, 3.0, 4.0]
    assert all(torch.all(t == t.flatten()[0]) for t in tiles)


def test_bundle_tensors_must_be_what_training_gives_this_tower() -> None:
    tower = VisionTransformer(image_size=16, patch_size=8, width=8, layers=2, heads=2, mlp_ratio=2, output_dim=4)
    last = "transformer.resblocks.1.attn"
    good = {f"{last}.in_proj_weight.lora_a": torch.zeros(4, 8), f"{last}.in_proj_weight.lora_b": torch.zeros(24, 4),
            f"{last}.out_proj.weight.lora_a": torch.zeros(4, 8), f"{last}.out_proj.weight.lora_b": torch.zeros(8, 4)}
    check_trainable(tower, good, "lora", 4, 1)
    without_pair = {k: v for k, v in good.items() if not k.endswith("out_proj.weight.lora_b")}
    for bad, rank, blocks, message in (
            (without_pair, 4, 1, "missing transformer.resblocks.1.attn.out_proj.weight.lora_b"),
            (good, 4, 2, "missing transformer.resblocks.0"),                 # trained on one block, not two
            ({**good, "proj.lora_a": torch.zeros(4, 8), "proj.lora_b": torch.zeros(4, 4)}, 4, 1,
             "no parameter for proj.lora_a"),                                  # a 2-D weight outside the blocks
            ({**good, f"{last}.in_proj_weight.lora_a": torch.zeros(4, 5)}, 4, 1, "shape"),
            (good, 8, 1, "shape"),                                             # the manifest's rank disagrees
            ({**good, f"{last}.out_proj.weight.lora_b": torch.full((8, 4), math.nan)}, 4, 1, "NaN"),
            (good, 4, 3, "has 2 transformer blocks")):
        with pytest.raises(InvalidAdapter, match=message):
            check_trainable(tower, bad, "lora", rank, blocks)
    block = {n: p.detach().clone() for n, p in tower.named_parameters() if n.startswith("transformer.resblocks.1.")}
    check_trainable(tower, block, "blocks", 4, 1)
    with pytest.raises(InvalidAdapter, match="no parameter for conv1.weight"):
        check_trainable(tower, {**block, "conv1.weight": tower.conv1.weight.detach()}, "blocks", 4, 1)


class Tower(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.Linear(3, 2, bias=False)


def test_served_lora_weights_are_merged_on_the_cpu_and_placed_like_the_loaded_ones() -> None:
    base = {"attn.weight": torch.ones(2, 3, dtype=torch.float16)}
    lora = {"attn.weight.lora_a": torch.tensor([[1.0, 2.0, 3.0]]), "attn.weight.lora_b": torch.tensor([[1.0], [0.0]])}
    [(name, weight)] = served_weights(base, lora, "lora", 0.5).items()
    assert weight.dtype == torch.float16 and torch.equal(weight.float(), torch.tensor([[1.5, 2, 2.5], [1, 1, 1]]))
    with pytest.raises(InvalidAdapter, match="not finite"):
        served_weights(base, lora, "lora", 1e38)


def test_method_scores_with_the_bundle_temperature_and_refuses_without_one() -> None:
    head = ClassHead("pneumonia", 1, "m", ("normal", "pneumonia"), CLASS_TEXT)
    manifest = {"label_set": "pneumonia", "label_set_version": 1, "model_id": "m", "class_names": ["normal",
                "pneumonia"], "tuning": {"mode": "blocks", "lora_rank": 4, "lora_alpha": 8.0}}
    hica = HiCA(Tower())
    adapter = hica.adapter(adapter_id="a" * 64, manifest=manifest, class_embeddings=vectors((0, 1), (1, 0)),
                           text_projection=torch.zeros(2, 2), trainable={"attn.weight": torch.ones(2, 3)},
                           temperature=0.25)
    scores = hica.score(IMAGES[:1], head, adapter, logit_scale=100.0)
    assert torch.allclose(scores.similarities, vectors((0, 1)))
    assert torch.allclose(scores.logits, vectors((0, 4)))              # cosine / τ, not the model's logit scale
    assert torch.equal(adapter.tower_variant.weights["attn.weight"], torch.ones(2, 3))
    with pytest.raises(AdapterNotFound, match="medzero train hica --label-set pneumonia"):
        hica.score(IMAGES[:1], head, None, logit_scale=100.0)


def test_a_state_decoded_during_another_adapters_forward_merges_onto_the_loaded_weights() -> None:
    """While a tuned forward runs, the tower's attributes are that adapter's tensors; HiCA decodes a state on a
    request thread meanwhile, so it must merge onto the weights it referenced at start, not whatever is there."""
    tower = VisionTransformer(image_size=16, patch_size=8, width=8, layers=2, heads=2, mlp_ratio=2, output_dim=4)
    hica = HiCA(tower)
    name = "transformer.resblocks.1.attn.out_proj.weight"
    loaded = tower.get_parameter(name).detach().clone()
    lora = {name + ".lora_a": torch.ones(4, 8), name + ".lora_b": torch.full((8, 4), 0.25)}
    manifest = {"label_set": "x", "label_set_version": 1, "model_id": "m", "class_names": ["a", "b"],
                "tuning": {"mode": "lora", "blocks": 1, "lora_rank": 4, "lora_alpha": 4.0}}

    def decode():
        return hica.adapter(adapter_id="b", manifest=manifest, class_embeddings=CLASS_TEXT,
                            text_projection=torch.zeros(2, 2), trainable=lora, temperature=0.5)

    other = TunedWeights({name: torch.full_like(loaded, 9.0)})      # adapter A, running now
    decoded = []
    hook = tower.transformer.resblocks[1].register_forward_pre_hook(lambda *_: decoded.append(decode()))
    try:
        other.image_features(tower, torch.zeros(1, 3, 16, 16))
    finally:
        hook.remove()
    assert torch.allclose(decoded[0].tower_variant.weights[name], loaded + 1.0)      # W + (4/4) · B A, B A = 1
