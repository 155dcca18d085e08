"""Admission before work: one permit per image in flight, as text-embeddings-inference's `try_acquire_permit`.

A request takes permits for all its images before any is read or decoded, and holds them until it is scored;
without enough free permits it is refused at once (Overloaded: 503 + Retry-After). So the decode pool's queue,
the encoder queue and the image bytes held in memory are all bounded by `MEDZERO_MAX_IN_FLIGHT_IMAGES`. Batch
bodies (/classify/batch, pool uploads) are bounded separately, before they are read: `MEDZERO_MAX_CONCURRENT_
BATCH_BODIES`. Offline pool fits wait for their permits (`acquire`) instead of failing. All of it runs on the
event loop, so plain counters suffice.
"""
import asyncio
from typing import Self

from app import metrics
from app.errors import Overloaded, PayloadTooLarge


class Permit:
    """Held permits; `release` (or leaving the `with` block) gives them back, once."""

    def __init__(self, admission: "Admission", count: int) -> None:
        self._admission = admission
        self.count = count

    def release(self) -> None:
        count, self.count = self.count, 0
        if count:
            self._admission._give_back(count)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.release()


class Admission:
    def __init__(self, max_images: int, max_batch_bodies: int) -> None:
        self.max_images = max_images
        self.max_batch_bodies = max_batch_bodies
        self._free_images = max_images
        self._batch_bodies = 0
        self._released = asyncio.Event()

    @property
    def images_in_flight(self) -> int:
        return self.max_images - self._free_images

    def try_acquire(self, n_images: int) -> Permit:
        """Permits for `n_images`, now, or Overloaded."""
        if n_images > self.max_images:
            raise PayloadTooLarge(f"{n_images} images in one request can never be admitted; "
                                  f"MEDZERO_MAX_IN_FLIGHT_IMAGES={self.max_images}")
        if n_images > self._free_images:
            raise Overloaded(f"{self.images_in_flight} images are in flight, {n_images} more would pass "
                             f"MEDZERO_MAX_IN_FLIGHT_IMAGES={self.max_images}; retry shortly")
        self._free_images -= n_images
        metrics.ADMITTED_IMAGES.set(self.images_in_flight)
        return Permit(self, n_images)

    async def acquire(self, n_images: int, timeout_seconds: float) -> Permit:
        """Permits for `n_images`, waiting up to `timeout_seconds` for others to finish; then Overloaded."""
        try:
            async with asyncio.timeout(timeout_seconds):
                while True:
                    try:
                        return self.try_acquire(n_images)
                    except Overloaded:
                        self._released.clear()
                        await self._released.wait()
        except TimeoutError:
            raise Overloaded(f"waited {timeout_seconds:g} s for {n_images} image permits "
                             f"(MEDZERO_MAX_IN_FLIGHT_IMAGES={self.max_images}); retry when the server is less busy"
                             ) from None

    def try_enter_batch_body(self) -> bool:
        if self._batch_bodies >= self.max_batch_bodies:
            return False
        self._batch_bodies += 1
        return True

    def leave_batch_body(self) -> None:
        self._batch_bodies -= 1

    def _give_back(self, n_images: int) -> None:
        self._free_images += n_images
        metrics.ADMITTED_IMAGES.set(self.images_in_flight)
        self._released.set()
