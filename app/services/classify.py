"""The /classify use case: admission (permits for every image, before anything is read) -> the label set's class
head, the method's learned state and its calibration, resolved once per request -> bounded read, decode and
preprocess (worker pool) -> batched encoder forward -> the method's pure scoring -> calibrated probabilities and
a prediction set where the method is calibrated -> the decision (a class, or 'uncertain') and ranked predictions
(with evidence where the method has some). Evaluation and calibration jobs score through `assess`, so they
measure exactly what the service answers."""
import asyncio
import dataclasses
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Literal, cast

import torch
from PIL import Image
from starlette.concurrency import run_in_threadpool
from tqdm import tqdm

from app import metrics
from app.domain import Prediction
from app.encoders.batcher import Announcement, Batcher
from app.encoders.tower_variants import TowerVariant
from app.errors import InvalidInput, MedzeroError, UnknownMethod, UnusableBatch
from app.imaging.decode import decode_image
from app.methods.base import ClassEvidence, ClassHead, Method, Scores, StatefulMethod
from app.methods.calibration import (
    Calibration,
    apply_temperature,
    calibration_kind,
    prediction_sets,
)
from app.services.admission import Admission
from app.services.label_sets import LabelSetService
from app.services.uploads import UploadedFile
from app.storage.method_states import MethodStateRepository, StateKey

# label set -> the class names exported as metric labels (None: all of its classes); everything else is "other"
MetricLabelSets = Mapping[str, frozenset[str] | None]
DecisionRule = Literal["threshold", "prediction_set"]
UNCERTAIN = "uncertain"


@dataclass(frozen=True)
class RankedPrediction(Prediction):
    evidence: ClassEvidence | None = None


@dataclass(frozen=True)
class Decision:
    label: str | None                  # the class decided on; None: uncertain (abstained)
    rule: str                          # top1 | threshold | prediction_set | prediction_set+threshold
    abstain_threshold: float | None    # the top-probability threshold in effect (label set's or the request's)


@dataclass(frozen=True)
class Classification:
    label_set: str
    label_set_version: int
    model_id: str
    method: str
    input_format: str
    predictions: list[RankedPrediction]
    elapsed_ms: float
    decision: Decision
    calibration: Calibration | None = None    # applied to `predictions`' probabilities when set
    prediction_set: list[str] | None = None   # calibrated methods only: classes the coverage guarantee needs
    details: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Assessment:
    """A method's answer for a batch of images, calibrated where a calibration of it applies."""
    scores: Scores
    probabilities: torch.Tensor               # (n_images, n_classes): calibrated when `calibration` is set
    calibration: Calibration | None
    prediction_sets: list[list[int]] | None   # per image, class indices, most probable first (calibrated only)
    state: object | None = None               # the method state it scored with (a KPL fit), None without one


@dataclass(frozen=True)
class EncodedPool:
    """A pool of files encoded for a fit, a calibration or an evaluation."""
    features: torch.Tensor | None             # (n_used, dim), L2-normalised; None when no file could be used
    used: list[int]                           # which of the files they are, in order
    skipped: list[tuple[str, MedzeroError]]   # (file name, why) for files that could not be used


@dataclass(frozen=True)
class Encoded:
    features: torch.Tensor      # (dim,), L2-normalised
    input_format: str
    started: float


@dataclass(frozen=True)
class ImageLimits:
    max_pixels: int
    max_aspect_ratio: float


def state_key(method: Method, head: ClassHead, *, calibration: bool = False) -> StateKey:
    """Where the method's learned state (or, with `calibration`, its calibration) is kept for this head."""
    kind = calibration_kind(method.name) if calibration else method.state_kind
    return StateKey(kind, head.label_set, head.version, head.model_id)


def prediction_labels(allowed: MetricLabelSets, label_set: str, label: str) -> tuple[str, str]:
    """Metric label values for a top-1 prediction, from a closed set (user-registered names stay out)."""
    if label_set not in allowed:
        return metrics.OTHER, metrics.OTHER
    classes = allowed[label_set]
    return label_set, label if classes is None or label in classes else metrics.OTHER


