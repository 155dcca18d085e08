"""Calibration use cases: labelled images -> a temperature and a conformal set threshold for one method of one
label set, stored as that method's calibration (kind ``calibration.<method>``) for the label-set version and model.

The labelled images are split (stratified, seeded) into a calibration part and a held-back part; the calibration
part is split again into the images the temperature is fitted on and those the conformal threshold is computed
on (see app.methods.calibration). The held-back part only measures: ECE, NLL and Brier before and after, and the
prediction sets' empirical coverage and size. The method scores exactly as /classify does (Classifier.assess,
without a calibration), so what is calibrated is what the service answers.
"""
import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch
from sklearn.model_selection import train_test_split
from starlette.concurrency import run_in_threadpool

from app.errors import CalibrationNotFound, InvalidInput, MedzeroError
from app.evaluation.scoring import prediction_set_metrics, probability_quality
from app.methods.base import ClassHead
from app.methods.calibration import (
    TEMPERATURE_BOUNDS,
    Calibration,
    apply_temperature,
    calibration_kind,
    conformal_threshold,
    fit_temperature,
    min_conformal_images,
    prediction_sets,
    state_identity,
)
from app.services.classify import Classifier, state_key
from app.services.uploads import UploadedFile
from app.storage.method_states import MethodStateRepository

log = logging.getLogger(__name__)
MIN_IMAGES_PER_PART = 2


@dataclass(frozen=True)
class CalibrationReport:
    calibration: Calibration
    skipped: list[tuple[str, MedzeroError]]


@dataclass(frozen=True)
class CalibrationSplit:
    share: float = 0.5              # of the labelled images, used to calibrate (the rest is held back)
    conformal_share: float = 0.5    # of the calibration part, used for the conformal threshold
    seed: int = 0


class CalibrationService:
    def __init__(self, classifier: Classifier, states: MethodStateRepository) -> None:
        self._classifier = classifier
        self._states = states

    async def calibrate(self, label_set: str, method_name: str, files: Sequence[UploadedFile], labels: Sequence[str],
                        *, coverage: float = 0.9, split: CalibrationSplit = CalibrationSplit(),
                        dataset_hash: str = "", progress: bool = False) -> CalibrationReport:
        method = self._classifier.method(method_name)
        head = await self._classifier.head(label_set)
        if not 0 < coverage < 1:
            raise InvalidInput(f"coverage must be between 0 and 1 (exclusive); got {coverage}")
        unknown = sorted(set(labels) - set(head.class_names))
        if unknown:
            raise InvalidInput(f"labels {', '.join(unknown)} are not classes of {label_set} "
                               f"({', '.join(head.class_names)})")
        pool = await self._classifier.encode_pool(files, progress=progress,
                                                  description=f"encoding calibration images for {label_set}")
        y = np.array([head.class_names.index(labels[i]) for i in pool.used], dtype=np.int64)
        parts = split_indices(y, split)
        assessment = await self._classifier.assess(method, head, pool.features, calibrated=False,
                                                   files=[files[i] for i in pool.used])
        calibration = await run_in_threadpool(self._fit, head, method_name, assessment.scores.logits, y, parts,
                                              coverage, state_identity(assessment.state), dataset_hash, split)
        stamp = await run_in_threadpool(self._states.add, state_key(method, head, calibration=True),
                                        *calibration.to_state())
        log.info("calibrated %s on %s v%d: T=%.3f, set threshold %.4f for coverage %.2f", method_name, label_set,
                 head.version, calibration.temperature, calibration.set_threshold, coverage)
        return CalibrationReport(replace(calibration, version=stamp.version, created_at=stamp.created_at),
                                 pool.skipped)

    @staticmethod
    def _fit(head: ClassHead, method_name: str, logits: torch.Tensor, y: np.ndarray,
             parts: dict[str, np.ndarray], coverage: float, method_state: tuple[int | None, str | None],
             dataset_hash: str,
             split: CalibrationSplit) -> Calibration:
        raw_logits = logits.double().numpy()
        temperature = fit_temperature(raw_logits[parts["temperature"]], y[parts["temperature"]])
        if temperature <= TEMPERATURE_BOUNDS[0] * 1.01:
            # NLL keeps falling as T -> 0 only when every temperature image is already right: one-hot
            # probabilities labelled "calibrated" would be dangerous, so refuse
            raise InvalidInput(f"the temperature ran to its lower bound ({TEMPERATURE_BOUNDS[0]}): all "
                               f"{len(parts['temperature'])} temperature images were classified right, so they "
                               "cannot show how sure the method should be; calibrate on more (and harder) images")
        calibrated = apply_temperature(logits, temperature)
        conformal = parts["conformal"]
        set_threshold = conformal_threshold(calibrated[conformal].double().numpy(), y[conformal], coverage)
        held = parts["held_back"]
        report = {"before": probability_quality(y[held], logits.softmax(dim=-1)[held].double().numpy()),
                  "after": probability_quality(y[held], calibrated[held].double().numpy()),
                  "prediction_sets": prediction_set_metrics(y[held],
                                                            prediction_sets(calibrated[held], set_threshold)),
                  "split": {"share": split.share, "conformal_share": split.conformal_share, "seed": split.seed},
                  "warnings": calibration_warnings(temperature, len(conformal), coverage)}
        return Calibration(method=method_name, label_set=head.label_set, label_set_version=head.version,
                           model_id=head.model_id, temperature=temperature, coverage=coverage,
                           set_threshold=set_threshold, method_state_version=method_state[0],
                           method_state_created_at=method_state[1],
                           images={name: len(index) for name, index in parts.items()}, report=report,
                           dataset_hash=dataset_hash)

    async def current(self, label_set: str) -> tuple[ClassHead, list[Calibration]]:
        """The label set's head and every method's calibration that applies now (current version, model, state)."""
        head = await self._classifier.head(label_set)
        found = []
        for name in self._classifier.method_names:
            method = self._classifier.method(name)
            calibration = await self._classifier.calibration(method, head, await self._classifier.state(method, head))
            if calibration is not None:
                found.append(calibration)
        return head, found

    async def delete(self, label_set: str, method_name: str) -> int:
        self._classifier.method(method_name)          # an unknown method is a 422, not a silent 404
        head = await self._classifier.head(label_set)
        removed = await run_in_threadpool(self._states.delete, calibration_kind(method_name), label_set,
                                          head.model_id)
        if removed == 0:
            raise CalibrationNotFound(f"method {method_name!r} has no calibration for {label_set!r} under "
                                      f"{head.model_id}")
        return removed


