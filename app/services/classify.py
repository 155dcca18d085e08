"""The /classify use case: admission (permits for every image, before anything is read) -> the label set's class
head and the method's learned state, resolved once per request -> bounded read, decode and preprocess (worker
pool) -> batched encoder forward -> the method's pure scoring -> ranked predictions (with evidence where the
method has some)."""
import asyncio
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import cast

import torch
from PIL import Image
from starlette.concurrency import run_in_threadpool

from app import metrics
from app.domain import Prediction
from app.encoders.batcher import Announcement, Batcher
from app.errors import InvalidInput, MedzeroError, UnknownMethod, UnusableBatch
from app.imaging.decode import decode_image
from app.methods.base import ClassEvidence, ClassHead, Method, Scores, StatefulMethod
from app.services.admission import Admission
from app.services.label_sets import LabelSetService
from app.services.uploads import UploadedFile
from app.storage.method_states import MethodStateRepository, StateKey

# label set -> the class names exported as metric labels (None: all of its classes); everything else is "other"
MetricLabelSets = Mapping[str, frozenset[str] | None]


@dataclass(frozen=True)
class RankedPrediction(Prediction):
    evidence: ClassEvidence | None = None


@dataclass(frozen=True)
class Classification:
    label_set: str
    label_set_version: int
    model_id: str
    method: str
    input_format: str
    predictions: list[RankedPrediction]
    elapsed_ms: float
    details: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Encoded:
    features: torch.Tensor      # (dim,), L2-normalised
    input_format: str
    started: float


@dataclass(frozen=True)
class ImageLimits:
    max_pixels: int
    max_aspect_ratio: float


def state_key(method: Method, head: ClassHead) -> StateKey:
    return StateKey(method.state_kind, head.label_set, head.version, head.model_id)


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
                 metric_label_sets: MetricLabelSets) -> None:
        self._preprocess = preprocess
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

    def method(self, name: str) -> Method:
        try:
            return self._methods[name]
        except KeyError:
            raise UnknownMethod(f"unknown method {name!r}; available: {', '.join(self.method_names)}") from None

    async def head(self, label_set: str) -> ClassHead:
        return await run_in_threadpool(self._label_sets.head, label_set)

    async def state(self, method: Method, head: ClassHead) -> object | None:
        """What `method` learned for this label-set version and model (None if nothing): once per request."""
        if method.state_kind is None:
            return None
        stateful = cast(StatefulMethod, method)
        return await run_in_threadpool(self._states.current, state_key(method, head), stateful.load_state)

    async def classify(self, file: UploadedFile, *, label_set: str, method: str, top_k: int | None) -> Classification:
        """Classify one image. Admission, label set and method come before the image is read."""
        chosen = self.method(method)
        with self._admission.try_acquire(1):
            head = await self.head(label_set)
            state = await self.state(chosen, head)
            [outcome] = await self.encode_files([file])
            if isinstance(outcome, MedzeroError):
                raise outcome
            scores = await self._score(chosen, head, state, outcome.features.unsqueeze(0), transductive=False)
        return self._classification(head, chosen, scores, 0, outcome, top_k)

    async def classify_batch(self, files: Sequence[UploadedFile], *, label_set: str, method: str, top_k: int | None,
                             transductive: bool = False) -> list[Classification | MedzeroError]:
        """Classify several images; a bad file yields its error in its place, the others still succeed.
        `transductive`: the method adapts to the batch's images before predicting them (kpl) -- all of them or
        none: a batch with an unusable file is refused whole, never fitted on whatever got through."""
        chosen = self.method(method)
        if transductive and not chosen.supports_transductive:
            transductive_methods = sorted(n for n, m in self._methods.items() if m.supports_transductive)
            raise InvalidInput(f"method {method!r} is not transductive; use one of: {', '.join(transductive_methods)}")
        with self._admission.try_acquire(len(files)):
            head = await self.head(label_set)
            state = None if transductive else await self.state(chosen, head)
            outcomes = await self.encode_files(files)
            if transductive:
                _refuse_partial_batch(files, outcomes)
            encoded = [outcome for outcome in outcomes if isinstance(outcome, Encoded)]
            if not encoded:
                return list(outcomes)
            scores = await self._score(chosen, head, state, torch.stack([e.features for e in encoded]), transductive)
        rows = iter(range(len(encoded)))
        return [outcome if isinstance(outcome, MedzeroError)
                else self._classification(head, chosen, scores, next(rows), outcome, top_k) for outcome in outcomes]

    async def encode_files(self, files: Sequence[UploadedFile]) -> list["Encoded | MedzeroError"]:
        """Read, decode and encode admitted files, sharing forwards; a file that cannot be used yields its error
        in its place."""
        with self._batcher.expecting(len(files)) as announcement:
            outcomes = await asyncio.gather(*(self._encode_file(file, announcement) for file in files),
                                            return_exceptions=True)
        for outcome in outcomes:
            if isinstance(outcome, BaseException) and not isinstance(outcome, MedzeroError):
                raise outcome
        return list(outcomes)

    async def _encode_file(self, file: UploadedFile, announcement: Announcement) -> Encoded:
        started = time.perf_counter()
        try:
            data = await file.read()
            tensor, input_format = await asyncio.get_running_loop().run_in_executor(
                self._decode_pool, self._decode, data)
        except BaseException:
            self._batcher.withdraw(announcement)   # the batch-mates' forward need not wait for this one
            raise
        features = await self._batcher.encode(tensor, announcement)
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

    def _classification(self, head: ClassHead, method: Method, scores: Scores, row: int, encoded: Encoded,
                        top_k: int | None) -> Classification:
        predictions = _rank(head, scores, row, top_k)
        label_set, label = prediction_labels(self._metric_label_sets, head.label_set, predictions[0].label)
        metrics.PREDICTIONS.labels(label_set=label_set, label=label, method=method.name).inc()
        return Classification(label_set=head.label_set, label_set_version=head.version, model_id=head.model_id,
                              method=method.name, input_format=encoded.input_format, predictions=predictions,
                              elapsed_ms=round((time.perf_counter() - encoded.started) * 1000, 3),
                              details=scores.details)


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


def _rank(head: ClassHead, scores: Scores, row: int, top_k: int | None) -> list[RankedPrediction]:
    probabilities, similarities = scores.probabilities[row], scores.similarities[row]
    k = len(head.class_names) if top_k is None else min(top_k, len(head.class_names))
    return [RankedPrediction(label=head.class_names[i], probability=round(float(probabilities[i]), 6),
                             similarity=round(float(similarities[i]), 6),
                             evidence=scores.evidence[row][i] if scores.evidence else None)
            for i in torch.topk(probabilities, k).indices.tolist()]
