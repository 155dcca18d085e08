"""Micro-batching: concurrent requests share one encoder forward (infinity's batch_handler, TEI's queue).

Requests put preprocessed image tensors on a queue and await a future; `encode_images(pixels)` runs a plain
forward, `encode_images(pixels, variant)` one of the tower changed by a method's state. One worker task takes the first waiting
image plus whatever else is queued (up to `max_batch_size`) and runs a single forward on the encoder's own thread,
so the event loop never blocks on torch; while a forward runs, new requests queue up and form the next batch. It
waits (at most `max_wait_seconds`) for more only when callers announced images that are still being decoded
(`expecting`), so a lone request never pays the wait and a batch request's images share forwards. Images for a
changed tower (a MedUnA adapter's prompt tokens, HiCA's tuned weights) share forwards with images for the same
variant only: a forward is plain or runs one variant, never a mix; the others wait for the next forward, in order.

The queue is not bounded here: only images holding an admission permit (app.services.admission) reach it.
Everything else that runs the model -- text embeddings for label sets and the description index -- goes through
`run_sync` onto the same thread, so it never runs concurrently with an image forward. Every future is resolved:
with its embedding, with the forward's error, with EncoderTimeout when the caller stops waiting, or with NotReady
when the batcher stops or its task dies (then `failure` says why, and readiness turns 503).
"""
import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TypeVar

import torch

from app import metrics
from app.encoders.tower_variants import TowerVariant
from app.errors import EncoderTimeout, NotReady

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass
class Announcement:
    pending: int                             # announced images not yet submitted


@dataclass
class _Pending:
    pixels: torch.Tensor                     # (3, H, W), preprocessed
    future: asyncio.Future
    variant: TowerVariant | None = None      # the tower to encode with (by identity), None: the plain encoder
    enqueued_at: float = field(default_factory=time.perf_counter)


