"""Alembic owns the schema: the revisions build exactly the tables the code declares, on SQLite and PostgreSQL;
an older database is carried forward with its rows; replicas starting together upgrade once."""
from concurrent.futures import ThreadPoolExecutor

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import create_engine, inspect, select, text

from app.storage.db import Base, InboxRow, create_db_engine
from app.storage.inbox import InboxRepository, Received
from app.storage.migrations import current_revision, head_revision, upgrade


def schema_differences(url: str) -> list:
    with create_engine(url).connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        return compare_metadata(context, Base.metadata)


def test_the_revisions_make_the_declared_schema(database_url: str) -> None:
    engine = create_db_engine(database_url)
    assert current_revision(engine) == head_revision()
    # a model change without its revision shows up here (write one: alembic -c app/storage/alembic.ini
    # revision --autogenerate)
    assert schema_differences(database_url) == []


def test_an_older_database_keeps_its_rows_through_the_upgrade(database_url: str) -> None:
    engine = create_engine(database_url)
    upgrade(engine, "0001")                               # the schema before lease owners
    with engine.begin() as connection:
        columns = {c["name"] for c in inspect(connection).get_columns("dicom_inbox")}
        assert "lease_owner" not in columns
        connection.execute(text(
            "INSERT INTO dicom_inbox (sop_instance_uid, study_instance_uid, series_instance_uid, sop_class_uid, "
            "source, dicom, state, attempts, created_at, updated_at) VALUES ('1.2.3.1', '1.2.3', '1.2.3.0', "
            "'1.2.840.10008.5.1.4.1.1.1', 'stow-rs', :dicom, 'processing', 1, CURRENT_TIMESTAMP, "
            "CURRENT_TIMESTAMP)"), {"dicom": b"DICM"})
    engine.dispose()

    upgraded = create_db_engine(database_url)             # what a newer server does as it starts
    assert current_revision(upgraded) == head_revision()
    with upgraded.connect() as connection:
        row = connection.execute(select(InboxRow.sop_instance_uid, InboxRow.lease_owner)).one()
    assert tuple(row) == ("1.2.3.1", None)
    # a lease from before owners were recorded is a dead single process's: start-up takes it back
    assert InboxRepository(upgraded, owner="replica-a").release_leases() == 1


def test_replicas_starting_together_upgrade_one_database_once(database_url: str) -> None:
    with ThreadPoolExecutor(4) as pool:
        engines = list(pool.map(lambda _: create_db_engine(database_url), range(4)))
    assert {current_revision(engine) for engine in engines} == {head_revision()}
    inbox = InboxRepository(engines[0])
    entry, created = inbox.put(Received(sop_instance_uid="1.2.3.9", study_instance_uid="1.2.3",
                                        series_instance_uid="1.2.3.0", sop_class_uid="1.2.840.10008.5.1.4.1.1.1",
                                        source="stow-rs", dicom=b"DICM", label_set="cxr", method="zeroshot"))
    assert created and InboxRepository(engines[3]).entry_for("1.2.3.9").id == entry.id