class Classifier:
    def __init__(self, *, preprocess: Callable[[Image.Image], torch.Tensor], logit_scale: float, batcher: Batcher,
                 label_sets: LabelSetService, states: MethodStateRepository, methods: dict[str, Method],
                 admission: Admission, decode_workers: int, limits: ImageLimits,
                 metric_label_sets: MetricLabelSets, decision_rule: DecisionRule = "threshold",
                 pool_chunk_images: int = 256, permit_timeout_seconds: float = 60.0) -> None:
        self._preprocess = preprocess
        self._decision_rule = decision_rule
        self._pool_chunk_images = pool_chunk_images     # at most this many pool images hold permits at once
        self._permit_timeout_seconds = permit_timeout_seconds
        self._logit_scale = logit_scale
        self._batcher = batcher
        self._label_sets = label_sets
        self._states = states
        self._methods = methods
        self._admission = admission
        # only admitted images are submitted, so the pool's queue is bounded by the admission permits
        self._decode_pool = ThreadPoolExecutor(max_workers=decode_workers, thread_name_prefix="medzero-decode")
        self._limits = limits
        self._metric_label_sets = metric_label_sets

    def close(self) -> None:
        self._decode_pool.shutdown(wait=False, cancel_futures=True)

    @property
    def method_names(self) -> list[str]:
        return sorted(self._methods)

    @property
    def transductive_method_names(self) -> list[str]:
        return sorted(name for name, method in self._methods.items() if method.supports_transductive)

    def method(self, name: str, options: Mapping[str, object] | None = None) -> Method:
        """The method called `name`, configured with a request's `options` (only methods that take any)."""
        try:
            chosen = self._methods[name]
        except KeyError:
            raise UnknownMethod(f"unknown method {name!r}; available: {', '.join(self.method_names)}") from None
        given = {key: value for key, value in (options or {}).items() if value is not None}
        if not given:
            return chosen
        configured = getattr(chosen, "configured", None)
        if configured is None:
            raise InvalidInput(f"method {name!r} takes no options; {', '.join(sorted(given))} are for "
                               f"method=fewshot")
        return configured(**given)

    async def head(self, label_set: str) -> ClassHead:
        return await run_in_threadpool(self._label_sets.head, label_set)

    async def state(self, method: Method, head: ClassHead) -> object | None:
        """What `method` learned for this label-set version and model (None if nothing): once per request."""
        if method.state_kind is None:
            return None
        stateful = cast(StatefulMethod, method)
        return await run_in_threadpool(self._states.current, state_key(method, head), stateful.load_state)

    async def calibration(self, method: Method, head: ClassHead, method_state: object | None) -> Calibration | None:
        """The method's calibration for this label-set version and model, if it was made on the method's current
        state (a new KPL fit retires the calibration made on the previous one)."""
        calibration = await run_in_threadpool(self._states.current, state_key(method, head, calibration=True),
                                              Calibration.from_state)
        return calibration if calibration is not None and calibration.applies_to(method_state) else None

    async def assess(self, method: Method, head: ClassHead, image_features: torch.Tensor, *,
                     transductive: bool = False, calibrated: bool = True,
                     files: Sequence[UploadedFile] | None = None) -> Assessment:
        """Score encoded images as /classify does: the method's stored state, then its calibration (not for a
        transductive batch, whose proxies are fitted on the batch itself; not when `calibrated` is False).
        A state that changes the tower (MedUnA's prompt tokens, HiCA's tuned weights) needs its own forward:
        `files` (those `image_features` were encoded from) are encoded again with it."""
        state = None if transductive else await self.state(method, head)
        _require_state(method, head, state)
        variant = _tower_variant(state)
        if variant is not None:
            if files is None:
                raise ValueError(f"method {method.name} encodes with its own tower variant: pass the files")
            pool = await self.encode_pool(files, variant=variant)
            if len(pool.used) != len(files):   # a file that read the first time and not now: rows would shift
                raise InvalidInput(f"{len(files) - len(pool.used)} of {len(files)} files could not be read again "
                                   f"for {method.name}'s own forward: {pool.skipped[0][0]}")
            image_features = pool.features
        scores = await self._score(method, head, state, image_features, transductive)
        calibration = None if transductive or not calibrated else await self.calibration(method, head, state)
        return dataclasses.replace(self._calibrated(scores, calibration), state=state)

    async def classify(self, file: UploadedFile, *, label_set: str, method: str, top_k: int | None,
                       abstain_threshold: float | None = None,
                       options: Mapping[str, object] | None = None) -> Classification:
        """Classify one image. Admission, label set and method come before the image is read.
        `abstain_threshold` overrides the label set's; `options` configure the method (fewshot's cache)."""
        chosen = self.method(method, options)
        with self._admission.try_acquire(1):
            head = await self.head(label_set)
            state = await self.state(chosen, head)
            _require_state(chosen, head, state)
            calibration = await self.calibration(chosen, head, state)
            [outcome] = await self.encode_files([file], variant=_tower_variant(state))
            if isinstance(outcome, MedzeroError):
                raise outcome
            scores = await self._score(chosen, head, state, outcome.features.unsqueeze(0), transductive=False)
        assessment = self._calibrated(scores, calibration)
        return self._classification(head, chosen, assessment, 0, outcome, top_k, abstain_threshold)

    async def classify_batch(self, files: Sequence[UploadedFile], *, label_set: str, method: str, top_k: int | None,
                             transductive: bool = False, abstain_threshold: float | None = None,
                             options: Mapping[str, object] | None = None) -> list[Classification | MedzeroError]:
        """Classify several images; a bad file yields its error in its place, the others still succeed.
        `transductive`: the method adapts to the batch's images before predicting them (kpl) -- all of them or
        none: a batch with an unusable file is refused whole, never fitted on whatever got through."""
        chosen = self.method(method, options)
        if transductive and not chosen.supports_transductive:
            raise InvalidInput(f"method {method!r} is not transductive; use one of: "
                               f"{', '.join(self.transductive_method_names)}")
        with self._admission.try_acquire(len(files)):
            head = await self.head(label_set)
            state = None if transductive else await self.state(chosen, head)
            _require_state(chosen, head, state)
            calibration = None if transductive else await self.calibration(chosen, head, state)
            outcomes = await self.encode_files(files, variant=_tower_variant(state))
            if transductive:
                _refuse_partial_batch(files, outcomes)
            encoded = [outcome for outcome in outcomes if isinstance(outcome, Encoded)]
            if not encoded:
                return list(outcomes)
            scores = await self._score(chosen, head, state, torch.stack([e.features for e in encoded]), transductive)
        assessment = self._calibrated(scores, calibration)
        rows = iter(range(len(encoded)))
        return [outcome if isinstance(outcome, MedzeroError)
                else self._classification(head, chosen, assessment, next(rows), outcome, top_k, abstain_threshold)
                for outcome in outcomes]

    async def encode_pool(self, files: Sequence[UploadedFile], *, progress: bool = False,
                          description: str = "encoding", variant: TowerVariant | None = None) -> EncodedPool:
        """Encode a pool of files as /classify does, with admission permits a chunk at a time (waited for, so a
        long job does not fail on a traffic burst). A file that cannot be used is skipped with its error; a
        refusal of the server's own (503) is raised instead, so no job runs on a load-dependent subset."""
        features, used, skipped = [], [], []
        with tqdm(total=len(files), desc=description, unit="image", disable=not progress) as bar:
            for start in range(0, len(files), self._pool_chunk_images):
                chunk = files[start:start + self._pool_chunk_images]
                with await self._admission.acquire(len(chunk), self._permit_timeout_seconds):
                    outcomes = await self.encode_files(chunk, variant=variant)
                for offset, (file, outcome) in enumerate(zip(chunk, outcomes)):
                    if isinstance(outcome, MedzeroError) and outcome.status_code == 503:
                        raise outcome           # the server is busy or stopping: fail the job, drop no image
                    if isinstance(outcome, MedzeroError):
                        skipped.append((file.name, outcome))
                    else:
                        features.append(outcome.features)
                        used.append(start + offset)
                bar.update(len(chunk))
        return EncodedPool(torch.stack(features) if features else None, used, skipped)

    async def encode_files(self, files: Sequence[UploadedFile], *,
                           variant: TowerVariant | None = None) -> list["Encoded | MedzeroError"]:
        """Read, decode and encode admitted files, sharing forwards (with `variant`: that tower's); a
        file that cannot be used yields its error in its place."""
        with self._batcher.expecting(len(files)) as announcement:
            outcomes = await asyncio.gather(*(self._encode_file(file, announcement, variant) for file in files),
                                            return_exceptions=True)
        for outcome in outcomes:
            if isinstance(outcome, BaseException) and not isinstance(outcome, MedzeroError):
                raise outcome
        return list(outcomes)

    async def _encode_file(self, file: UploadedFile, announcement: Announcement,
                           variant: TowerVariant | None) -> Encoded:
        started = time.perf_counter()
        try:
            data = await file.read()
            tensor, input_format = await asyncio.get_running_loop().run_in_executor(
                self._decode_pool, self._decode, data)
        except BaseException:
            self._batcher.withdraw(announcement)   # the batch-mates' forward need not wait for this one
            raise
        features = await self._batcher.encode(tensor, announcement, variant)
        metrics.IMAGES.labels(format=input_format).inc()
        return Encoded(features, input_format, started)

    async def _score(self, method: Method, head: ClassHead, state: object | None, image_features: torch.Tensor,
                     transductive: bool) -> Scores:
        started = time.perf_counter()
        scores = await run_in_threadpool(method.score, image_features, head, state, logit_scale=self._logit_scale,
                                         transductive=transductive)
        metrics.STAGE_SECONDS.labels(stage="score").observe((time.perf_counter() - started) / len(image_features))
        return scores

    def _decode(self, data: bytes) -> tuple[torch.Tensor, str]:
        started = time.perf_counter()
        decoded = decode_image(data, max_pixels=self._limits.max_pixels, max_aspect_ratio=self._limits.max_aspect_ratio)
        tensor = self._preprocess(decoded.image)
        metrics.STAGE_SECONDS.labels(stage="decode").observe(time.perf_counter() - started)
        return tensor, decoded.format

    @staticmethod
    def _calibrated(scores: Scores, calibration: Calibration | None) -> Assessment:
        if calibration is None:
            return Assessment(scores, scores.probabilities, None, None)
        probabilities = apply_temperature(scores.logits, calibration.temperature)
        return Assessment(scores, probabilities, calibration, prediction_sets(probabilities, calibration.set_threshold))

    def decide(self, head: ClassHead, probabilities: torch.Tensor, prediction_set: list[int] | None,
               abstain_threshold: float | None) -> Decision:
        """One image's decision: the top class, unless its probability is below the abstain threshold (the
        request's, else the label set's) or -- with MEDZERO_DECISION_RULE=prediction_set and a calibrated method --
        its prediction set is not exactly one class."""
        threshold = head.abstain_threshold if abstain_threshold is None else abstain_threshold
        top = int(probabilities.argmax())
        by_set = self._decision_rule == "prediction_set" and prediction_set is not None
        rules = (["prediction_set"] if by_set else []) + (["threshold"] if threshold is not None else [])
        uncertain = ((threshold is not None and float(probabilities[top]) < threshold)
                     or (by_set and len(prediction_set) != 1))
        label = None if uncertain else head.class_names[prediction_set[0] if by_set else top]
        return Decision(label, "+".join(rules) or "top1", threshold)

    def _classification(self, head: ClassHead, method: Method, assessment: Assessment, row: int, encoded: Encoded,
                        top_k: int | None, abstain_threshold: float | None) -> Classification:
        scores = assessment.scores
        predictions = _rank(head, assessment.probabilities, scores, row, top_k)
        prediction_set = assessment.prediction_sets[row] if assessment.prediction_sets is not None else None
        decision = self.decide(head, assessment.probabilities[row], prediction_set, abstain_threshold)
        label_set, label = prediction_labels(self._metric_label_sets, head.label_set, predictions[0].label)
        metrics.PREDICTIONS.labels(label_set=label_set, label=label, method=method.name).inc()
        metrics.DECISIONS.labels(method=method.name, outcome="uncertain" if decision.label is None else "class",
                                 calibrated=str(assessment.calibration is not None).lower()).inc()
        return Classification(label_set=head.label_set, label_set_version=head.version, model_id=head.model_id,
                              method=method.name, input_format=encoded.input_format, predictions=predictions,
                              elapsed_ms=round((time.perf_counter() - encoded.started) * 1000, 3),
                              decision=decision, calibration=assessment.calibration,
                              prediction_set=None if prediction_set is None
                              else [head.class_names[c] for c in prediction_set],
                              details=scores.details)


