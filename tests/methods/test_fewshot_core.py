"""The few-shot cache model on constructed embeddings: hand-derived affinities, a support set near the right class
flips a wrong zero-shot answer, alpha 0 is zero-shot, and no support set is a 409 saying what to upload."""
import math

import pytest
import torch
import torch.nn.functional as F

from app.errors import InvalidInput, SupportSetNotFound
from app.methods.base import ClassHead
from app.methods.fewshot import FewShot, FewShotConfig, SupportSet, cache_logits
from app.methods.zero_shot import ZeroShot


def unit(*values: float) -> torch.Tensor:
    return F.normalize(torch.tensor(values, dtype=torch.float32), dim=-1)


HEAD = ClassHead("pneumonia", 1, "m", ("normal", "pneumonia"),
                 torch.stack([unit(1, 0, 0), unit(0, 1, 0)]))          # text embeddings of the two classes


def support(*rows: tuple[torch.Tensor, int]) -> SupportSet:
    return SupportSet("pneumonia", 1, "m", HEAD.class_names, torch.stack([r[0] for r in rows]),
                      torch.tensor([r[1] for r in rows]))


def test_cache_logits_by_hand() -> None:
    image = unit(1, 0, 0).unsqueeze(0)
    shots = torch.stack([unit(1, 0, 0), unit(0, 1, 0), unit(0, 0, 1)])       # cosines 1, 0, 0 with the image
    labels = torch.tensor([0, 1, 1])
    got = cache_logits(image, shots, labels, 2, beta=5.5)
    # class 0: exp(-5.5 * (1 - 1)) = 1; class 1: exp(-5.5) + exp(-5.5)
    assert got[0].tolist() == pytest.approx([1.0, 2 * math.exp(-5.5)], rel=1e-6)


def test_support_near_the_right_class_flips_a_wrong_zero_shot_answer() -> None:
    # the image sits nearer the "normal" text embedding, but it is pneumonia, and so are the support shots
    # that look like it
    image = unit(0.8, 0.6, 0.2).unsqueeze(0)
    zero_shot = ZeroShot().score(image, HEAD, None, logit_scale=10.0)
    assert zero_shot.probabilities.argmax().item() == 0
    shots = support((unit(0.8, 0.6, 0.25), 1), (unit(0.75, 0.6, 0.3), 1), (unit(1, 0, -0.5), 0), (unit(1, 0.1, -0.6), 0))
    fewshot = FewShot(FewShotConfig(alpha=5.0, beta=5.5)).score(image, HEAD, shots, logit_scale=10.0)
    assert fewshot.probabilities.argmax().item() == 1
    assert fewshot.details["shots"] == {"normal": 2, "pneumonia": 2}
    assert torch.equal(fewshot.similarities, zero_shot.similarities)     # similarity stays the zero-shot cosine


def test_alpha_zero_is_zero_shot_and_options_configure_a_copy() -> None:
    image = unit(0.3, 0.9, 0.1).unsqueeze(0)
    shots = support((unit(1, 0, 0), 0), (unit(0, 1, 0), 1))
    method = FewShot()
    silent = method.configured(alpha=0.0)
    assert method.config.alpha == 1.0 and silent.config.alpha == 0.0 and silent.config.beta == 5.5
    assert torch.allclose(silent.score(image, HEAD, shots, logit_scale=10.0).logits,
                          ZeroShot().score(image, HEAD, None, logit_scale=10.0).logits)
    with pytest.raises(InvalidInput):
        method.configured(beta=0.0)
    with pytest.raises(InvalidInput):
        method.configured(base="meduna")


def test_no_support_set_says_what_to_upload() -> None:
    with pytest.raises(SupportSetNotFound, match="POST /labels/pneumonia/support"):
        FewShot().score(unit(1, 0, 0).unsqueeze(0), HEAD, None, logit_scale=10.0)


def test_the_support_set_round_trips_its_stored_form() -> None:
    shots = support((unit(1, 0, 0), 0), (unit(0, 1, 0), 1), (unit(0, 1, 1), 1))
    again = SupportSet.from_state(*shots.to_state(), version=3, created_at=None)
    assert torch.equal(again.features, shots.features) and torch.equal(again.labels, shots.labels)
    assert again.counts == {"normal": 1, "pneumonia": 2} and again.version == 3
