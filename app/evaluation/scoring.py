"""Metrics of a classifier's probabilities against true labels, as JSON-ready plain values.

scikit-learn computes every metric it has; numpy does the rest (top-label calibration, abstention) and the bootstrap,
where calling scikit-learn once per resample would cost ~10 s for 1000 resamples (AUROC of 7 classes on 300 images).
The bootstrap's vectorised statistics are tested to equal scikit-learn's on the data itself.

Inputs everywhere: ``y_true`` (n,) int class indices 0..c-1 and ``probabilities`` (n, c), rows summing to 1, columns
in class order. Rows are renormalised in float64 first: a float32 softmax sums to 1 only within ~1e-7, and
scikit-learn warns about any row further than sqrt(float64 eps) from 1. Undefined values are None, never NaN.
"""
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import numpy as np
from scipy.stats import rankdata
from sklearn.exceptions import UndefinedMetricWarning
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    brier_score_loss,
    confusion_matrix,
    f1_score,
    log_loss,
    precision_recall_fscore_support,
    roc_auc_score,
    top_k_accuracy_score,
)

ECE_BINS = 15
BOOTSTRAP_RESAMPLES = 1000
NLL_EPS = 1e-12                       # probabilities are clipped to this before the log (cap: -log(1e-12) ~ 27.6)
ROW_SUM_TOLERANCE = 1e-3              # rows further than this from 1 are scores, not probabilities
BOOTSTRAP_BLOCK_ELEMENTS = 2_000_000  # resampled image indices held in memory at once


# --- inputs ----------------------------------------------------------------------------------------------------------

