"""Evaluation metrics on hand-computed cases, the bootstrap's vectorised statistics against scikit-learn, and JSON
safety (None, never NaN)."""
import json
import math

import numpy as np
import pytest
from sklearn.metrics import balanced_accuracy_score, roc_auc_score

from app.evaluation import scoring
from app.evaluation.scoring import (
    abstention_at,
    abstention_curve,
    classification_metrics,
    expected_calibration_error,
    prediction_set_metrics,
    reliability_bins,
)

# 6 images, 3 classes; class 2 is never predicted (its images go to 0 and 1).
NEVER_PREDICTED_Y = np.array([0, 0, 1, 1, 2, 2])
NEVER_PREDICTED_P = np.array([
    [0.6, 0.1, 0.3],   # true 0, predicted 0
    [0.6, 0.3, 0.1],   # true 0, predicted 0
    [0.2, 0.7, 0.1],   # true 1, predicted 1
    [0.3, 0.6, 0.1],   # true 1, predicted 1
    [0.5, 0.2, 0.3],   # true 2, predicted 0
    [0.2, 0.5, 0.3],   # true 2, predicted 1
])

# 4 images, 3 classes; class 2 is absent from the data but predicted once.
ABSENT_Y = np.array([0, 0, 1, 1])
ABSENT_P = np.array([
    [0.8, 0.1, 0.1],   # true 0, predicted 0
    [0.2, 0.1, 0.7],   # true 0, predicted 2
    [0.1, 0.6, 0.3],   # true 1, predicted 1
    [0.4, 0.5, 0.1],   # true 1, predicted 1
])


def random_run(n_images: int, n_classes: int, seed: int, signal: float = 1.5) -> tuple[np.ndarray, np.ndarray]:
    """Labels and softmax probabilities of a classifier better than chance (true-class logit raised by signal)."""
    rng = np.random.default_rng(seed)
    y_true = rng.integers(0, n_classes, n_images)
    logits = rng.normal(size=(n_images, n_classes))
    logits[np.arange(n_images), y_true] += signal
    probabilities = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return y_true, probabilities


# --- classification_metrics: hand-computed cases ---------------------------------------------------------------------

def test_never_predicted_class_has_no_precision_and_counts_zero_in_macro_f1() -> None:
    metrics = classification_metrics(NEVER_PREDICTED_Y, NEVER_PREDICTED_P, ["a", "b", "c"], n_bootstrap=20)

    assert metrics["n_images"] == 6 and metrics["n_classes"] == 3
    assert metrics["accuracy"] == pytest.approx(4 / 6)
    assert metrics["confusion_matrix"] == [[2, 0, 0], [0, 2, 0], [1, 1, 0]]
    a, b, c = (metrics["per_class"][name] for name in "abc")
    # a: predicted 3 times, 2 right -> precision 2/3; recall 2/2 = 1; f1 = 2 * (2/3 * 1) / (2/3 + 1) = 0.8
    assert a["precision"] == pytest.approx(2 / 3) and a["recall"] == 1.0 and a["f1"] == pytest.approx(0.8)
    assert b["precision"] == pytest.approx(2 / 3) and b["recall"] == 1.0 and b["f1"] == pytest.approx(0.8)
    # c: never predicted -> precision undefined; 0 of its 2 images found -> recall 0, f1 = 2tp / (2tp + fp + fn) = 0
    assert c["precision"] is None and c["recall"] == 0.0 and c["f1"] == 0.0
    assert [a["support"], b["support"], c["support"]] == [2, 2, 2]
    # macro F1 over a, b, c (all present): (0.8 + 0.8 + 0) / 3
    assert metrics["macro_f1"] == pytest.approx(0.5333333333)
    # balanced accuracy: recalls (1 + 1 + 0) / 3
    assert metrics["balanced_accuracy"] == pytest.approx(2 / 3)
    assert metrics["mean_per_class_recall"] == metrics["balanced_accuracy"]
    # AUROC a: positives p_a {0.6, 0.6} above negatives {0.2, 0.3, 0.5, 0.2} -> 1; b likewise -> 1.
    # c: positives p_c {0.3, 0.3} vs negatives {0.3, 0.1, 0.1, 0.1}: each wins 3 pairs and ties 1 -> 2 * 3.5 / 8
    assert a["auroc"] == 1.0 and b["auroc"] == 1.0 and c["auroc"] == pytest.approx(0.875)
    assert metrics["macro_auroc"] == pytest.approx((1 + 1 + 0.875) / 3)


