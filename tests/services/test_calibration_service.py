"""The calibration use case's own rules: how labelled images are split, and when a calibration is refused or
comes with a warning."""
import numpy as np
import pytest
import torch

from app.errors import InvalidInput
from app.methods.base import ClassHead
from app.services.calibration import CalibrationService, CalibrationSplit, calibration_warnings, split_indices

HEAD = ClassHead("x", 1, "m", ("a", "b"), torch.eye(2))


def test_split_parts_are_disjoint_stratified_and_seeded() -> None:
    y = np.repeat([0, 1, 2], [40, 30, 30])
    parts = split_indices(y, CalibrationSplit(share=0.5, conformal_share=0.5, seed=1))
    every = np.concatenate(list(parts.values()))
    assert sorted(every.tolist()) == list(range(100))              # each image in exactly one part
    assert len(parts["held_back"]) == 50 and len(parts["temperature"]) == len(parts["conformal"]) == 25
    assert np.bincount(y[parts["held_back"]]).tolist() == [20, 15, 15]  # class shares kept
    again = split_indices(y, CalibrationSplit(share=0.5, conformal_share=0.5, seed=1))
    assert all(np.array_equal(parts[k], again[k]) for k in parts)


@pytest.mark.parametrize("counts, share", [([5, 4, 2, 2], 0.1), ([7, 6], 0.1), ([3, 3], 0.5), ([20, 20], 0.99)])
def test_too_small_parts_are_refused_by_name_not_a_traceback(counts: list[int], share: float) -> None:
    y = np.repeat(np.arange(len(counts)), counts)
    with pytest.raises(InvalidInput, match="too few images for the .* part"):
        split_indices(y, CalibrationSplit(share=share))


def test_a_temperature_driven_to_zero_is_refused() -> None:
    """Every temperature image right: NLL falls as T -> 0, which would make one-hot 'calibrated' probabilities."""
    logits = torch.tensor([[2.0, 1.0], [0.5, 0.2], [3.0, 0.0], [1.0, 0.9], [0.0, 1.0], [0.2, 0.4]])
    y = np.array([0, 0, 0, 0, 1, 1])
    parts = {"temperature": np.arange(6), "conformal": np.arange(6), "held_back": np.arange(6)}
    with pytest.raises(InvalidInput, match="lower bound"):
        CalibrationService._fit(HEAD, "zeroshot", logits, y, parts, 0.9, (None, None), "", CalibrationSplit())


def test_warnings_for_a_flattened_temperature_and_too_few_conformal_images() -> None:
    assert calibration_warnings(1.4, 50, 0.9) == []
    flattened, uncertified = calibration_warnings(100.0, 5, 0.9)
    assert "upper bound" in flattened
    assert "needs at least 9" in uncertified and "every prediction set holds every class" in uncertified
