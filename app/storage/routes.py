"""The stored routing table: one row, replaced as a whole, with a version so two admins cannot overwrite each
other's change unknowingly (a PUT may name the version it read)."""
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError

from app.errors import RoutesChanged
from app.storage.db import RoutingRow, as_utc, session_factories, utcnow, write_transaction

TABLE_ID = 1


@dataclass(frozen=True)
class StoredRoutes:
    version: int
    rules: list[dict]
    source: str                      # file | api
    file_sha256: str | None
    updated_at: datetime


class RouteRepository:
    def __init__(self, engine: Engine) -> None:
        self._readers, self._writers = session_factories(engine)

    def get(self) -> StoredRoutes | None:
        with self._readers() as session:
            row = session.get(RoutingRow, TABLE_ID)
            return _stored(row) if row else None

    def put(self, rules: list[dict], *, source: str, file_sha256: str | None = None,
            expected_version: int | None = None) -> StoredRoutes:
        """Replace the table (version + 1); Conflict when `expected_version` is given and is not the current."""
        try:
            return self._put(rules, source=source, file_sha256=file_sha256, expected_version=expected_version)
        except IntegrityError:   # the first table ever, stored by a replica starting alongside: now there is a row
            return self._put(rules, source=source, file_sha256=file_sha256, expected_version=expected_version)

    def _put(self, rules: list[dict], *, source: str, file_sha256: str | None,
             expected_version: int | None) -> StoredRoutes:
        with write_transaction(self._writers) as session:
            row = session.scalar(select(RoutingRow).where(RoutingRow.id == TABLE_ID).with_for_update())
            current = row.version if row else 0
            if expected_version is not None and expected_version != current:
                raise RoutesChanged(f"the routing table is at version {current}, not {expected_version}; read it again")
            if row is None:
                row = RoutingRow(id=TABLE_ID)
                session.add(row)
            row.version, row.rules, row.source, row.updated_at = current + 1, rules, source, utcnow()
            # an API change keeps the file's hash: the file is imported again only when its content changes
            row.file_sha256 = file_sha256 if source == "file" else row.file_sha256
            session.flush()
            return _stored(row)


def _stored(row: RoutingRow) -> StoredRoutes:
    return StoredRoutes(row.version, list(row.rules), row.source, row.file_sha256, as_utc(row.updated_at))