def test_class_absent_from_data_is_left_out_of_recall_auroc_and_balanced_accuracy() -> None:
    metrics = classification_metrics(ABSENT_Y, ABSENT_P, ["a", "b", "absent"], n_bootstrap=20)

    a, b, absent = (metrics["per_class"][name] for name in ("a", "b", "absent"))
    assert absent["recall"] is None and absent["auroc"] is None and absent["support"] == 0
    # absent is predicted once, wrongly: precision 0/1 = 0 (defined), f1 = 0 / (0 + 1 + 0) = 0
    assert absent["precision"] == 0.0 and absent["f1"] == 0.0
    assert a["recall"] == 0.5 and b["recall"] == 1.0
    # over the present classes only: (0.5 + 1) / 2 -- with the absent class counted as 0 it would be 0.5
    assert metrics["balanced_accuracy"] == pytest.approx(0.75)
    # f1 a = 2 * (1 * 0.5) / 1.5 = 2/3, b = 1, absent = 0 (predicted, so it counts): (2/3 + 1 + 0) / 3 = 5/9
    assert metrics["macro_f1"] == pytest.approx(0.5555555556)
    # AUROC a: positives p_a {0.8, 0.2} vs negatives {0.1, 0.4}: 3 of 4 pairs ordered -> 0.75; b: {0.6, 0.5} vs
    # {0.1, 0.1} -> 1; macro over the two defined: 0.875
    assert a["auroc"] == pytest.approx(0.75) and b["auroc"] == 1.0
    assert metrics["macro_auroc"] == pytest.approx(0.875)


def test_macro_auroc_of_two_classes_is_the_binary_auroc() -> None:
    y_true = np.array([0, 1, 1, 0, 1])
    positive = np.array([0.2, 0.9, 0.4, 0.6, 0.7])
    metrics = classification_metrics(y_true, np.stack([1 - positive, positive], axis=1), ["no", "yes"], n_bootstrap=0)
    # positives {0.9, 0.4, 0.7} vs negatives {0.2, 0.6}: pairs ordered 2 + 1 + 2 = 5 of 6
    assert metrics["macro_auroc"] == pytest.approx(5 / 6)


def test_metrics_are_json_without_nan() -> None:
    for y_true, probabilities in ((NEVER_PREDICTED_Y, NEVER_PREDICTED_P), (ABSENT_Y, ABSENT_P),
                                  (np.zeros(5, dtype=int), np.full((5, 3), 1 / 3))):
        metrics = classification_metrics(y_true, probabilities, ["a", "b", "c"], n_bootstrap=50)
        text = json.dumps(metrics, allow_nan=False)
        assert json.loads(text) == metrics
        assert set(metrics) == {"n_images", "n_classes", "accuracy", "balanced_accuracy", "macro_f1", "per_class",
                                "macro_auroc", "ece", "brier", "nll", "confusion_matrix", "acc1", "acc5",
                                "mean_per_class_recall", "intervals"}


# --- Brier, NLL, top-k -----------------------------------------------------------------------------------------------

def test_brier_is_the_sum_over_classes_for_any_number_of_classes() -> None:
    three = classification_metrics(np.array([0, 1]), np.array([[1.0, 0.0, 0.0], [0.5, 0.3, 0.2]]), "abc",
                                   n_bootstrap=0)
    # image 0 one-hot and right: 0; image 1: 0.5^2 + 0.7^2 + 0.2^2 = 0.78; mean 0.39
    assert three["brier"] == pytest.approx(0.39)
    two = classification_metrics(np.array([0, 1]), np.array([[0.25, 0.75], [0.25, 0.75]]), "ab", n_bootstrap=0)
    # 2 * 0.75^2 = 1.125 and 2 * 0.25^2 = 0.125; mean 0.625 (not halved as binary Brier conventionally is)
    assert two["brier"] == pytest.approx(0.625)


