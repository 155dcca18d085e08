"""MedUnA's maths against the reference fixture (../shared/data/fixtures/meduna_reference.npz, float64), and
the rules where we deliberately differ from the script."""
import numpy as np
import pytest
import torch

from app.methods.meduna import (
    TextStageConfig,
    adapter_logits,
    confident_rows,
    label_smoothed_ce,
    mean_prediction_entropy,
    new_adapter,
    stage2_loss,
    train_text_adapter,
)
from tests.factories import shared_data_dir


@pytest.fixture(scope="module")
def reference() -> dict[str, np.ndarray]:
    shared = shared_data_dir()
    path = shared / "fixtures" / "meduna_reference.npz" if shared else None
    if path is None or not path.is_file():
        pytest.skip("no shared/data/fixtures/meduna_reference.npz in this checkout")
    with np.load(path) as archive:
        return {name: archive[name] for name in archive.files}


def test_stage1_matches_the_reference_training(reference: dict[str, np.ndarray]) -> None:
    features, labels = torch.from_numpy(reference["text_features"]), torch.from_numpy(reference["text_labels"])
    init, noise = torch.from_numpy(reference["adapter_init"]), torch.from_numpy(reference["noise"])
    at_init = label_smoothed_ce(features @ init.T, labels, 0.1)
    assert float(at_init) == pytest.approx(float(reference["stage1_loss_at_init"]), abs=1e-10)
    weight, losses = train_text_adapter(features, labels, 5, config=TextStageConfig(steps=len(noise)), init=init,
                                        noise=noise)
    np.testing.assert_allclose(weight.numpy(), reference["adapter_after"], rtol=0, atol=1e-8)
    np.testing.assert_allclose(losses, reference["stage1_losses"], rtol=0, atol=1e-10)


@pytest.mark.parametrize("n", [50, 7])
def test_stage2_loss_matches_the_reference(reference: dict[str, np.ndarray], n: int) -> None:
    student, teacher = torch.from_numpy(reference[f"student_{n}"]), torch.from_numpy(reference[f"teacher_{n}"])
    total, ce, entropy = stage2_loss(student, teacher)
    assert float(ce) == pytest.approx(float(reference[f"ce_{n}"]), abs=1e-10)
    assert float(entropy) == pytest.approx(float(reference[f"entropy_{n}"]), abs=1e-10)
    assert float(total) == pytest.approx(float(reference[f"loss_{n}"]), abs=1e-10)
    assert confident_rows(student).tolist() == reference[f"confident_rows_{n}"].tolist()


def test_at_least_one_confident_row_where_the_script_keeps_none() -> None:
    logits = torch.tensor([[0.0, 0.0], [5.0, 0.0], [1.0, 0.0]])
    assert confident_rows(logits).tolist() == [1]              # int(0.1 * 3) = 0 in the script
    assert confident_rows(torch.randn(40, 3), 0.25).shape == (10,)


def test_mean_prediction_entropy_is_the_entropy_of_the_average() -> None:
    logits = torch.tensor([[10.0, -10.0], [-10.0, 10.0]], dtype=torch.float64)
    assert float(mean_prediction_entropy(logits)) == pytest.approx(np.log(2), abs=1e-8)   # confident, disagreeing
    assert float(mean_prediction_entropy(logits[:1])) == pytest.approx(0.0, abs=1e-7)


def test_default_init_and_noise_are_seeded() -> None:
    features = torch.nn.functional.normalize(torch.randn(20, 8, generator=torch.Generator().manual_seed(1)), dim=1)
    labels = torch.arange(20) % 4
    config = TextStageConfig(steps=300, lr=2e-2)
    first = train_text_adapter(features, labels, config=config, generator=torch.Generator().manual_seed(7))
    again = train_text_adapter(features, labels, config=config, generator=torch.Generator().manual_seed(7))
    assert torch.equal(first[0], again[0]) and first[1] == again[1]
    assert first[1][-1] < first[1][0]                            # it learns the descriptions' classes
    assert (adapter_logits(features, first[0]).argmax(dim=1) == labels).float().mean() > 0.9
    assert new_adapter(4, 8, generator=torch.Generator().manual_seed(0)).weight.abs().max() <= 8 ** -0.5
