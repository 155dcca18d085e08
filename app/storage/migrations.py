"""The database schema is Alembic's (app/storage/alembic): every process upgrades its database to the newest
revision as it opens it, SQLite and PostgreSQL alike, so the same revisions make the same schema on both.

Replicas starting together upgrade one at a time: the upgrade runs in one transaction that first takes the
writer lock (SQLite's BEGIN IMMEDIATE; on PostgreSQL an advisory lock), and the second finds nothing left to do.
A failed upgrade rolls back whole (both databases have transactional DDL).
"""
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import text
from sqlalchemy.engine import Connection, Engine

from app.storage.db import WRITE_OPTION

SCRIPT_LOCATION = Path(__file__).resolve().parent / "alembic"
UPGRADE_LOCK_ID = 0x6D65647A65726F   # "medzero": the advisory lock id replicas queue on to upgrade


def alembic_config(connection: Connection | None = None) -> Config:
    config = Config()
    config.set_main_option("script_location", str(SCRIPT_LOCATION))
    config.attributes["connection"] = connection
    return config


def head_revision() -> str:
    return ScriptDirectory.from_config(alembic_config()).get_current_head()


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Bring the database to `revision`, the newest by default (nothing to do when it is there already)."""
    target = head_revision() if revision == "head" else revision
    if current_revision(engine) == target:    # a read: opening an up-to-date database waits for no writer
        return
    with engine.execution_options(**{WRITE_OPTION: True}).connect() as connection, connection.begin():
        if connection.dialect.name == "postgresql":
            connection.execute(text("SELECT pg_advisory_xact_lock(:lock)"), {"lock": UPGRADE_LOCK_ID})
        if MigrationContext.configure(connection).get_current_revision() != target:   # not done meanwhile
            command.upgrade(alembic_config(connection), target)
