"""Image files as the services receive them: a name and a bounded read, whether they came over HTTP or from a
folder on disk, so both paths share one size limit and one error per refused file."""
import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from app.errors import PayloadTooLarge

READ_CHUNK_BYTES = 1 << 20


@dataclass(frozen=True)
class UploadedFile:
    name: str
    read: Callable[[], Awaitable[bytes]]     # raises PayloadTooLarge past the upload limit


class AsyncReadable(Protocol):               # starlette's UploadFile
    async def read(self, size: int = -1) -> bytes: ...


def too_large(name: str, max_bytes: int) -> PayloadTooLarge:
    return PayloadTooLarge(f"file {name!r} is larger than MEDZERO_MAX_UPLOAD_BYTES={max_bytes} bytes")


async def read_bounded(stream: AsyncReadable, name: str, max_bytes: int) -> bytes:
    """Read in chunks, refusing as soon as the stream passes `max_bytes` (never reads it all first)."""
    chunks, size = [], 0
    while chunk := await stream.read(READ_CHUNK_BYTES):
        size += len(chunk)
        if size > max_bytes:
            raise too_large(name, max_bytes)
        chunks.append(chunk)
    return b"".join(chunks)


def uploaded(stream: AsyncReadable, name: str | None, max_bytes: int) -> UploadedFile:
    shown = name or "(unnamed)"
    return UploadedFile(shown, lambda: read_bounded(stream, shown, max_bytes))


def on_disk(path: Path, name: str, max_bytes: int) -> UploadedFile:
    def read() -> bytes:
        if path.stat().st_size > max_bytes:
            raise too_large(name, max_bytes)
        return path.read_bytes()
    return UploadedFile(name, lambda: asyncio.to_thread(read))