def test_nll_is_finite_with_zero_probability_on_the_true_class() -> None:
    metrics = classification_metrics(np.array([0, 1]), np.array([[0.0, 1.0], [0.5, 0.5]]), "ab", n_bootstrap=0)
    # image 0 clipped to 1e-12: -ln(1e-12) = 27.6310211159; image 1: ln 2 = 0.6931471806; mean 14.1620841483
    assert math.isfinite(metrics["nll"])
    assert metrics["nll"] == pytest.approx(14.1620841483, rel=1e-9)


def test_float32_rows_that_sum_to_one_within_rounding_are_accepted() -> None:
    y_true, probabilities = random_run(50, 7, seed=3)
    as_float32 = classification_metrics(y_true, probabilities.astype(np.float32), list("abcdefg"), n_bootstrap=0)
    as_float64 = classification_metrics(y_true, probabilities, list("abcdefg"), n_bootstrap=0)
    assert as_float32["nll"] == pytest.approx(as_float64["nll"], rel=1e-5)


def test_top5_counts_a_true_class_ranked_fifth() -> None:
    ranked = [0.30, 0.25, 0.20, 0.12, 0.08, 0.03, 0.02]          # class k has the (k+1)-th highest probability
    probabilities = np.array([ranked, ranked, ranked])
    y_true = np.array([4, 5, 0])                                # 5th (top-5 only), 6th (neither), 1st (both)
    metrics = classification_metrics(y_true, probabilities, list("abcdefg"), n_bootstrap=0)
    assert metrics["acc1"] == pytest.approx(1 / 3)
    assert metrics["acc5"] == pytest.approx(2 / 3)


@pytest.mark.parametrize(("y_true", "probabilities"), [(NEVER_PREDICTED_Y, NEVER_PREDICTED_P),
                                                       (np.array([1, 0]), np.array([[0.9, 0.1], [0.2, 0.8]]))])
def test_top5_is_one_with_five_classes_or_fewer(y_true: np.ndarray, probabilities: np.ndarray) -> None:
    metrics = classification_metrics(y_true, probabilities, [str(k) for k in range(probabilities.shape[1])],
                                     n_bootstrap=0)
    assert metrics["acc1"] < 1.0
    assert metrics["acc5"] == 1.0


@pytest.mark.parametrize(("y_true", "probabilities"), [
    (np.array([0, 3]), np.array([[0.5, 0.5], [0.5, 0.5]])),          # label outside the classes
    (np.array([0, 1]), np.array([[2.0, -1.0], [0.5, 0.5]])),         # scores, not probabilities
    (np.array([0, 1]), np.array([[0.5, 0.2], [0.5, 0.5]])),          # row sums to 0.7
    (np.array([0.0, 1.0]), np.array([[0.5, 0.5], [0.5, 0.5]])),      # float labels
    (np.array([0]), np.array([[0.5, 0.5], [0.5, 0.5]])),             # lengths differ
])
def test_invalid_inputs_are_refused(y_true: np.ndarray, probabilities: np.ndarray) -> None:
    with pytest.raises(ValueError):
        classification_metrics(y_true, probabilities, ["a", "b"], n_bootstrap=0)


# --- calibration -----------------------------------------------------------------------------------------------------

