"""Request IDs, structured logs and the audit trail.

Every HTTP request gets an id: the caller's `X-Request-ID` when it is a plain token (letters, digits, `.`, `_`,
`-`, at most 64), else a fresh one. It is sent back in the response's `X-Request-ID` and carried by a context
variable into every log record written while the request is handled (`request_id`, on the encoder's and the
decode pool's threads too where the work is started from the request). `medzero serve` writes one JSON object per
line (MEDZERO_LOG_FORMAT=json, the default) or readable text. Admin actions are logged on `medzero.audit`: who
(the key's id and name, never the key), what (method and path), the outcome (status) and when.
Patient identifiers never reach a log: nothing here logs headers, bodies or DICOM attributes.
"""
import contextvars
import json
import logging
import re
import uuid
from datetime import UTC, datetime

from starlette.types import ASGIApp, Message, Receive, Scope, Send

REQUEST_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar("medzero_request_id", default=None)
AUDIT = logging.getLogger("medzero.audit")
AUDIT_STATE = "medzero.audit"          # scope state key: the admin key a request was authorised with
_PLAIN_TOKEN = re.compile(r"[A-Za-z0-9._-]{1,64}")
_RECORD_FIELDS = set(vars(logging.LogRecord("", 0, "", 0, "", None, None)))


class RequestIdFilter(logging.Filter):
    """Puts the current request's id (or None) on every record, for either format."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = REQUEST_ID.get()
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message, request_id, and any `extra=` fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {"time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
                 "level": record.levelname.lower(), "logger": record.name, "message": record.getMessage(),
                 "request_id": getattr(record, "request_id", None)}
        entry.update({key: value for key, value in vars(record).items()
                      if key not in _RECORD_FIELDS and key not in entry and not key.startswith("_")
                      and key not in ("request_id", "color_message")})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s]: %(message)s"


def logging_config(level: str, log_format: str) -> dict:
    """A dictConfig for the server: medzero's and uvicorn's loggers through one handler on stderr."""
    formatter = {"()": JsonFormatter} if log_format == "json" else {"format": TEXT_FORMAT}
    return {
        "version": 1, "disable_existing_loggers": False,
        "filters": {"request_id": {"()": RequestIdFilter}},
        "formatters": {"medzero": formatter},
        "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": "medzero", "filters": ["request_id"],
                                "stream": "ext://sys.stderr"}},
        "root": {"handlers": ["stderr"], "level": level.upper()},
        "loggers": {name: {"handlers": [], "propagate": True, "level": level.upper()}
                    for name in ("uvicorn", "uvicorn.error", "uvicorn.access")},
    }


def request_id_for(scope: Scope) -> str:
    given = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")
    return given if _PLAIN_TOKEN.fullmatch(given) else uuid.uuid4().hex


class RequestContext:
    """Outermost middleware: the request id (context variable + response header) and, for requests an admin key
    authorised, one audit record when the response starts."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        request_id = request_id_for(scope)
        token = REQUEST_ID.set(request_id)

        async def tagged_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id.encode())]
                audited = scope.get("state", {}).get(AUDIT_STATE)
                if audited is not None:
                    AUDIT.info("%s %s by key %s (%s): %d", scope["method"], scope["path"], audited.id,
                               audited.name, message["status"],
                               extra={"audit": {"key_id": audited.id, "key_name": audited.name,
                                                "method": scope["method"], "path": scope["path"],
                                                "status": message["status"]}})
            await send(message)

        try:
            await self.app(scope, receive, tagged_send)
        finally:
            REQUEST_ID.reset(token)
