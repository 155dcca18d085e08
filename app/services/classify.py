"""The /classify use case: bytes -> decoded, preprocessed pixels (worker pool) -> batched encoder forward ->
a method's scores against the label set's class head -> ranked predictions."""
import asyncio
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
from starlette.concurrency import run_in_threadpool

from app import metrics
from app.domain import Prediction
from app.encoders.batcher import Announcement, Batcher
from app.encoders.loader import Encoder
from app.errors import MedzeroError, UnknownMethod
from app.imaging.decode import decode_image
from app.methods.base import ClassHead, Method
from app.services.label_sets import LabelSetService


@dataclass(frozen=True)
class Classification:
    label_set: str
    label_set_version: int
    model_id: str
    method: str
    input_format: str
    predictions: list[Prediction]
    elapsed_ms: float


@dataclass(frozen=True)
class _Pixels:
    tensor: torch.Tensor     # (3, H, W), the model's preprocess applied
    input_format: str


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
            return await self._classify_one(data, head, chosen, top_k, announcement)

    async def classify_batch(self, files: Sequence[bytes], *, label_set: str, method: str,
                             top_k: int | None) -> list[Classification | MedzeroError]:
        """Classify several images; a bad file yields its error in its place, the others still succeed."""
        chosen = self.method(method)
        head = await self.head(label_set)
        with self._batcher.expecting(len(files)) as announcement:   # the batch's images share forwards
            outcomes = await asyncio.gather(*(self._classify_one(data, head, chosen, top_k, announcement)
                                              for data in files), return_exceptions=True)
        for outcome in outcomes:
            if isinstance(outcome, BaseException) and not isinstance(outcome, MedzeroError):
                raise outcome
        return list(outcomes)

    async def _classify_one(self, data: bytes, head: ClassHead, method: Method, top_k: int | None,
                            announcement: Announcement) -> Classification:
        started = time.perf_counter()
        try:
            pixels = await asyncio.get_running_loop().run_in_executor(self._decode_pool, self._decode, data)
        except BaseException:
            self._batcher.withdraw(announcement)   # the batch-mates' forward need not wait for this one
            raise
        image_features = await self._batcher.encode(pixels.tensor, announcement)
        score_started = time.perf_counter()
        scores = method.score(image_features.unsqueeze(0), head, logit_scale=self._encoder.logit_scale)
        predictions = _rank(head, scores.probabilities[0], scores.similarities[0], top_k)
        metrics.STAGE_SECONDS.labels(stage="score").observe(time.perf_counter() - score_started)
        metrics.PREDICTIONS.labels(label_set=head.label_set, label=predictions[0].label, method=method.name).inc()
        metrics.IMAGES.labels(format=pixels.input_format).inc()
        return Classification(label_set=head.label_set, label_set_version=head.version, model_id=head.model_id,
                              method=method.name, input_format=pixels.input_format, predictions=predictions,
                              elapsed_ms=round((time.perf_counter() - started) * 1000, 3))

    def _decode(self, data: bytes) -> _Pixels:
        started = time.perf_counter()
        decoded = decode_image(data, max_pixels=self._max_image_pixels)
        tensor = self._encoder.preprocess(decoded.image)
        metrics.STAGE_SECONDS.labels(stage="decode").observe(time.perf_counter() - started)
        return _Pixels(tensor, decoded.format)


def _rank(head: ClassHead, probabilities: torch.Tensor, similarities: torch.Tensor,
          top_k: int | None) -> list[Prediction]:
    k = len(head.class_names) if top_k is None else min(top_k, len(head.class_names))
    top = torch.topk(probabilities, k)
    return [Prediction(label=head.class_names[i], probability=round(float(probabilities[i]), 6),
                       similarity=round(float(similarities[i]), 6)) for i in top.indices.tolist()]
