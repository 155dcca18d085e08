"""Annotated dependencies shared by the routers."""
import secrets
from typing import Annotated

from fastapi import Depends, Header, Request, UploadFile

from app.errors import PayloadTooLarge, Unauthorized
from app.runtime import Runtime
from app.settings import Settings

READ_CHUNK_BYTES = 1 << 20


def get_runtime(request: Request) -> Runtime:
    return request.app.state.runtime


def get_settings(request: Request) -> Settings:
    return request.app.state.runtime.settings


def require_admin(request: Request, x_api_key: Annotated[str | None, Header()] = None) -> None:
    """Admin routes: open when MEDZERO_ADMIN_API_KEY is unset, else the X-API-Key header must match it."""
    expected = request.app.state.runtime.settings.admin_api_key
    if expected and not (x_api_key and secrets.compare_digest(x_api_key, expected)):
        raise Unauthorized("this route needs the X-API-Key header matching MEDZERO_ADMIN_API_KEY")


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
AdminDep = Depends(require_admin)


async def read_bounded(upload: UploadFile, max_bytes: int) -> bytes:
    """Read an upload in chunks, refusing as soon as it passes `max_bytes` (never reads it all first)."""
    chunks, size = [], 0
    while chunk := await upload.read(READ_CHUNK_BYTES):
        size += len(chunk)
        if size > max_bytes:
            raise PayloadTooLarge(f"file {upload.filename or '(unnamed)'!r} is larger than "
                                  f"MEDZERO_MAX_UPLOAD_BYTES={max_bytes} bytes")
        chunks.append(chunk)
    return b"".join(chunks)
