"""Micro-batching: concurrent requests share forwards, results go back to the right caller, every future is
resolved (stop, timeout, a dead worker), and other model work runs on the encoder thread."""
import asyncio
import itertools
import threading
import time

import pytest
import torch

from app.encoders.batcher import Batcher
from app.encoders.loader import load_encoder
from app.errors import EncoderTimeout, NotReady
from app.settings import Settings


@pytest.fixture(scope="module")
def encoder():
    return load_encoder(Settings(model_name="medzero-tiny"))


class GatedEncoder:
    """A real function standing in for the model where a test must hold a forward: row sums as 'features'."""

    def __init__(self) -> None:
        self.batch_sizes: list[int] = []
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        self.entered.set()
        self.gate.wait(timeout=30)
        self.batch_sizes.append(len(pixels))
        return pixels.flatten(1).sum(dim=1, keepdim=True).repeat(1, 2)


def batcher_for(encode, **options) -> Batcher:
    return Batcher(encode, **{"max_batch_size": 8, "max_wait_seconds": 0.05, "timeout_seconds": 30, **options})


def test_the_real_encoder_batched_equals_one_at_a_time(encoder) -> None:
    pixels = torch.randn(12, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    alone = encoder.encode_images(pixels)

    async def scenario() -> list[torch.Tensor]:
        sizes = []

        def recording(batch: torch.Tensor) -> torch.Tensor:
            sizes.append(len(batch))
            return encoder.encode_images(batch)

        batcher = batcher_for(recording, max_batch_size=5)
        batcher.start()
        try:
            with batcher.expecting(12) as announcement:
                results = await asyncio.gather(*(batcher.encode(p, announcement) for p in pixels))
        finally:
            await batcher.stop()
        assert sum(sizes) == 12 and max(sizes) == 5 and len(sizes) == 3      # shared forwards of up to 5
        return results

    batched = torch.stack(asyncio.run(scenario()))
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=1e-4)         # each caller got its own row


def test_concurrent_requests_are_batched_and_answered_in_order() -> None:
    async def scenario() -> None:
        encoder = GatedEncoder()
        batcher = batcher_for(encoder)
        batcher.start()
        try:
            images = [torch.full((3, 2, 2), float(i)) for i in range(20)]
            results = await asyncio.gather(*(batcher.encode(image) for image in images))
        finally:
            await batcher.stop()
        assert [float(r[0]) for r in results] == [12.0 * i for i in range(20)]
        assert sum(encoder.batch_sizes) == 20 and max(encoder.batch_sizes) == 8 and len(encoder.batch_sizes) <= 4

    asyncio.run(scenario())


def test_a_failing_forward_fails_its_batch_not_the_worker(encoder) -> None:
    async def scenario() -> None:
        batcher = batcher_for(encoder.encode_images, max_wait_seconds=0)
        batcher.start()
        try:
            with pytest.raises(RuntimeError):                     # the real model refuses a 1-channel image
                await batcher.encode(torch.zeros(1, 64, 64))
            assert (await batcher.encode(torch.zeros(3, 64, 64))).shape == (64,)
            assert batcher.running and batcher.failure is None
        finally:
            await batcher.stop()

    asyncio.run(scenario())


def test_announced_images_share_a_forward_and_a_lone_image_does_not_wait() -> None:
    async def scenario() -> None:
        encoder = GatedEncoder()
        batcher = batcher_for(encoder, max_wait_seconds=30)
        batcher.start()
        try:
            await asyncio.wait_for(batcher.encode(torch.ones(3, 2, 2)), timeout=10)   # nothing announced: no wait

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


def test_stop_resolves_the_in_flight_batch_and_the_queue_without_blocking_the_loop() -> None:
    async def scenario() -> None:
        encoder = GatedEncoder()
        encoder.gate.clear()                                  # the first forward hangs until released
        batcher = batcher_for(encoder, max_batch_size=1, max_wait_seconds=0, timeout_seconds=2)
        batcher.start()
        in_flight = asyncio.ensure_future(batcher.encode(torch.zeros(3, 2, 2)))
        await asyncio.to_thread(encoder.entered.wait, 10)
        queued = [asyncio.ensure_future(batcher.encode(torch.ones(3, 2, 2))) for _ in range(3)]
        await asyncio.sleep(0)
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0.01)

        ticking = asyncio.ensure_future(ticker())
        started = time.monotonic()
        await asyncio.wait_for(batcher.stop(), timeout=10)    # waits for the stuck thread at most timeout_seconds
        waited = time.monotonic() - started
        ticking.cancel()
        encoder.gate.set()
        outcomes = await asyncio.wait_for(asyncio.gather(in_flight, *queued, return_exceptions=True), timeout=5)
        assert all(isinstance(o, NotReady) and "shutting down" in str(o) for o in outcomes), outcomes
        assert ticks >= waited / 0.01 / 4                     # the loop kept running while stop waited
        with pytest.raises(NotReady):
            await batcher.encode(torch.ones(3, 2, 2))

    asyncio.run(scenario())


def test_a_forward_that_never_answers_times_out() -> None:
    async def scenario() -> None:
        encoder = GatedEncoder()
        encoder.gate.clear()
        batcher = batcher_for(encoder, timeout_seconds=0.2)
        batcher.start()
        try:
            with pytest.raises(EncoderTimeout, match="MEDZERO_ENCODE_TIMEOUT_SECONDS"):
                await batcher.encode(torch.zeros(3, 2, 2))
        finally:
            encoder.gate.set()
            await batcher.stop()

    asyncio.run(scenario())