def calibration_warnings(temperature: float, n_conformal: int, coverage: float) -> list[str]:
    """What a user must know before trusting this calibration."""
    warnings = []
    if temperature >= TEMPERATURE_BOUNDS[1] * 0.99:
        warnings.append(f"the temperature ran to its upper bound ({TEMPERATURE_BOUNDS[1]}): the method's ranking "
                        "carries (almost) no information on these images, so its probabilities are flattened to "
                        "uniform (random weights?)")
    needed = min_conformal_images(coverage)
    if n_conformal < needed:
        warnings.append(f"{n_conformal} conformal images cannot certify {coverage:.0%} coverage (it needs at least "
                        f"{needed}): every prediction set holds every class; calibrate on more images")
    return warnings


def split_indices(y: np.ndarray, split: CalibrationSplit) -> dict[str, np.ndarray]:
    """Stratified (where every class has enough images), seeded: temperature / conformal / held-back indices."""
    if not 0 < split.share < 1 or not 0 < split.conformal_share < 1:
        raise InvalidInput(f"--split and the conformal share must be between 0 and 1; got {split.share}, "
                           f"{split.conformal_share}")
    needed = 3 * MIN_IMAGES_PER_PART
    if len(y) < needed:
        raise InvalidInput(f"calibration needs at least {needed} usable labelled images; got {len(y)}")
    calibrate, held_back = _split(np.arange(len(y)), y, split.share, split.seed)
    if len(calibrate) < 2 * MIN_IMAGES_PER_PART or len(held_back) < MIN_IMAGES_PER_PART:
        raise _too_few(len(y), split, "calibration" if len(calibrate) < 2 * MIN_IMAGES_PER_PART else "held-back")
    temperature, conformal = _split(calibrate, y[calibrate], 1 - split.conformal_share, split.seed)
    parts = {"temperature": temperature, "conformal": conformal, "held_back": held_back}
    small = [name for name, index in parts.items() if len(index) < MIN_IMAGES_PER_PART]
    if small:
        raise _too_few(len(y), split, ", ".join(small))
    return parts


def _too_few(n_images: int, split: CalibrationSplit, parts: str) -> InvalidInput:
    return InvalidInput(f"too few images for the {parts} part of the split ({n_images} images, --split "
                        f"{split.share}); use more labelled images or another --split")


def _split(index: np.ndarray, y: np.ndarray, first_share: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    counts = np.bincount(y)
    stratify = y if counts[counts > 0].min() >= 2 else None
    n_first = min(max(1, round(first_share * len(index))), len(index) - 1)   # callers pass >= 2 images
    if stratify is not None and min(n_first, len(index) - n_first) < len(np.unique(y)):
        stratify = None        # a part smaller than the number of classes cannot hold one of each
    first, second = train_test_split(index, train_size=n_first, stratify=stratify, random_state=seed)
    return np.sort(first), np.sort(second)
