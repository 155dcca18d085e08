"""Annotated dependencies shared by the routers, and access control.

Every route but health, readiness and /metrics needs an API key when MEDZERO_AUTH is "keys" (the default outside
--demo): `Authorization: Bearer mzk_…` or `X-API-Key: mzk_…`. A key has scope classify (classify, read results
and state) or admin (everything, including label sets, adapters, fits, routes and retries). Missing, malformed,
unknown or revoked -> 401; a classify key on an admin route -> 403; a key past its rate -> 429 (app.api.limits). MEDZERO_ADMIN_API_KEY is one more admin key,
from the environment; with MEDZERO_AUTH=off it still guards the admin routes when set.
"""
import secrets
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from starlette.concurrency import run_in_threadpool

from app.api.schemas import ErrorBody
from app.errors import Forbidden, Unauthorized
from app.logs import AUDIT_STATE
from app.runtime import Runtime
from app.settings import Settings
from app.storage.api_keys import ApiKey, Scope

ENVIRONMENT_KEY = ApiKey("environment", "MEDZERO_ADMIN_API_KEY", ("admin",), created_at=None)
ANONYMOUS = ApiKey("-", "no key (MEDZERO_AUTH=off)", ("admin",), created_at=None)
_HOW = "send an API key as `Authorization: Bearer <key>` or `X-API-Key: <key>` (`medzero keys create`)"

bearer_scheme = HTTPBearer(auto_error=False, scheme_name="bearer", description="An API key: `mzk_…`.")
header_scheme = APIKeyHeader(name="X-API-Key", auto_error=False, scheme_name="apiKey",
                             description="The same API key in a header.")


def get_runtime(request: Request) -> Runtime:
    return request.app.state.runtime


def get_settings(request: Request) -> Settings:
    return request.app.state.runtime.settings


def requires(scope: Scope):
    async def authorize(request: Request,
                        bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer_scheme)],
                        header: Annotated[str | None, Depends(header_scheme)]) -> ApiKey | None:
        """The key the request is made with (None with MEDZERO_AUTH=off), also on request.state.api_key."""
        runtime: Runtime = request.app.state.runtime
        token = header or (bearer.credentials if bearer is not None else None)
        key = await _key_for(runtime, token, scope)
        if key is not None and not getattr(request.state, "rate_counted", False):   # admin routes check twice
            request.state.rate_counted = True
            request.app.state.rate_limiter.take(key.id)
        request.state.api_key = key
        if scope == "admin":                  # RequestContext writes the audit record when the answer starts
            setattr(request.state, AUDIT_STATE, key or ANONYMOUS)
        return key

    return authorize


async def _key_for(runtime: Runtime, token: str | None, scope: Scope) -> ApiKey | None:
    settings = runtime.settings
    environment_key = settings.admin_api_key
    if token and environment_key and secrets.compare_digest(token.encode(), environment_key.encode()):
        return ENVIRONMENT_KEY
    if settings.auth_mode == "off":
        if scope == "admin" and environment_key:
            raise Unauthorized(f"this route needs the admin key (MEDZERO_ADMIN_API_KEY); {_HOW}")
        return None
    if not token:
        raise Unauthorized(f"this route needs an API key; {_HOW}")
    key = await run_in_threadpool(runtime.api_keys.authenticate, token)
    if key is None:
        raise Unauthorized("the API key is unknown, malformed or revoked")
    if not key.allows(scope):
        raise Forbidden(f"API key {key.id} ({key.name}) has scope {', '.join(key.scopes)}; this route needs {scope}")
    return key


# Declared in the OpenAPI schema so clients (and the schemathesis fuzz, tests/api/test_openapi_fuzz.py) know them:
# what every route behind the key check may answer whatever it does, and what a route with a body may answer before
# it runs (a body FastAPI cannot parse: invalid UTF-8 JSON, broken multipart; one too large or too slow).
ACCESS_ERRORS = {401: {"model": ErrorBody, "description": "No API key, or one unknown, malformed or revoked."},
                 403: {"model": ErrorBody, "description": "The API key lacks the scope this route needs."},
                 429: {"model": ErrorBody, "description": "The API key is over MEDZERO_RATE_LIMIT_PER_MINUTE "
                                                          "(Retry-After)."},
                 503: {"model": ErrorBody, "description": "Not ready (the model is loading), overloaded, the store "
                                                          "busy, or no answer within MEDZERO_REQUEST_TIMEOUT_SECONDS "
                                                          "(Retry-After)."}}
BODY_ERRORS = {400: {"model": ErrorBody, "description": "The body cannot be parsed (not UTF-8 JSON, or broken "
                                                        "multipart)."},
               408: {"model": ErrorBody, "description": "The body did not arrive within "
                                                        "MEDZERO_REQUEST_TIMEOUT_SECONDS."},
               413: {"model": ErrorBody, "description": "The body is over its limit (1 MiB for JSON; "
                                                        "MEDZERO_MAX_UPLOAD_BYTES, MEDZERO_MAX_BATCH_REQUEST_BYTES)."}}

RuntimeDep = Annotated[Runtime, Depends(get_runtime)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
ClassifyDep = Depends(requires("classify"))
AdminDep = Depends(requires("admin"))
