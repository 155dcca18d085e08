"""Trustworthy probabilities for any method: temperature scaling and split-conformal prediction sets.

Pure maths on a method's logits, plus the state the `medzero calibrate` job stores per (label set, version,
model, method) as kind ``calibration.<method>`` in app.storage.method_states.

* Temperature scaling (Guo et al., 2017): one scalar T > 0 minimising the negative log-likelihood of
  softmax(logits / T) on labelled calibration images. It never changes the ranking of classes, only how sure
  the probabilities say they are.
* Split conformal prediction with the LAC score (least ambiguous set-valued classifier; Sadinle, Lei and
  Wasserman, 2019): the score of an image is 1 - p(true class) under the calibrated probabilities; q̂ is its
  ⌈(n+1)(1-α)⌉/n empirical quantile on held-out calibration images, and a new image's set is every class with
  p >= 1 - q̂. On exchangeable data the set holds the true class with probability >= 1 - α. LAC gives the
  smallest sets on average of the usual scores; its sets may be empty (no class is plausible enough at this
  coverage: an image unlike the calibration images), which the API reports as it is.

The temperature and the conformal threshold are fitted on disjoint parts of the calibration images, so the
conformal scores are computed with a temperature that did not see them (exchangeability holds as stated).
"""
import math
from dataclasses import asdict, dataclass, field
from datetime import datetime

import numpy as np
import torch
from scipy.optimize import minimize
from scipy.special import log_softmax

CONFORMAL_SCORE = "lac"
TEMPERATURE_BOUNDS = (1e-2, 1e2)


def calibration_kind(method_name: str) -> str:
    """The method-state kind a method's calibration is stored under."""
    return f"calibration.{method_name}"


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """(n, c) logits and (n,) true class indices -> the T minimising mean NLL of softmax(logits / T).
    L-BFGS-B on log T (so T stays positive), starting from T = 1, bounded to [0.01, 100]."""
    logits = np.asarray(logits, dtype=np.float64)
    rows = np.arange(len(labels))

    def nll_and_gradient(log_t: np.ndarray) -> tuple[float, np.ndarray]:
        t = math.exp(float(log_t[0]))
        log_p = log_softmax(logits / t, axis=1)
        nll = -float(log_p[rows, labels].mean())
        # d nll / d log T = (1/T) * mean(z_y - E_p[z]) with z = logits
        expected = (np.exp(log_p) * logits).sum(axis=1)
        gradient = float((logits[rows, labels] - expected).mean()) / t
        return nll, np.array([gradient])

    result = minimize(nll_and_gradient, x0=np.zeros(1), jac=True, method="L-BFGS-B",
                      bounds=[(math.log(TEMPERATURE_BOUNDS[0]), math.log(TEMPERATURE_BOUNDS[1]))])
    return float(math.exp(float(result.x[0])))


def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """(n, c) logits -> (n, c) calibrated probabilities softmax(logits / T)."""
    return (logits.double() / temperature).softmax(dim=-1).to(logits.dtype)


def conformal_threshold(probabilities: np.ndarray, labels: np.ndarray, coverage: float) -> float:
    """LAC on calibration images: the probability a class needs to enter a prediction set so that sets cover
    the true class with probability >= `coverage`. 0 (every class) when there are too few calibration images for
    the guarantee (⌈(n+1)·coverage⌉ > n)."""
    if not 0 < coverage < 1:
        raise ValueError(f"coverage must be in (0, 1); got {coverage}")
    n = len(labels)
    rank = math.ceil((n + 1) * coverage)
    if n == 0 or rank > n:
        return 0.0
    nonconformity = 1.0 - np.asarray(probabilities, dtype=np.float64)[np.arange(n), labels]
    q_hat = float(np.sort(nonconformity)[rank - 1])          # the rank-th smallest: quantile(⌈(n+1)(1-α)⌉/n)
    return max(0.0, 1.0 - q_hat)


def min_conformal_images(coverage: float) -> int:
    """The fewest calibration images whose conformal threshold can exclude a class at this coverage."""
    n = 1
    while math.ceil((n + 1) * coverage) > n:
        n += 1
    return n


def prediction_sets(probabilities: torch.Tensor, threshold: float) -> list[list[int]]:
    """(n, c) calibrated probabilities -> per image, the classes with p >= threshold, most probable first."""
    order = probabilities.argsort(dim=1, descending=True)
    return [[int(c) for c in row if probabilities[i, c] >= threshold] for i, row in enumerate(order.tolist())]


@dataclass(frozen=True)
class Calibration:
    """A method's calibration for one label-set version under one model (what `medzero calibrate` stores)."""
    method: str
    label_set: str
    label_set_version: int
    model_id: str
    temperature: float
    coverage: float                    # the target coverage of the prediction sets, e.g. 0.9
    set_threshold: float               # calibrated probability a class needs to enter the set (1 - q̂)
    method_state_version: int | None   # the method's own state it was calibrated on (a KPL fit version), or None
    method_state_created_at: str | None  # ... and when that state was made (versions restart after a delete)
    images: dict[str, int]             # {"temperature": n, "conformal": n, "held_back": n}
    report: dict = field(default_factory=dict)   # held-back ECE / NLL before and after, coverage, set size
    dataset_hash: str = ""
    score: str = CONFORMAL_SCORE
    version: int = 0                   # 1, 2, ... once stored
    created_at: datetime | None = None

    def to_state(self) -> tuple[dict[str, np.ndarray], dict]:
        meta = {k: v for k, v in asdict(self).items() if k not in ("version", "created_at", "temperature",
                                                                   "set_threshold")}
        arrays = {"temperature": np.array([self.temperature]), "set_threshold": np.array([self.set_threshold])}
        return arrays, meta

    @classmethod
    def from_state(cls, arrays: dict[str, np.ndarray], meta: dict, version: int,
                   created_at: datetime) -> "Calibration":
        return cls(**meta, temperature=float(arrays["temperature"][0]),
                   set_threshold=float(arrays["set_threshold"][0]), version=version, created_at=created_at)

    def applies_to(self, method_state: object | None) -> bool:
        """Calibrated on the method as it scores now: the same learned state (a refit retires the calibration,
        also one numbered like the old after a delete)."""
        return (self.method_state_version, self.method_state_created_at) == state_identity(method_state)


def state_identity(method_state: object | None) -> tuple[int | None, str | None]:
    """(version, creation time) of a method's stored state (a KPLFit), (None, None) without one."""
    if method_state is None:
        return None, None
    created_at = getattr(method_state, "created_at", None)
    return getattr(method_state, "version", None), created_at.isoformat() if created_at is not None else None