class Fatal(BaseException):
    """Something no forward handler catches: the batching task itself dies."""


def test_a_dead_batching_task_fails_its_callers_and_says_why() -> None:
    async def scenario() -> None:
        def fatal(pixels: torch.Tensor) -> torch.Tensor:
            raise Fatal("boom")

        batcher = batcher_for(fatal)
        batcher.start()
        try:
            with pytest.raises((NotReady, Fatal)):
                await asyncio.wait_for(batcher.encode(torch.zeros(3, 2, 2)), timeout=5)
            await asyncio.sleep(0.05)
            assert not batcher.running and "died: Fatal" in batcher.failure
            with pytest.raises(NotReady, match="died"):
                await batcher.encode(torch.zeros(3, 2, 2))
        finally:
            await batcher.stop()

    asyncio.run(scenario())


def test_other_model_work_runs_on_the_encoder_thread_between_forwards(encoder) -> None:
    async def scenario() -> None:
        spans: list[tuple[str, float, float]] = []

        def timed(kind: str, fn):
            def run(*args):
                started = time.perf_counter()
                try:
                    return fn(*args)
                finally:
                    spans.append((kind, started, time.perf_counter()))
            return run

        batcher = batcher_for(timed("image", encoder.encode_images), max_batch_size=2)
        batcher.start()
        try:
            thread_name = await asyncio.to_thread(batcher.run_sync, lambda: threading.current_thread().name)
            assert thread_name.startswith("medzero-encoder")
            texts = asyncio.gather(*(asyncio.to_thread(batcher.run_sync, timed("text", encoder.encode_texts),
                                                       ["a chest X-ray showing pneumonia."] * 64) for _ in range(4)))
            images = asyncio.gather(*(batcher.encode(torch.randn(3, 64, 64)) for _ in range(16)))
            text_features, _ = await asyncio.gather(texts, images)
        finally:
            await batcher.stop()
        assert all(t.shape == (64, 64) for t in text_features)
        ordered = sorted(spans, key=lambda span: span[1])
        assert {kind for kind, *_ in spans} == {"image", "text"}
        assert all(earlier[2] <= later[1] for earlier, later in itertools.pairwise(ordered))   # never overlapping

    asyncio.run(scenario())


def test_tower_variants_and_plain_images_never_share_a_forward(encoder) -> None:
    """Images for an adapter's prompt tokens, for another's tuned weights and plain ones arrive interleaved while a
    forward runs: each next forward holds one kind only, every caller gets the embedding of its own kind, and none
    is lost."""
    from app.encoders.tower_variants import PromptTokens, TunedWeights
    from app.encoders.visual_prompts import init_prompt_tokens

    visual = encoder.model.visual
    prompts_a = PromptTokens(init_prompt_tokens(visual, 3, generator=torch.Generator().manual_seed(1)))
    [(name, last)] = [(n, p) for n, p in visual.named_parameters() if n.endswith("mlp.c_proj.weight")][-1:]
    tuned_b = TunedWeights({name: last.detach() + 0.5 * torch.randn(last.shape, generator=torch.Generator()
                                                                     .manual_seed(2))})
    pixels = torch.randn(9, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    kinds = [None, prompts_a, None, tuned_b, prompts_a, None, tuned_b, prompts_a, None]
    forwards: list[list[int]] = []
    gate = GatedEncoder()

    def recording(batch: torch.Tensor, variant=None) -> torch.Tensor:
        gate(batch[:1])                                     # the first forward is held until all have queued
        forwards.append([id(variant)] * len(batch))
        return encoder.encode_images(batch, variant)

    async def scenario() -> list[torch.Tensor]:
        batcher = batcher_for(recording, max_batch_size=8, max_wait_seconds=0)
        batcher.start()
        gate.gate.clear()
        try:
            first = asyncio.ensure_future(batcher.encode(pixels[0], variant=kinds[0]))
            await asyncio.to_thread(gate.entered.wait, 10)
            rest = [asyncio.ensure_future(batcher.encode(p, variant=k)) for p, k in zip(pixels[1:], kinds[1:])]
            await asyncio.sleep(0.05)
            gate.gate.set()
            return await asyncio.gather(first, *rest)
        finally:
            await batcher.stop()

    results = asyncio.run(scenario())
    assert all(len(set(ids)) == 1 for ids in forwards)     # one kind per forward
    assert sorted(len(ids) for ids in forwards) == [1, 2, 3, 3]   # plain 1 (held) + 3, prompts_a 3, tuned_b 2
    for p, k, got in zip(pixels, kinds, results):
        assert torch.allclose(got, encoder.encode_images(p.unsqueeze(0), k)[0], atol=1e-5)
    plain = encoder.encode_images(pixels[:1])
    assert not torch.allclose(plain, encoder.encode_images(pixels[:1], tuned_b), atol=1e-3)
    assert torch.equal(encoder.encode_images(pixels[:1]), plain)      # the tuned forward left the model alone
    prompted = encoder.encode_images(pixels[:1], prompts_a)
    assert not torch.allclose(plain, prompted, atol=1e-3)
