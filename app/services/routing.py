"""The routing table in force: stored in the database (so it survives restarts and replicas share it), changed
through /routes or by editing MEDZERO_DICOM_ROUTES_FILE.

At start-up the file is imported when its content differs from what was last imported from it; otherwise the
stored table stands, including changes made through /routes since. So an edited file wins at the next restart, and
an API change is never undone by a restart with the same file.
"""
import hashlib
import logging
from pathlib import Path

from app.dicom.routing import RoutingTable, load_routes
from app.errors import InvalidInput
from app.storage.routes import RouteRepository, StoredRoutes

log = logging.getLogger(__name__)


class RoutingService:
    def __init__(self, repository: RouteRepository, routes_file: Path | None) -> None:
        self._repository = repository
        self._routes_file = routes_file
        self._table = RoutingTable()
        self._stored: StoredRoutes | None = None

    @property
    def table(self) -> RoutingTable:
        return self._table

    @property
    def routes_file(self) -> Path | None:
        return self._routes_file

    @property
    def stored(self) -> StoredRoutes | None:
        return self._stored

    def load(self) -> None:
        """The stored table, after importing the routes file if it changed; InvalidInput names a bad file."""
        stored = self._repository.get()
        if self._routes_file is not None:
            try:
                content = self._routes_file.read_bytes()
            except OSError as exc:
                raise InvalidInput(f"cannot read routing rules {self._routes_file}: {exc.strerror}") from exc
            digest = hashlib.sha256(content).hexdigest()
            if stored is None or stored.file_sha256 != digest:
                table = load_routes(self._routes_file)
                stored = self._repository.put(_rules(table), source="file", file_sha256=digest)
                log.info("routing: imported %d rules from %s (version %d)", len(table.rules), self._routes_file,
                         stored.version)
        self._install(stored)

    def refresh(self) -> None:
        """Pick up a table another process stored."""
        stored = self._repository.get()
        if stored is not None and (self._stored is None or stored.version != self._stored.version):
            self._install(stored)

    def current(self) -> RoutingTable:
        """The table in force now, another replica's change included (one primary-key read): what each received
        instance is routed by, so an instance never follows rules replaced before it arrived."""
        self.refresh()
        return self._table

    def replace(self, table: RoutingTable, expected_version: int | None = None) -> StoredRoutes:
        stored = self._repository.put(_rules(table), source="api", expected_version=expected_version)
        self._install(stored)
        log.info("routing: %d rules set through /routes (version %d)", len(table.rules), stored.version)
        return stored

    def _install(self, stored: StoredRoutes | None) -> None:
        self._stored = stored
        self._table = RoutingTable.model_validate({"rules": stored.rules}) if stored else RoutingTable()


def _rules(table: RoutingTable) -> list[dict]:
    return table.model_dump(mode="json", exclude_none=True)["rules"]
