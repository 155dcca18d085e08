"""Temperature scaling and split-conformal prediction sets on synthetic logits, where the answers are known."""
from datetime import UTC, datetime

import numpy as np
import pytest
import torch

from app.evaluation.scoring import expected_calibration_error
from app.methods.calibration import (
    Calibration,
    apply_temperature,
    conformal_threshold,
    fit_temperature,
    prediction_sets,
)


def synthetic_logits(n: int, n_classes: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Logits whose softmax IS the true class distribution the labels are drawn from (calibrated at T = 1)."""
    logits = rng.normal(0, 2.0, size=(n, n_classes))
    probabilities = torch.from_numpy(logits).softmax(dim=1).numpy()
    labels = (rng.random((n, 1)) < probabilities.cumsum(axis=1)).argmax(axis=1)     # one draw per row
    return logits, labels


def test_temperature_recovers_how_overconfident_the_logits_are() -> None:
    logits, labels = synthetic_logits(4000, 5, np.random.default_rng(0))
    temperature = fit_temperature(3.0 * logits, labels)        # the model says 3x more than it knows
    assert temperature == pytest.approx(3.0, rel=0.1)


def test_temperature_lowers_ece_of_overconfident_logits() -> None:
    logits, labels = synthetic_logits(3000, 4, np.random.default_rng(1))
    overconfident = torch.from_numpy(4.0 * logits)
    before = expected_calibration_error(labels, overconfident.softmax(dim=1).numpy())
    temperature = fit_temperature(overconfident.numpy(), labels)
    after = expected_calibration_error(labels, apply_temperature(overconfident, temperature).numpy())
    assert temperature > 1
    assert before > 0.1
    assert after < before / 3


def test_temperature_keeps_the_ranking_of_classes() -> None:
    logits = torch.tensor([[3.0, 1.0, -2.0], [0.0, 5.0, 4.9]])
    calibrated = apply_temperature(logits, 7.5)
    assert torch.equal(calibrated.argsort(dim=1), logits.argsort(dim=1))
    assert torch.allclose(calibrated.sum(dim=1), torch.ones(2))


def test_conformal_sets_cover_the_true_class_as_guaranteed() -> None:
    """Split conformal on exchangeable data: mean coverage over calibration draws lies in [1-α, 1-α + 1/(n+1)]
    (up to the sampling error of 200 x 400 test images, about 0.0015)."""
    rng = np.random.default_rng(2)
    coverage, n_calibration, n_test = 0.9, 300, 400
    covered, sizes = [], []
    for _ in range(200):
        logits, labels = synthetic_logits(n_calibration + n_test, 6, rng)
        probabilities = torch.from_numpy(2.0 * logits).softmax(dim=1)      # miscalibrated on purpose
        threshold = conformal_threshold(probabilities[:n_calibration].numpy(), labels[:n_calibration], coverage)
        sets = prediction_sets(probabilities[n_calibration:], threshold)
        covered.append(np.mean([y in s for y, s in zip(labels[n_calibration:], sets)]))
        sizes.append(np.mean([len(s) for s in sets]))
    assert coverage - 0.005 <= np.mean(covered) <= coverage + 1 / (n_calibration + 1) + 0.005
    assert 1 < np.mean(sizes) < 6        # informative: neither every class nor a single guess


def test_conformal_threshold_is_the_finite_sample_quantile() -> None:
    # nonconformity 1 - p(true) = 0.1, 0.2, ..., 0.9 for 9 images; coverage 0.8 -> rank ceil(10 * 0.8) = 8 -> 0.8
    p_true = 1 - np.arange(1, 10) / 10
    probabilities = np.stack([p_true, 1 - p_true], axis=1)
    threshold = conformal_threshold(probabilities, np.zeros(9, dtype=int), 0.8)
    assert threshold == pytest.approx(0.2)


def test_too_few_calibration_images_put_every_class_in_the_set() -> None:
    # 5 images cannot certify 90 %: ceil(6 * 0.9) = 6 > 5, so the guarantee needs the full set
    probabilities = np.full((5, 3), 1 / 3)
    assert conformal_threshold(probabilities, np.zeros(5, dtype=int), 0.9) == 0.0
    assert prediction_sets(torch.tensor([[0.7, 0.2, 0.1]]), 0.0) == [[0, 1, 2]]


def test_prediction_sets_hold_classes_above_the_threshold_most_probable_first() -> None:
    probabilities = torch.tensor([[0.15, 0.5, 0.35], [0.05, 0.05, 0.9], [0.1, 0.1, 0.1]])
    assert prediction_sets(probabilities, 0.3) == [[1, 2], [2], []]


def test_calibration_state_round_trip_and_what_it_applies_to() -> None:
    class Fit:
        version = 3
        created_at = datetime(2026, 1, 1, tzinfo=UTC)

    class Refit(Fit):              # after a delete, the next fit is numbered 3 again: a different state
        created_at = datetime(2026, 2, 1, tzinfo=UTC)

    calibration = Calibration(method="kpl", label_set="x", label_set_version=2, model_id="m", temperature=1.7,
                              coverage=0.9, set_threshold=0.21, method_state_version=3,
                              method_state_created_at=Fit.created_at.isoformat(),
                              images={"temperature": 10, "conformal": 10, "held_back": 20},
                              report={"before": {"ece": 0.2}}, dataset_hash="sha256:ab")
    arrays, meta = calibration.to_state()
    created = datetime(2026, 1, 1, tzinfo=UTC)
    restored = Calibration.from_state(arrays, meta, 4, created)
    assert restored == Calibration(**{**calibration.__dict__, "version": 4, "created_at": created})
    assert restored.applies_to(Fit())
    assert not restored.applies_to(Refit())
    assert not restored.applies_to(None)          # calibrated on fit v3; without a fit kpl scores differently