def _validated(y_true: np.ndarray, probabilities: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(n,) int64 labels and (n, c) float64 rows renormalised to sum to 1; ValueError on anything else."""
    labels = np.asarray(y_true)
    probs = np.asarray(probabilities, dtype=np.float64)
    if probs.ndim != 2 or probs.shape[1] < 2:
        raise ValueError(f"probabilities must be (n_images, n_classes >= 2), got shape {probs.shape}")
    if labels.ndim != 1 or len(labels) != len(probs) or len(labels) == 0:
        raise ValueError(f"y_true must be (n_images,) with n_images >= 1 matching probabilities {probs.shape}, "
                         f"got shape {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"y_true must hold integer class indices, got dtype {labels.dtype}")
    if labels.min() < 0 or labels.max() >= probs.shape[1]:
        raise ValueError(f"y_true holds class indices outside 0..{probs.shape[1] - 1}")
    row_sums = probs.sum(axis=1)
    if not np.all(np.isfinite(probs)) or np.any(probs < 0) or np.any(np.abs(row_sums - 1) > ROW_SUM_TOLERANCE):
        raise ValueError("probabilities must be finite, non-negative and sum to 1 per row (pass softmax outputs)")
    return labels.astype(np.int64), probs / row_sums[:, None]


@contextmanager
def _quiet_undefined_metric() -> Iterator[None]:
    """scikit-learn warns where we rely on its documented answer: balanced accuracy skipping classes absent from
    y_true (and its inner confusion matrix being 1 x 1 when one class is all there is), top-k accuracy being 1.0
    when k >= n_classes."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UndefinedMetricWarning)
        warnings.filterwarnings("ignore", message="y_pred contains classes not in y_true")
        warnings.filterwarnings("ignore", message="A single label was found in 'y_true' and 'y_pred'")
        yield


def _none_if_nan(value: float) -> float | None:
    return None if np.isnan(value) else float(value)


# --- calibration -----------------------------------------------------------------------------------------------------

def _top_label(labels: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Top probability (n,) and whether the top class is the true one (n,) bool."""
    predicted = probs.argmax(axis=1)
    return probs[np.arange(len(probs)), predicted], predicted == labels


def _confidence_bins(labels: np.ndarray, probs: np.ndarray,
                     n_bins: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Equal-width bins of the top probability on [0, 1]: edges (n_bins + 1,), and per bin (n_bins,) the image count,
    the sum of top probabilities and the number correct. Bins are [lo, hi) except the last, [lo, 1]."""
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    confidence, correct = _top_label(labels, probs)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    # digitize against the inner edges gives 0..n_bins-1, and 1.0 lands in the last bin rather than past it
    bin_index = np.digitize(confidence, edges[1:-1])
    count = np.bincount(bin_index, minlength=n_bins)
    confidence_sum = np.bincount(bin_index, weights=confidence, minlength=n_bins)
    correct_sum = np.bincount(bin_index, weights=correct, minlength=n_bins)
    return edges, count, confidence_sum, correct_sum


def expected_calibration_error(y_true: np.ndarray, probabilities: np.ndarray, n_bins: int = ECE_BINS) -> float:
    """Top-label ECE: sum over bins of |accuracy - mean confidence| * (images in bin / images)."""
    labels, probs = _validated(y_true, probabilities)
    _, _, confidence_sum, correct_sum = _confidence_bins(labels, probs, n_bins)
    # |correct/count - confidence/count| * count/n == |correct - confidence| / n, and empty bins add 0
    return float(np.abs(correct_sum - confidence_sum).sum() / len(labels))


def reliability_bins(y_true: np.ndarray, probabilities: np.ndarray, n_bins: int = ECE_BINS) -> dict:
    """The bins behind the ECE: edges, mean top probability, accuracy (None for empty bins) and count per bin."""
    labels, probs = _validated(y_true, probabilities)
    edges, count, confidence_sum, correct_sum = _confidence_bins(labels, probs, n_bins)
    filled = count > 0
    mean_confidence = np.divide(confidence_sum, count, out=np.zeros(n_bins), where=filled)
    accuracy = np.divide(correct_sum, count, out=np.zeros(n_bins), where=filled)
    return {
        "edges": [float(edge) for edge in edges],
        "confidence": [float(value) if full else None for value, full in zip(mean_confidence, filled, strict=True)],
        "accuracy": [float(value) if full else None for value, full in zip(accuracy, filled, strict=True)],
        "count": [int(value) for value in count],
    }


# --- abstention and prediction sets ----------------------------------------------------------------------------------

def abstention_curve(y_true: np.ndarray, probabilities: np.ndarray) -> dict:
    """Coverage and accuracy when answering only images whose top probability >= threshold, at threshold 0 and at
    every distinct top probability (ascending thresholds, so coverage falls from 1.0)."""
    labels, probs = _validated(y_true, probabilities)
    confidence, correct = _top_label(labels, probs)
    order = np.argsort(confidence, kind="stable")
    sorted_confidence = confidence[order]
    correct_before = np.concatenate([[0], np.cumsum(correct[order])])   # (n + 1,) correct among the i least confident
    thresholds = np.concatenate([[0.0], np.unique(sorted_confidence)])
    first_answered = np.searchsorted(sorted_confidence, thresholds, side="left")
    answered = len(labels) - first_answered
    correct_answered = correct_before[-1] - correct_before[first_answered]
    return {
        "threshold": [float(value) for value in thresholds],
        "coverage": [float(value) for value in answered / len(labels)],
        "accuracy": [float(hits / count) if count else None
                     for hits, count in zip(correct_answered, answered, strict=True)],
    }


def abstention_at(y_true: np.ndarray, probabilities: np.ndarray, threshold: float) -> dict:
    """Coverage and accuracy of answering only images whose top probability >= threshold."""
    labels, probs = _validated(y_true, probabilities)
    confidence, correct = _top_label(labels, probs)
    answered_mask = confidence >= threshold
    answered = int(answered_mask.sum())
    return {
        "threshold": float(threshold),
        "coverage": answered / len(labels),
        "accuracy": float(correct[answered_mask].mean()) if answered else None,
        "answered": answered,
        "abstained": len(labels) - answered,
    }


def decision_metrics(y_true: np.ndarray, decided: Sequence[int | None]) -> dict:
    """Per image the class decided on, or None (abstained) -> share answered and accuracy on the answered."""
    labels = np.asarray(y_true)
    answered = np.array([d is not None for d in decided], dtype=bool)
    if len(answered) != len(labels):
        raise ValueError(f"{len(decided)} decisions for {len(labels)} labels")
    chosen = np.array([-1 if d is None else d for d in decided])
    return {"coverage": float(answered.mean()) if len(labels) else 0.0,
            "accuracy": float(accuracy_score(labels[answered], chosen[answered])) if answered.any() else None,
            "answered": int(answered.sum()), "abstained": int((~answered).sum())}


def prediction_set_metrics(y_true: np.ndarray, prediction_sets: Sequence[Sequence[int]]) -> dict:
    """Coverage (true class in the set), mean size, share of empty and singleton sets, and a size histogram."""
    labels = np.asarray(y_true)
    if labels.ndim != 1 or len(labels) != len(prediction_sets) or len(labels) == 0:
        raise ValueError(f"need one prediction set per label, got {len(prediction_sets)} sets for {labels.shape} "
                         "labels")
    class_sets = [{int(k) for k in members} for members in prediction_sets]
    sizes = np.array([len(members) for members in class_sets])
    covered = np.array([int(label) in members for label, members in zip(labels, class_sets, strict=True)])
    histogram_sizes, histogram_counts = np.unique(sizes, return_counts=True)
    return {
        "coverage": float(covered.mean()),
        "mean_size": float(sizes.mean()),
        "empty": float(np.mean(sizes == 0)),
        "singleton": float(np.mean(sizes == 1)),
        "size_histogram": {str(size): int(count)
                           for size, count in zip(histogram_sizes, histogram_counts, strict=True)},
    }


# --- classification --------------------------------------------------------------------------------------------------

def _one_vs_rest_auroc(labels: np.ndarray, probs: np.ndarray, k: int) -> float | None:
    """AUROC of class k against the rest; None when class k is absent or is every image."""
    positives = labels == k
    if not positives.any() or positives.all():
        return None
    return float(roc_auc_score(positives, probs[:, k]))


def _top_k_accuracy(labels: np.ndarray, probs: np.ndarray, k: int) -> float:
    n_classes = probs.shape[1]
    # with two classes scikit-learn reads y_true as binary and wants the positive-class column only
    scores = probs[:, 1] if n_classes == 2 else probs
    with _quiet_undefined_metric():
        return float(top_k_accuracy_score(labels, scores, k=k, labels=np.arange(n_classes)))


def classification_metrics(y_true: np.ndarray, probabilities: np.ndarray, class_names: Sequence[str], *,
                           n_bootstrap: int = BOOTSTRAP_RESAMPLES, seed: int = 0, ece_bins: int = ECE_BINS) -> dict:
    """Accuracy, balanced accuracy, macro F1, per-class precision/recall/F1/support/AUROC, macro AUROC, ECE, Brier,
    NLL, confusion matrix, the CLIP_benchmark keys (acc1, acc5, mean_per_class_recall) and 95 % bootstrap intervals.

    Classes absent from y_true get recall and AUROC None and are left out of balanced accuracy; classes never
    predicted get precision None. Macro F1 averages the classes present or predicted (a class neither has no F1).
    acc1 is the accuracy of the arg-max prediction (top_k_accuracy_score breaks ties towards the highest index).

    brier: the multiclass Brier score, mean over images of sum_k (p_k - y_k)^2, range [0, 2], 0 for a one-hot
    correct prediction. That is brier_score_loss(..., scale_by_half=False); its default "auto" halves binary problems
    only, which would put a 2-class and a 7-class run on different scales.
    nll: log_loss of the probabilities clipped to [1e-12, 1] and renormalised. scikit-learn 1.9 would clip to the
    dtype's eps itself, so the cap on one image's loss would depend on float32 (~15.9) or float64 (~36.0) input; a
    fixed eps makes runs comparable and keeps a zero probability on the true class finite (~27.6).
    """
    labels, probs = _validated(y_true, probabilities)
    n_images, n_classes = probs.shape
    if len(class_names) != n_classes:
        raise ValueError(f"{len(class_names)} class names for {n_classes} probability columns")
    all_classes = np.arange(n_classes)
    predicted = probs.argmax(axis=1)
    present = np.bincount(labels, minlength=n_classes) > 0
    predicted_any = np.bincount(predicted, minlength=n_classes) > 0

    precision, recall, f1, support = precision_recall_fscore_support(
        labels, predicted, labels=all_classes, zero_division=np.nan)
    aurocs = [_one_vs_rest_auroc(labels, probs, k) for k in range(n_classes)]
    defined_aurocs = [value for value in aurocs if value is not None]
    accuracy = float(accuracy_score(labels, predicted))
    with _quiet_undefined_metric():
        balanced_accuracy = float(balanced_accuracy_score(labels, predicted))

    return {
        "n_images": int(n_images),
        "n_classes": int(n_classes),
        "accuracy": accuracy,
        "balanced_accuracy": balanced_accuracy,
        "macro_f1": float(f1_score(labels, predicted, labels=all_classes[present | predicted_any], average="macro",
                                   zero_division=0)),
        "per_class": {
            name: {"precision": _none_if_nan(precision[k]), "recall": _none_if_nan(recall[k]),
                   "f1": _none_if_nan(f1[k]), "support": int(support[k]), "auroc": aurocs[k]}
            for k, name in enumerate(class_names)
        },
        "macro_auroc": float(np.mean(defined_aurocs)) if defined_aurocs else None,
        "ece": expected_calibration_error(labels, probs, n_bins=ece_bins),
        "brier": _brier(labels, probs),
        "nll": _nll(labels, probs),
        "confusion_matrix": confusion_matrix(labels, predicted, labels=all_classes).tolist(),
        "acc1": accuracy,
        "acc5": _top_k_accuracy(labels, probs, k=min(5, n_classes)),
        "mean_per_class_recall": balanced_accuracy,
        "intervals": _bootstrap_intervals(labels, probs, n_bootstrap=n_bootstrap, seed=seed),
    }


def probability_quality(y_true: np.ndarray, probabilities: np.ndarray) -> dict[str, float]:
    """ECE, NLL, Brier (conventions as in classification_metrics) and accuracy: how a calibration changed things."""
    labels, probs = _validated(y_true, probabilities)
    return {"ece": expected_calibration_error(labels, probs), "nll": _nll(labels, probs),
            "brier": _brier(labels, probs), "accuracy": float(accuracy_score(labels, probs.argmax(axis=1)))}


def _brier(labels: np.ndarray, probs: np.ndarray) -> float:
    return float(brier_score_loss(labels, probs, labels=np.arange(probs.shape[1]), scale_by_half=False))


def _nll(labels: np.ndarray, probs: np.ndarray) -> float:
    clipped = np.clip(probs, NLL_EPS, 1.0)
    clipped /= clipped.sum(axis=1, keepdims=True)
    return float(log_loss(labels, clipped, labels=np.arange(probs.shape[1])))


# --- bootstrap -------------------------------------------------------------------------------------------------------

def _resampled_balanced_accuracy(labels: np.ndarray, correct: np.ndarray, resampled: np.ndarray,
                                 n_classes: int) -> np.ndarray:
    """Balanced accuracy (mean recall over the classes present) of each resample; resampled (b, n) image indices."""
    n_resamples = len(resampled)
    # one bincount over (resample, class) cells instead of a Python loop over resamples
    cells = (np.arange(n_resamples)[:, None] * n_classes + labels[resampled]).ravel()
    true_count = np.bincount(cells, minlength=n_resamples * n_classes).reshape(n_resamples, n_classes)
    hit_count = np.bincount(cells, weights=correct[resampled].ravel(),
                            minlength=n_resamples * n_classes).reshape(n_resamples, n_classes)
    present = true_count > 0
    recall = np.divide(hit_count, true_count, out=np.zeros(true_count.shape), where=present)
    return recall.sum(axis=1) / present.sum(axis=1)


def _resampled_auroc(positives: np.ndarray, scores: np.ndarray, resampled: np.ndarray) -> np.ndarray:
    """One-vs-rest AUROC of each resample by the Mann-Whitney rank sum, NaN where one side is empty.

    positives (n,) bool, scores (n,), resampled (b, n) image indices. Average ranks count a tied positive-negative
    pair as 1/2, as roc_auc_score does.
    """
    resampled_positives = positives[resampled]                                  # (b, n)
    ranks = rankdata(scores[resampled], axis=1)                                 # (b, n), ties averaged
    n_pos = resampled_positives.sum(axis=1).astype(np.float64)
    n_neg = resampled.shape[1] - n_pos
    rank_sum = np.where(resampled_positives, ranks, 0.0).sum(axis=1)
    pairs = n_pos * n_neg
    auroc = np.divide(rank_sum - n_pos * (n_pos + 1) / 2, pairs, out=np.full(len(resampled), np.nan), where=pairs > 0)
    return auroc


def _resampled_macro_auroc(labels: np.ndarray, probs: np.ndarray, resampled: np.ndarray) -> np.ndarray:
    """Mean of the defined one-vs-rest AUROCs of each resample (b,), NaN where no class has one."""
    per_class = np.stack([_resampled_auroc(labels == k, probs[:, k], resampled)
                          for k in range(probs.shape[1])], axis=1)             # (b, c)
    defined = ~np.isnan(per_class)
    n_defined = defined.sum(axis=1)
    total = np.where(defined, per_class, 0.0).sum(axis=1)
    return np.divide(total, n_defined, out=np.full(len(resampled), np.nan), where=n_defined > 0)


def _percentile_interval(values: np.ndarray) -> list[float] | None:
    """The 2.5 and 97.5 percentiles of the defined values; None when there are none."""
    defined = values[~np.isnan(values)]
    if len(defined) == 0:
        return None
    low, high = np.percentile(defined, [2.5, 97.5])
    return [float(low), float(high)]


def _bootstrap_intervals(labels: np.ndarray, probs: np.ndarray, *, n_bootstrap: int, seed: int) -> dict:
    """95 % percentile intervals of accuracy, balanced accuracy and macro AUROC over image resamples (with
    replacement); resamples where a statistic is undefined are skipped for it."""
    n_images, n_classes = probs.shape
    correct = probs.argmax(axis=1) == labels
    rng = np.random.default_rng(seed)
    block = max(1, BOOTSTRAP_BLOCK_ELEMENTS // n_images)   # bounds the (block, n_images) arrays for large n
    accuracy, balanced_accuracy, macro_auroc = [], [], []
    for start in range(0, n_bootstrap, block):
        resampled = rng.integers(0, n_images, size=(min(block, n_bootstrap - start), n_images))
        accuracy.append(correct[resampled].mean(axis=1))
        balanced_accuracy.append(_resampled_balanced_accuracy(labels, correct, resampled, n_classes))
        macro_auroc.append(_resampled_macro_auroc(labels, probs, resampled))

    def interval(chunks: list[np.ndarray]) -> list[float] | None:
        return _percentile_interval(np.concatenate(chunks)) if chunks else None

    return {"accuracy": interval(accuracy), "balanced_accuracy": interval(balanced_accuracy),
            "macro_auroc": interval(macro_auroc)}