def test_ece_by_hand_in_two_bins() -> None:
    # 15 bins: 0.95 falls in [14/15, 1], 0.55 in [8/15, 9/15)
    probabilities = np.array([[0.95, 0.05]] * 3 + [[0.55, 0.45]] * 2)
    y_true = np.array([0, 0, 1, 0, 1])
    # top bin: 3 images, 2 right: |2/3 - 0.95| * 3/5 = 0.17; middle: 2 images, 1 right: |0.5 - 0.55| * 2/5 = 0.02
    assert expected_calibration_error(y_true, probabilities) == pytest.approx(0.19)

    bins = reliability_bins(y_true, probabilities)
    assert len(bins["edges"]) == 16 and bins["edges"][0] == 0.0 and bins["edges"][-1] == 1.0
    assert bins["count"] == [0] * 8 + [2] + [0] * 5 + [3]
    assert bins["accuracy"][8] == 0.5 and bins["accuracy"][14] == pytest.approx(2 / 3)
    assert bins["confidence"][8] == pytest.approx(0.55) and bins["confidence"][14] == pytest.approx(0.95)
    assert bins["accuracy"][0] is None and bins["confidence"][0] is None


def test_ece_is_zero_when_each_bin_is_as_accurate_as_it_is_confident() -> None:
    # 4 images at 0.75 with 3 right; 2 images at 0.5 (a tie, predicted class 0) with 1 right
    probabilities = np.array([[0.75, 0.25]] * 4 + [[0.5, 0.5]] * 2)
    y_true = np.array([0, 0, 0, 1, 0, 1])
    assert expected_calibration_error(y_true, probabilities) == pytest.approx(0.0, abs=1e-12)
    assert classification_metrics(y_true, probabilities, "ab", n_bootstrap=0)["ece"] == pytest.approx(0.0, abs=1e-12)


def test_top_probability_of_one_lands_in_the_last_bin() -> None:
    bins = reliability_bins(np.array([0, 1]), np.array([[1.0, 0.0], [0.0, 1.0]]), n_bins=10)
    assert bins["count"] == [0] * 9 + [2]


# --- bootstrap -------------------------------------------------------------------------------------------------------

def test_bootstrap_is_seeded_and_brackets_the_estimate() -> None:
    y_true, probabilities = random_run(300, 7, seed=1)
    names = [f"class {k}" for k in range(7)]
    first = classification_metrics(y_true, probabilities, names, seed=0)
    again = classification_metrics(y_true, probabilities, names, seed=0)
    other = classification_metrics(y_true, probabilities, names, seed=1)

    assert first["intervals"] == again["intervals"]
    assert first["intervals"] != other["intervals"]
    for key in ("accuracy", "balanced_accuracy", "macro_auroc"):
        low, high = first["intervals"][key]
        assert low < first[key] < high


def test_bootstrap_with_one_class_present_has_no_auroc_interval() -> None:
    metrics = classification_metrics(np.zeros(20, dtype=int), np.tile([0.6, 0.3, 0.1], (20, 1)), "abc",
                                     n_bootstrap=100)
    assert metrics["macro_auroc"] is None
    assert metrics["intervals"]["macro_auroc"] is None
    assert metrics["intervals"]["accuracy"] == [1.0, 1.0]


def test_no_resamples_give_no_intervals() -> None:
    metrics = classification_metrics(NEVER_PREDICTED_Y, NEVER_PREDICTED_P, "abc", n_bootstrap=0)
    assert metrics["intervals"] == {"accuracy": None, "balanced_accuracy": None, "macro_auroc": None}


def test_rank_auroc_of_the_bootstrap_equals_roc_auc_score() -> None:
    y_true, probabilities = random_run(120, 4, seed=2)
    probabilities = np.round(probabilities, 2)    # many ties, which the rank sum must count as 1/2
    rng = np.random.default_rng(5)
    resampled = np.concatenate([np.arange(120)[None], rng.integers(0, 120, size=(20, 120))])   # data itself first
    for k in range(4):
        vectorised = scoring._resampled_auroc(y_true == k, probabilities[:, k], resampled)
        expected = [roc_auc_score(y_true[rows] == k, probabilities[rows, k]) for rows in resampled]
        np.testing.assert_allclose(vectorised, expected, rtol=1e-12)

    defined = [roc_auc_score(y_true == k, probabilities[:, k]) for k in range(4)]
    macro = scoring._resampled_macro_auroc(y_true, probabilities, resampled[:1])
    assert macro[0] == pytest.approx(np.mean(defined), rel=1e-12)


