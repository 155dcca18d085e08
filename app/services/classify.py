"""The /classify use case: bytes -> decoded, preprocessed pixels (worker pool) -> batched encoder forward ->
a method's scores against the label set's class head -> ranked predictions (with evidence where the method
has some)."""
import asyncio
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
from starlette.concurrency import run_in_threadpool

from app import metrics
from app.domain import Prediction
from app.encoders.batcher import Announcement, Batcher
from app.encoders.loader import Encoder
from app.errors import InvalidInput, MedzeroError, UnknownMethod
from app.imaging.decode import decode_image
from app.methods.base import ClassEvidence, ClassHead, Method, Scores
from app.services.label_sets import LabelSetService


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


class Classifier:
    def __init__(self, encoder: Encoder, batcher: Batcher, label_sets: LabelSetService,
                 methods: dict[str, Method], *, decode_workers: int, max_image_pixels: int) -> None:
        self._encoder = encoder
        self._batcher = batcher
        self._label_sets = label_sets
        self._methods = methods
        self._decode_pool = ThreadPoolExecutor(max_workers=decode_workers, thread_name_prefix="medzero-decode")
        self._max_image_pixels = max_image_pixels

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

    async def classify(self, data: bytes, *, label_set: str, method: str, top_k: int | None) -> Classification:
        """Classify one image. Label set and method are checked before the image is decoded."""
        chosen = self.method(method)
        head = await self.head(label_set)
        with self._batcher.expecting(1) as announcement:
            encoded = await self.encode(data, announcement)
        scores = await self._score(chosen, head, encoded.features.unsqueeze(0), transductive=False)
        return self._classification(head, chosen, scores, 0, encoded, top_k)

    async def classify_batch(self, files: Sequence[bytes], *, label_set: str, method: str, top_k: int | None,
                             transductive: bool = False) -> list[Classification | MedzeroError]:
        """Classify several images; a bad file yields its error in its place, the others still succeed.
        `transductive`: the method adapts to the batch's images before predicting them (kpl)."""
        chosen = self.method(method)
        if transductive and not chosen.supports_transductive:
            transductive_methods = sorted(n for n, m in self._methods.items() if m.supports_transductive)
            raise InvalidInput(f"method {method!r} is not transductive; use one of: {', '.join(transductive_methods)}")
        head = await self.head(label_set)
        outcomes = await self.encode_many(files)
        encoded = [outcome for outcome in outcomes if isinstance(outcome, Encoded)]
        if not encoded:
            return list(outcomes)
        scores = await self._score(chosen, head, torch.stack([e.features for e in encoded]), transductive)
        rows = iter(range(len(encoded)))
        return [outcome if isinstance(outcome, MedzeroError)
                else self._classification(head, chosen, scores, next(rows), outcome, top_k) for outcome in outcomes]

    async def encode_many(self, files: Sequence[bytes]) -> list["Encoded | MedzeroError"]:
        """Encode several images, sharing forwards; a file that cannot be used yields its error in its place."""
        with self._batcher.expecting(len(files)) as announcement:
            outcomes = await asyncio.gather(*(self.encode(data, announcement) for data in files),
                                            return_exceptions=True)
        for outcome in outcomes:
            if isinstance(outcome, BaseException) and not isinstance(outcome, MedzeroError):
                raise outcome
        return list(outcomes)

    async def encode(self, data: bytes, announcement: Announcement) -> Encoded:
        """Decode and preprocess on the worker pool, then the batched encoder forward."""
        started = time.perf_counter()
        try:
            tensor, input_format = await asyncio.get_running_loop().run_in_executor(
                self._decode_pool, self._decode, data)
        except BaseException:
            self._batcher.withdraw(announcement)   # the batch-mates' forward need not wait for this one
            raise
        features = await self._batcher.encode(tensor, announcement)
        metrics.IMAGES.labels(format=input_format).inc()
        return Encoded(features, input_format, started)

    async def _score(self, method: Method, head: ClassHead, image_features: torch.Tensor,
                     transductive: bool) -> Scores:
        started = time.perf_counter()
        scores = await run_in_threadpool(method.score, image_features, head, logit_scale=self._encoder.logit_scale,
                                         transductive=transductive)
        metrics.STAGE_SECONDS.labels(stage="score").observe((time.perf_counter() - started) / len(image_features))
        return scores

    def _decode(self, data: bytes) -> tuple[torch.Tensor, str]:
        started = time.perf_counter()
        decoded = decode_image(data, max_pixels=self._max_image_pixels)
        tensor = self._encoder.preprocess(decoded.image)
        metrics.STAGE_SECONDS.labels(stage="decode").observe(time.perf_counter() - started)
        return tensor, decoded.format

    def _classification(self, head: ClassHead, method: Method, scores: Scores, row: int, encoded: Encoded,
                        top_k: int | None) -> Classification:
        predictions = _rank(head, scores, row, top_k)
        metrics.PREDICTIONS.labels(label_set=head.label_set, label=predictions[0].label, method=method.name).inc()
        return Classification(label_set=head.label_set, label_set_version=head.version, model_id=head.model_id,
                              method=method.name, input_format=encoded.input_format, predictions=predictions,
                              elapsed_ms=round((time.perf_counter() - encoded.started) * 1000, 3),
                              details=scores.details)


def _rank(head: ClassHead, scores: Scores, row: int, top_k: int | None) -> list[RankedPrediction]:
    probabilities, similarities = scores.probabilities[row], scores.similarities[row]
    k = len(head.class_names) if top_k is None else min(top_k, len(head.class_names))
    return [RankedPrediction(label=head.class_names[i], probability=round(float(probabilities[i]), 6),
                             similarity=round(float(similarities[i]), 6),
                             evidence=scores.evidence[row][i] if scores.evidence else None)
            for i in torch.topk(probabilities, k).indices.tolist()]
