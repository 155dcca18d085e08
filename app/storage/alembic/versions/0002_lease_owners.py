"""Lease owners: which replica's worker holds a queued instance or a delivery, so that a replica starting up
takes back only its own earlier process's leases, never those of another replica sharing the database.

Revision ID: 0002
Revises: 0001
"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    for table in ("dicom_inbox", "result_deliveries"):
        with op.batch_alter_table(table) as batch_op:
            batch_op.add_column(sa.Column("lease_owner", sa.String(length=128), nullable=True))


def downgrade() -> None:
    for table in ("result_deliveries", "dicom_inbox"):
        with op.batch_alter_table(table) as batch_op:
            batch_op.drop_column("lease_owner")
