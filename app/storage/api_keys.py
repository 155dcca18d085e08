"""API keys: `mzk_<id>_<secret>`, where the id is public (it names the key in lists, logs and audit records) and only
the sha256 of the secret is stored. A secret is 32 random bytes, so a plain hash is as strong as a slow one here
(there is no dictionary to try); comparisons are in constant time. The secret is shown once, at creation."""
import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from datetime import datetime
from typing import Literal

from sqlalchemy import select
from sqlalchemy.engine import Engine

from app.errors import ApiKeyNotFound, InvalidInput
from app.storage.db import ApiKeyRow, as_utc, session_factories, utcnow, write_transaction

Scope = Literal["classify", "admin"]
SCOPES: tuple[Scope, ...] = ("classify", "admin")
_TOKEN = re.compile(r"mzk_([0-9a-f]{12})_([A-Za-z0-9_-]{20,128})")


@dataclass(frozen=True)
class ApiKey:
    id: str
    name: str
    scopes: tuple[str, ...]
    created_at: datetime | None               # None: the key from MEDZERO_ADMIN_API_KEY
    revoked_at: datetime | None = None

    def allows(self, scope: Scope) -> bool:
        """admin includes classify."""
        return scope in self.scopes or "admin" in self.scopes


def secret_digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


class ApiKeyRepository:
    def __init__(self, engine: Engine) -> None:
        self._readers, self._writers = session_factories(engine)

    def create(self, name: str, scope: Scope) -> tuple[ApiKey, str]:
        """A new key -> (its record, the token to hand out; not stored anywhere)."""
        if scope not in SCOPES:
            raise InvalidInput(f"scope {scope!r}; one of {', '.join(SCOPES)}")
        if not name.strip() or len(name) > 128 or not name.isprintable():
            raise InvalidInput("a key needs a name of 1 to 128 printable characters (who or what uses it)")
        key_id, secret = secrets.token_hex(6), secrets.token_urlsafe(32)
        with write_transaction(self._writers) as session:
            row = ApiKeyRow(id=key_id, name=name.strip(), scopes=[scope], secret_sha256=secret_digest(secret),
                            created_at=utcnow())
            session.add(row)
        return _record(row), f"mzk_{key_id}_{secret}"

    def list(self) -> list[ApiKey]:
        with self._readers() as session:
            return [_record(row) for row in session.scalars(select(ApiKeyRow).order_by(ApiKeyRow.created_at))]

    def revoke(self, key_id: str) -> ApiKey:
        with write_transaction(self._writers) as session:
            row = session.get(ApiKeyRow, key_id)
            if row is None:
                raise ApiKeyNotFound(f"no API key {key_id!r}; `medzero keys list` shows them")
            if row.revoked_at is None:
                row.revoked_at = utcnow()
            return _record(row)

    def authenticate(self, token: str) -> ApiKey | None:
        """The live key this token is, or None (malformed, unknown, wrong secret or revoked)."""
        match = _TOKEN.fullmatch(token)
        if match is None:
            return None
        key_id, secret = match.groups()
        with self._readers() as session:
            row = session.get(ApiKeyRow, key_id)
            if row is None or row.revoked_at is not None:
                return None
            if not hmac.compare_digest(row.secret_sha256, secret_digest(secret)):
                return None
            return _record(row)


def _record(row: ApiKeyRow) -> ApiKey:
    return ApiKey(row.id, row.name, tuple(row.scopes), as_utc(row.created_at),
                  as_utc(row.revoked_at) if row.revoked_at else None)
