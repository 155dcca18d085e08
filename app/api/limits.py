"""Per-key request rates and per-request time limits.

RateLimiter is a token bucket per API key id: `per_minute` tokens a minute, at most `burst` saved up. It lives in
one process, so with several replicas each allows the rate (put the limit at what one replica should take). Idle
buckets (full again) are forgotten once many keys have been seen, so memory stays bounded.

RequestTimeLimit ends a request that runs past its route's limit: while its body is still arriving (a slow or
stalled client) with 408, once the body is in and the answer is not ready with 503 + Retry-After. Work already
handed to a thread (a label-set write, a fit) finishes there and commits as a whole or not at all; the client
is told it timed out and can read back what happened.

DrainUnreadBody reads (and discards) what is left of a request body before an answer given early goes out (a 413
from Content-Length, a 503 from admission, a 4xx before the upload was read): an HTTP/1.1 server that closes a
connection with request bytes still unread makes the kernel reset it, and the client, still sending, loses the
answer it was given (nginx's lingering close, here). Only for a body whose Content-Length is at most `max_bytes`,
and for at most `max_seconds`; otherwise the answer goes out at once.
"""
import asyncio
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.errors import MedzeroError, ProcessingTimeout, RateLimited, RequestTimeout

MAX_TRACKED_KEYS = 10_000


@dataclass
class _Bucket:
    tokens: float
    updated: float


class RateLimiter:
    def __init__(self, per_minute: int, burst: int, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.per_minute = per_minute
        self.burst = burst
        self._rate = per_minute / 60.0
        self._clock = clock
        self._buckets: dict[str, _Bucket] = {}
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self.per_minute > 0

    def take(self, key_id: str) -> None:
        """Spend one request of `key_id`'s allowance, or raise RateLimited saying when the next one is allowed."""
        if not self.enabled:
            return
        now = self._clock()
        with self._lock:
            bucket = self._buckets.get(key_id)
            if bucket is None:
                self._forget_idle(now)
                bucket = self._buckets[key_id] = _Bucket(float(self.burst), now)
            bucket.tokens = min(self.burst, bucket.tokens + (now - bucket.updated) * self._rate)
            bucket.updated = now
            if bucket.tokens >= 1:
                bucket.tokens -= 1
                return
            wait = (1 - bucket.tokens) / self._rate
        raise RateLimited(f"API key {key_id} is over its {self.per_minute} requests a minute "
                          f"(MEDZERO_RATE_LIMIT_PER_MINUTE); retry in {wait:.1f} s", math.ceil(wait))

    def _forget_idle(self, now: float) -> None:
        if len(self._buckets) < MAX_TRACKED_KEYS:
            return
        refill_seconds = self.burst / self._rate
        for key_id in [k for k, b in self._buckets.items() if now - b.updated >= refill_seconds]:
            del self._buckets[key_id]


class RequestTimeLimit:
    """Ends a request past `limit_for_path(path)` seconds with 408 (body still arriving) or 503 (answer not ready);
    an answer already started is left to finish (its status is sent)."""

    def __init__(self, app: ASGIApp, limit_for_path: Callable[[str], float],
                 respond: Callable[[Scope, MedzeroError], Callable]) -> None:
        self.app = app
        self.limit_for_path = limit_for_path
        self.respond = respond

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.limit_for_path(scope["path"])
        headers = dict(scope["headers"])
        body_complete = headers.get(b"content-length", b"0") == b"0" and b"transfer-encoding" not in headers
        started = False

        async def watched_receive() -> Message:
            nonlocal body_complete
            message = await receive()
            if message["type"] != "http.request" or not message.get("more_body", False):
                body_complete = True
            return message

        async def watched_send(message: Message) -> None:
            nonlocal started
            started = True
            await send(message)

        try:
            async with asyncio.timeout(limit):
                await self.app(scope, watched_receive, watched_send)
        except TimeoutError:
            if started:          # the client has the status already; it sees the body end early
                return
            if body_complete:
                error: MedzeroError = ProcessingTimeout(
                    f"the answer was not ready within {limit:g} s (MEDZERO_REQUEST_TIMEOUT_SECONDS); a write may "
                    "still have completed: read it back before retrying")
            else:
                error = RequestTimeout(f"the request body did not arrive within {limit:g} s "
                                       "(MEDZERO_REQUEST_TIMEOUT_SECONDS)")
            response = self.respond(scope, error)
            await response(scope, no_receive, send)


async def no_receive() -> Message:
    return {"type": "http.disconnect"}


def content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


class DrainUnreadBody:
    def __init__(self, app: ASGIApp, *, max_bytes: int = 64 * 2**20, max_seconds: float = 5.0) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.max_seconds = max_seconds

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = content_length(scope)
        # only a body of declared, bounded length is drained: a chunked one could go on for ever, and a declared
        # giant is not worth reading; those get their answer at once, as before
        finished = declared is None or declared > self.max_bytes

        async def tracking_receive() -> Message:
            nonlocal finished
            message = await receive()
            if message["type"] == "http.disconnect" or not message.get("more_body", False):
                finished = True
            return message

        async def draining_send(message: Message) -> None:
            nonlocal finished
            if message["type"] == "http.response.start" and not finished:
                finished = await self._drain(tracking_receive)
            await send(message)

        await self.app(scope, tracking_receive, draining_send)

    async def _drain(self, receive: Receive) -> bool:
        discarded = 0

        async def rest() -> None:
            nonlocal discarded
            while discarded <= self.max_bytes:
                message = await receive()
                if message["type"] == "http.disconnect" or not message.get("more_body", False):
                    return
                discarded += len(message.get("body", b""))

        try:
            await asyncio.wait_for(rest(), self.max_seconds)
        except TimeoutError:
            return False
        return discarded <= self.max_bytes