def test_rank_auroc_is_nan_where_a_resample_has_one_side_only() -> None:
    positives = np.array([True, False, False])
    resampled = np.array([[1, 2, 2], [0, 1, 2]])          # first resample holds no positive
    auroc = scoring._resampled_auroc(positives, np.array([0.9, 0.1, 0.2]), resampled)
    assert np.isnan(auroc[0]) and auroc[1] == 1.0


def test_bincount_balanced_accuracy_of_the_bootstrap_equals_sklearn() -> None:
    y_true, probabilities = random_run(90, 5, seed=4, signal=0.8)
    predicted = probabilities.argmax(axis=1)
    resampled = np.random.default_rng(6).integers(0, 90, size=(25, 90))
    vectorised = scoring._resampled_balanced_accuracy(y_true, predicted == y_true, resampled, 5)
    expected = [balanced_accuracy_score(y_true[rows], predicted[rows]) for rows in resampled]
    np.testing.assert_allclose(vectorised, expected, rtol=1e-12)


# --- abstention and prediction sets ----------------------------------------------------------------------------------

def test_abstention_curve_by_hand() -> None:
    # top probabilities 0.9 (right), 0.6 (wrong), 0.6 (right), 0.8 (right)
    probabilities = np.array([[0.9, 0.1], [0.6, 0.4], [0.4, 0.6], [0.2, 0.8]])
    y_true = np.array([0, 1, 1, 1])
    curve = abstention_curve(y_true, probabilities)
    assert curve["threshold"] == pytest.approx([0.0, 0.6, 0.8, 0.9])
    assert curve["coverage"] == [1.0, 1.0, 0.5, 0.25]
    assert curve["accuracy"] == [0.75, 0.75, 1.0, 1.0]


def test_abstention_coverage_falls_as_the_threshold_rises() -> None:
    y_true, probabilities = random_run(200, 5, seed=7)
    curve = abstention_curve(y_true, probabilities)
    assert curve["threshold"][0] == 0.0 and curve["coverage"][0] == 1.0
    assert np.all(np.diff(curve["threshold"]) > 0)
    assert np.all(np.diff(curve["coverage"]) <= 0)
    assert curve["coverage"][-1] > 0     # the highest top probability itself is still answered


def test_abstention_at_the_extremes() -> None:
    y_true, probabilities = random_run(50, 4, seed=8)
    everything = abstention_at(y_true, probabilities, 0.0)
    plain = classification_metrics(y_true, probabilities, "abcd", n_bootstrap=0)["accuracy"]
    assert everything == {"threshold": 0.0, "coverage": 1.0, "accuracy": plain, "answered": 50, "abstained": 0}

    nothing = abstention_at(y_true, probabilities, float(probabilities.max()) + 0.01)
    assert nothing["coverage"] == 0.0 and nothing["accuracy"] is None
    assert nothing["answered"] == 0 and nothing["abstained"] == 50
    json.dumps(nothing, allow_nan=False)


def test_prediction_set_metrics_by_hand() -> None:
    metrics = prediction_set_metrics(np.array([0, 1, 2, 0]), [[0, 1], [2], [], [0]])
    # true class in set: yes, no, no, yes; sizes 2, 1, 0, 1
    assert metrics == {"coverage": 0.5, "mean_size": 1.0, "empty": 0.25, "singleton": 0.5,
                       "size_histogram": {"0": 1, "1": 2, "2": 1}}
    json.dumps(metrics, allow_nan=False)


def test_decision_metrics_count_answers_and_their_accuracy() -> None:
    from app.evaluation.scoring import decision_metrics

    # 5 images, 2 abstained; of the 3 answered, 2 are right
    result = decision_metrics(np.array([0, 1, 2, 1, 0]), [0, None, 1, 1, None])
    assert result == {"coverage": 0.6, "accuracy": pytest.approx(2 / 3), "answered": 3, "abstained": 2}
    assert decision_metrics(np.array([0, 1]), [None, None])["accuracy"] is None
