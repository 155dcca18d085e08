"""Micro-batching: concurrent requests share one encoder forward (infinity's batch_handler, TEI's queue).

Requests put preprocessed image tensors on a bounded queue and await a future. One worker task takes the
first waiting image plus whatever else is queued (up to `max_batch_size`) and runs a single forward on a
dedicated thread, so the event loop never blocks on torch; while a forward runs, new requests queue up and
form the next batch. It waits (at most `max_wait_seconds`) for more only when callers announced images that
are still being decoded (`expecting`), so a lone request never pays the wait and a batch request's images
share forwards. A full queue refuses at once (Overloaded -> 503 + Retry-After).
"""
import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from app import metrics
from app.errors import NotReady, Overloaded

log = logging.getLogger(__name__)


@dataclass
class Announcement:
    pending: int                             # announced images not yet submitted


@dataclass
class _Pending:
    pixels: torch.Tensor                     # (3, H, W), preprocessed
    future: asyncio.Future
    enqueued_at: float = field(default_factory=time.perf_counter)


class Batcher:
    def __init__(self, encode_images: Callable[[torch.Tensor], torch.Tensor], *, max_batch_size: int,
                 max_wait_seconds: float, max_queue_images: int) -> None:
        self._encode_images = encode_images
        self._max_batch_size = max_batch_size
        self._max_wait_seconds = max_wait_seconds
        self._max_queue_images = max_queue_images
        self._queue: asyncio.Queue[_Pending] = asyncio.Queue()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="medzero-encoder")
        self._worker: asyncio.Task | None = None
        self._announced = 0          # images callers are decoding now and will submit soon
        self._arrival = asyncio.Event()

    def start(self) -> None:
        self._worker = asyncio.get_running_loop().create_task(self._run(), name="medzero-batcher")

    async def stop(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            await asyncio.gather(self._worker, return_exceptions=True)
            self._worker = None
        while not self._queue.empty():
            pending = self._queue.get_nowait()
            if not pending.future.done():
                pending.future.set_exception(NotReady("server is shutting down"))
        metrics.QUEUE_IMAGES.set(0)
        self._executor.shutdown(wait=True)

    @property
    def queued_images(self) -> int:
        return self._queue.qsize()

    @contextmanager
    def expecting(self, n_images: int = 1) -> Iterator["Announcement"]:
        """Announce images about to be submitted (being decoded now). Each `encode(..., announcement)` takes
        one off; whatever was not submitted when the block ends (decode failed) is withdrawn."""
        announcement = Announcement(n_images)
        self._announced += n_images
        try:
            yield announcement
        finally:
            self.withdraw(announcement, announcement.pending)

    def withdraw(self, announcement: Announcement, n_images: int = 1) -> None:
        """Some announced images will not come (their decode failed): stop waiting for them."""
        n_images = min(n_images, announcement.pending)
        announcement.pending -= n_images
        self._announced -= n_images
        self._arrival.set()

    async def encode(self, pixels: torch.Tensor, announcement: "Announcement | None" = None) -> torch.Tensor:
        """One preprocessed image (3, H, W) -> its (dim,) L2-normalised embedding, batched with its neighbours."""
        if self._worker is None or self._worker.done():
            raise NotReady("the encoder is not running")
        if self._queue.qsize() >= self._max_queue_images:
            raise Overloaded(f"{self._queue.qsize()} images are already waiting for the encoder "
                             f"(MEDZERO_MAX_QUEUE_IMAGES={self._max_queue_images}); retry shortly")
        if announcement is not None and announcement.pending > 0:
            announcement.pending -= 1
            self._announced -= 1
        pending = _Pending(pixels, asyncio.get_running_loop().create_future())
        self._queue.put_nowait(pending)
        self._arrival.set()
        metrics.QUEUE_IMAGES.set(self._queue.qsize())
        return await pending.future

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._next_batch()
            metrics.QUEUE_IMAGES.set(self._queue.qsize())
            started = time.perf_counter()
            for pending in batch:
                metrics.STAGE_SECONDS.labels(stage="queue").observe(started - pending.enqueued_at)
            try:
                pixels = torch.stack([p.pixels for p in batch])
                features = await loop.run_in_executor(self._executor, self._encode_images, pixels)
            except Exception as exc:   # a failed forward fails its requests, never the worker
                log.exception("encoder forward failed for a batch of %d", len(batch))
                for pending in batch:
                    if not pending.future.done():
                        pending.future.set_exception(exc)
                continue
            elapsed = time.perf_counter() - started
            metrics.BATCH_SIZE.observe(len(batch))
            metrics.STAGE_SECONDS.labels(stage="encode").observe(elapsed)
            for pending, row in zip(batch, features):
                if not pending.future.done():   # the client may have gone away
                    pending.future.set_result(row)

    async def _next_batch(self) -> list[_Pending]:
        batch = [await self._queue.get()]
        deadline = time.perf_counter() + self._max_wait_seconds
        while len(batch) < self._max_batch_size:
            if not self._queue.empty():
                batch.append(self._queue.get_nowait())
                continue
            remaining = deadline - time.perf_counter()
            if self._announced <= 0 or remaining <= 0:
                break
            self._arrival.clear()
            try:
                # asyncio.timeout, not wait_for: 3.11's wait_for can swallow a cancel that races a wake-up
                async with asyncio.timeout(remaining):
                    await self._arrival.wait()
            except TimeoutError:
                break
        return batch

    def run_in_encoder_thread(self, fn: Callable, *args):
        """Run other encoder work (text embeddings) on the forward thread, between batches."""
        return asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)
