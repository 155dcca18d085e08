"""Alembic's environment: medzero's tables on the connection app.storage.migrations hands over (SQLite or
PostgreSQL, already inside its transaction and its lock), or on MEDZERO_DATABASE_URL's database when run as
`alembic -c app/storage/alembic.ini ...` by a developer writing a new revision."""
from alembic import context
from sqlalchemy import create_engine

from app.settings import Settings
from app.storage.db import Base

config = context.config
connection = config.attributes.get("connection")
if connection is not None:
    context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True,
                      compare_type=True)
    with context.begin_transaction():
        context.run_migrations()
else:
    with create_engine(Settings().resolved_database_url).connect() as own_connection:
        context.configure(connection=own_connection, target_metadata=Base.metadata, render_as_batch=True,
                          compare_type=True)
        with context.begin_transaction():
            context.run_migrations()
