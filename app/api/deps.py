"""Annotated dependencies shared by the routers."""
import secrets
from typing import Annotated

from fastapi import Depends, Header, Request

from app.errors import Unauthorized
from app.runtime import Runtime
from app.settings import Settings


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
