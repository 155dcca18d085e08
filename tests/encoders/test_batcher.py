"""Micro-batching: concurrent requests share forwards, results go back to the right caller, a full queue refuses."""
import asyncio
import threading

import pytest
import torch

from app.encoders.batcher import Batcher
from app.errors import Overloaded


class RecordingEncoder:
    """A real function standing in for the model: row sums as 'features', and a gate to hold a forward."""

    def __init__(self) -> None:
        self.batch_sizes: list[int] = []
        self.gate = threading.Event()
        self.gate.set()

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        self.gate.wait(timeout=10)
        self.batch_sizes.append(len(pixels))
        return pixels.flatten(1).sum(dim=1, keepdim=True).repeat(1, 2)


def test_concurrent_requests_are_batched_and_answered_in_order() -> None:
    async def scenario() -> None:
        encoder = RecordingEncoder()
        batcher = Batcher(encoder, max_batch_size=8, max_wait_seconds=0.05, max_queue_images=100)
        batcher.start()
        try:
            images = [torch.full((3, 2, 2), float(i)) for i in range(20)]
            results = await asyncio.gather(*(batcher.encode(image) for image in images))
        finally:
            await batcher.stop()
        assert [float(r[0]) for r in results] == [12.0 * i for i in range(20)]   # each caller got its own row
        assert sum(encoder.batch_sizes) == 20 and max(encoder.batch_sizes) == 8
        assert len(encoder.batch_sizes) <= 4                                      # 20 images, batches of <= 8

    asyncio.run(scenario())


def test_full_queue_answers_overloaded() -> None:
    async def scenario() -> None:
        encoder = RecordingEncoder()
        encoder.gate.clear()                          # hold the first forward so the queue fills behind it
        batcher = Batcher(encoder, max_batch_size=1, max_wait_seconds=0, max_queue_images=3)
        batcher.start()
        try:
            first = asyncio.ensure_future(batcher.encode(torch.zeros(3, 2, 2)))
            await asyncio.sleep(0.05)                 # the worker took it and is blocked in the forward
            waiting = [asyncio.ensure_future(batcher.encode(torch.ones(3, 2, 2))) for _ in range(3)]
            await asyncio.sleep(0)
            with pytest.raises(Overloaded, match="MEDZERO_MAX_QUEUE_IMAGES=3"):
                await batcher.encode(torch.ones(3, 2, 2))
            encoder.gate.set()
            assert len(await asyncio.gather(first, *waiting)) == 4   # the queued ones still complete
        finally:
            encoder.gate.set()
            await batcher.stop()

    asyncio.run(scenario())


def test_a_failing_forward_fails_its_batch_not_the_worker() -> None:
    async def scenario() -> None:
        calls = []

        def flaky(pixels: torch.Tensor) -> torch.Tensor:
            calls.append(len(pixels))
            if len(calls) == 1:
                raise RuntimeError("out of memory")
            return pixels.flatten(1)

        batcher = Batcher(flaky, max_batch_size=4, max_wait_seconds=0, max_queue_images=10)
        batcher.start()
        try:
            with pytest.raises(RuntimeError, match="out of memory"):
                await batcher.encode(torch.zeros(1, 1, 1))
            assert (await batcher.encode(torch.ones(1, 1, 1))).tolist() == [1.0]
        finally:
            await batcher.stop()

    asyncio.run(scenario())


def test_announced_images_share_a_forward_and_a_lone_image_does_not_wait() -> None:
    async def scenario() -> None:
        encoder = RecordingEncoder()
        batcher = Batcher(encoder, max_batch_size=8, max_wait_seconds=30, max_queue_images=100)
        batcher.start()
        try:
            # nothing announced: a lone image goes straight through despite the 30 s window
            await asyncio.wait_for(batcher.encode(torch.ones(3, 2, 2)), timeout=10)

            async def decode_then_encode(announcement, delay: float) -> torch.Tensor:
                await asyncio.sleep(delay)                     # images finish decoding at different times
                return await batcher.encode(torch.ones(3, 2, 2), announcement)

            with batcher.expecting(3) as announcement:
                await asyncio.wait_for(asyncio.gather(*(decode_then_encode(announcement, 0.02 * i)
                                                        for i in range(3))), timeout=10)
            with batcher.expecting(2) as announcement:         # one of two fails to decode and is withdrawn
                batcher.withdraw(announcement)
                await asyncio.wait_for(decode_then_encode(announcement, 0), timeout=10)
        finally:
            await batcher.stop()
        assert encoder.batch_sizes == [1, 3, 1]

    asyncio.run(scenario())


def test_stop_while_the_worker_waits_for_announced_images() -> None:
    """A stop that races the wake-up of a waiting worker still stops it (3.11's wait_for swallowed it)."""
    async def scenario() -> None:
        batcher = Batcher(lambda pixels: pixels.flatten(1), max_batch_size=8, max_wait_seconds=30,
                          max_queue_images=10)
        batcher.start()
        with batcher.expecting(2) as announcement:
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(batcher.encode(torch.ones(3, 2, 2), announcement), timeout=0.2)
        await asyncio.wait_for(batcher.stop(), timeout=10)

    asyncio.run(scenario())