def _tower_variant(state: object | None) -> TowerVariant | None:
    """How a method's state changes the vision tower (a MedUnA adapter's prompt tokens, HiCA's tuned weights), or
    None: the plain encoder."""
    return getattr(state, "tower_variant", None)


def _require_state(method: Method, head: ClassHead, state: object | None) -> None:
    """A method that cannot score without its state (meduna without an adapter) refuses before any image is
    read."""
    require = getattr(method, "require", None)
    if require is not None:
        require(head, state)


def _refuse_partial_batch(files: Sequence[UploadedFile], outcomes: Sequence["Encoded | MedzeroError"]) -> None:
    failures = [(file.name, outcome) for file, outcome in zip(files, outcomes) if isinstance(outcome, MedzeroError)]
    if not failures:
        return
    for _, error in failures:
        if error.status_code == 503:      # the server's state, not the files': the whole request is retried
            raise error
    listed = ", ".join(f"{name} ({error.code})" for name, error in failures)
    raise UnusableBatch(f"a transductive batch is fitted on all of its images or none: {len(failures)} of "
                        f"{len(files)} files cannot be used: {listed}; fix or drop them and send the batch again")


def _rank(head: ClassHead, all_probabilities: torch.Tensor, scores: Scores, row: int,
          top_k: int | None) -> list[RankedPrediction]:
    probabilities, similarities = all_probabilities[row], scores.similarities[row]
    k = len(head.class_names) if top_k is None else min(top_k, len(head.class_names))
    return [RankedPrediction(label=head.class_names[i], probability=round(float(probabilities[i]), 6),
                             similarity=round(float(similarities[i]), 6),
                             evidence=scores.evidence[row][i] if scores.evidence else None)
            for i in torch.topk(probabilities, k).indices.tolist()]