class Batcher:
    def __init__(self, encode_images: Callable[..., torch.Tensor], *, max_batch_size: int,
                 max_wait_seconds: float, timeout_seconds: float) -> None:
        self._encode_images = encode_images
        self._max_batch_size = max_batch_size
        self._max_wait_seconds = max_wait_seconds
        self._timeout_seconds = timeout_seconds
        self._queue: asyncio.Queue[_Pending] = asyncio.Queue()
        self._deferred: deque[_Pending] = deque()   # taken off the queue for another variant's forward: go first
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="medzero-encoder")
        self._encoder_thread: int | None = None
        self._worker: asyncio.Task | None = None
        self._in_flight: list[_Pending] = []     # the batch whose forward runs now
        self._announced = 0          # images callers are decoding now and will submit soon
        self._arrival = asyncio.Event()
        self._stopping = False
        self.failure: str | None = None          # why the batching task ended, when it was not stopped

    def start(self) -> None:
        self._worker = asyncio.get_running_loop().create_task(self._run(), name="medzero-batcher")
        self._worker.add_done_callback(self._on_worker_done)

    async def stop(self) -> None:
        """Stop batching: every queued or in-flight future is failed with NotReady; waits for the encoder thread
        off the event loop, at most the encode timeout."""
        self._stopping = True
        if self._worker is not None:
            self._worker.cancel()
            await asyncio.gather(self._worker, return_exceptions=True)
        self._fail_waiting(NotReady("the server is shutting down; retry on another instance or after restart"))
        shutdown = asyncio.to_thread(self._executor.shutdown, wait=True, cancel_futures=True)
        try:
            await asyncio.wait_for(shutdown, timeout=self._timeout_seconds)
        except TimeoutError:
            log.warning("the encoder thread is still busy after %.0f s; not waiting for it", self._timeout_seconds)

    @property
    def running(self) -> bool:
        return self._worker is not None and not self._worker.done()

    @property
    def pending_images(self) -> int:
        """Images submitted and not answered yet: queued, or in the forward that runs (or waits to run) now."""
        return self._queue.qsize() + len(self._deferred) + len(self._in_flight)

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

    async def encode(self, pixels: torch.Tensor, announcement: "Announcement | None" = None,
                     variant: TowerVariant | None = None) -> torch.Tensor:
        """One preprocessed image (3, H, W) -> its (dim,) L2-normalised embedding, batched with its neighbours
        (those for the same `variant`, or plain ones when None)."""
        if not self.running:
            raise NotReady(self.failure or "the encoder is not running")
        if announcement is not None and announcement.pending > 0:
            announcement.pending -= 1
            self._announced -= 1
        pending = _Pending(pixels, asyncio.get_running_loop().create_future(), variant)
        self._queue.put_nowait(pending)
        self._arrival.set()
        metrics.QUEUE_IMAGES.set(self._queue.qsize())
        try:
            return await asyncio.wait_for(pending.future, timeout=self._timeout_seconds)
        except TimeoutError:
            raise EncoderTimeout(f"the encoder did not answer within {self._timeout_seconds:g} s "
                                 "(MEDZERO_ENCODE_TIMEOUT_SECONDS); retry shortly") from None

    def run_sync(self, fn: Callable[..., T], *args: object) -> T:
        """Run other model work (text embeddings) on the encoder thread, between forwards, from any thread but the
        event loop's; blocks until it is done."""
        if threading.get_ident() == self._encoder_thread:
            return fn(*args)
        try:
            future = self._executor.submit(self._on_encoder_thread, fn, *args)
        except RuntimeError:   # the executor was shut down
            raise NotReady("the encoder is shutting down") from None
        return future.result()

    def _stack_and_encode(self, pixels: list[torch.Tensor], *variant: object) -> torch.Tensor:
        return self._encode_images(torch.stack(pixels), *variant)

    def _on_encoder_thread(self, fn: Callable[..., T], *args: object) -> T:
        self._encoder_thread = threading.get_ident()
        return fn(*args)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._next_batch()
            if not batch:
                continue
            metrics.QUEUE_IMAGES.set(self._queue.qsize())
            started = time.perf_counter()
            for pending in batch:
                metrics.STAGE_SECONDS.labels(stage="queue").observe(started - pending.enqueued_at)
            self._in_flight = batch
            try:
                variant = () if batch[0].variant is None else (batch[0].variant,)
                # the batch tensor is assembled on the encoder thread too: a copy of up to max_batch_size images
                # the event loop should not wait on
                features = await loop.run_in_executor(self._executor, self._on_encoder_thread, self._stack_and_encode,
                                                      [p.pixels for p in batch], *variant)
                if len(features) != len(batch):
                    raise RuntimeError(f"the encoder returned {len(features)} embeddings for {len(batch)} images")
            except Exception as exc:   # a failed forward fails its requests, never the worker
                log.exception("encoder forward failed for a batch of %d", len(batch))
                self._in_flight = []
                self._resolve(batch, error=exc)
                continue
            # (anything else ends the task with the batch still in flight: _on_worker_done fails it)
            self._in_flight = []
            metrics.BATCH_SIZE.observe(len(batch))
            metrics.STAGE_SECONDS.labels(stage="encode").observe(time.perf_counter() - started)
            self._resolve(batch, rows=features)

    async def _next_batch(self) -> list[_Pending]:
        batch = [self._deferred.popleft() if self._deferred else await self._queue.get()]
        others: list[_Pending] = []             # for other variants: the next forwards', in arrival order
        deadline = time.perf_counter() + self._max_wait_seconds
        try:
            chosen = await self._fill(batch, others, deadline)
        except BaseException:            # stopping mid-collection: every image goes back, so stop() answers it
            self._deferred.extendleft(sorted(batch + others, key=lambda p: p.enqueued_at, reverse=True))
            raise
        self._deferred.extendleft(reversed(others))
        return chosen

    async def _fill(self, batch: list[_Pending], others: list[_Pending], deadline: float) -> list[_Pending]:
        waiting = deque(self._deferred)
        self._deferred.clear()
        try:
            while len(batch) < self._max_batch_size:
                if waiting or not self._queue.empty():
                    pending = waiting.popleft() if waiting else self._queue.get_nowait()
                    (batch if pending.variant is batch[0].variant else others).append(pending)
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
        finally:
            others.extend(waiting)              # not looked at: still in order, still first
        return [pending for pending in batch if not pending.future.done()]   # callers that gave up: no forward

    @staticmethod
    def _resolve(batch: list[_Pending], *, rows: torch.Tensor | None = None, error: BaseException | None = None):
        for i, pending in enumerate(batch):
            if pending.future.done():      # the caller stopped waiting
                continue
            if error is not None:
                pending.future.set_exception(error)
            else:
                pending.future.set_result(rows[i])

    def _fail_waiting(self, error: Exception) -> None:
        self._resolve(self._in_flight, error=error)
        self._in_flight = []
        self._resolve(list(self._deferred), error=error)
        self._deferred.clear()
        while not self._queue.empty():
            self._resolve([self._queue.get_nowait()], error=error)
        metrics.QUEUE_IMAGES.set(0)

    def _on_worker_done(self, task: asyncio.Task) -> None:
        if self._stopping:
            return
        reason = "was cancelled" if task.cancelled() else f"died: {type(task.exception()).__name__}"
        self.failure = f"the encoder's batching task {reason}; restart the server"
        log.error("%s", self.failure, exc_info=None if task.cancelled() else task.exception())
        metrics.READY.set(0)          # no image can be encoded any more: /readyz says so too (Runtime.state)
        self._fail_waiting(NotReady(self.failure))
