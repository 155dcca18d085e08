"""Baseline: the schema as it stood when migrations began.

Databases from before then were made by create_all as medzero grew, so each may lack tables added later: this
revision creates whichever are missing and keeps those that exist. The KPL fits of the oldest layout (the
`kpl_fits` table, before learned state had one table) move into method_states, then that table goes.

Revision ID: 0001
Revises:
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from app.storage.legacy import move_kpl_fits

revision: str = "0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    existing = set(sa.inspect(op.get_bind()).get_table_names())
    if "api_keys" not in existing:
        op.create_table(
            "api_keys",
            sa.Column("id", sa.String(length=16), nullable=False),
            sa.Column("name", sa.String(length=128), nullable=False),
            sa.Column("scopes", sa.JSON(), nullable=False),
            sa.Column("secret_sha256", sa.String(length=64), nullable=False),
            sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
            sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
            sa.PrimaryKeyConstraint("id"),
        )

    if "dicom_inbox" not in existing:
        op.create_table(
            "dicom_inbox",
            sa.Column("id", sa.Integer(), nullable=False),
            sa.Column("sop_instance_uid", sa.String(length=64), nullable=False),
            sa.Column("study_instance_uid", sa.String(length=64), nullable=False),
            sa.Column("series_instance_uid", sa.String(length=64), nullable=False),
            sa.Column("sop_class_uid", sa.String(length=64), nullable=False),
            sa.Column("source", sa.String(length=64), nullable=False),
            sa.Column("dicom", sa.LargeBinary(), nullable=False),
            sa.Column("label_set", sa.String(length=64), nullable=True),
            sa.Column("method", sa.String(length=32), nullable=True),
            sa.Column("state", sa.String(length=16), nullable=False),
            sa.Column("reason", sa.String(length=1000), nullable=True),
            sa.Column("attempts", sa.Integer(), nullable=False),
            sa.Column("lease_until", sa.DateTime(timezone=True), nullable=True),
            sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
            sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
            sa.PrimaryKeyConstraint("id"),
            sa.UniqueConstraint("sop_instance_uid"),
        )
        with op.batch_alter_table("dicom_inbox", schema=None) as batch_op:
            batch_op.create_index("ix_dicom_inbox_queue", ["state", "id"], unique=False)
            batch_op.create_index(batch_op.f("ix_dicom_inbox_study_instance_uid"), ["study_instance_uid"], unique=False)

    if "dicom_routes" not in existing:
        op.create_table(
            "dicom_routes",
            sa.Column("id", sa.Integer(), nullable=False),
            sa.Column("version", sa.Integer(), nullable=False),
            sa.Column("rules", sa.JSON(), nullable=False),
            sa.Column("source", sa.String(length=16), nullable=False),
            sa.Column("file_sha256", sa.String(length=64), nullable=True),
            sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
            sa.PrimaryKeyConstraint("id"),
        )

    if "label_sets" not in existing:
        op.create_table(
            "label_sets",
            sa.Column("id", sa.Integer(), nullable=False),
            sa.Column("name", sa.String(length=64), nullable=False),
            sa.Column("version", sa.Integer(), nullable=False),
            sa.Column("spec", sa.JSON(), nullable=False),
            sa.Column("builtin", sa.Boolean(), nullable=False),
            sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
            sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
            sa.PrimaryKeyConstraint("id"),
        )
        with op.batch_alter_table("label_sets", schema=None) as batch_op:
            batch_op.create_index(batch_op.f("ix_label_sets_name"), ["name"], unique=True)

    if "meta" not in existing:
        op.create_table(
            "meta",
            sa.Column("key", sa.String(length=64), nullable=False),
            sa.Column("value", sa.String(length=256), nullable=False),
            sa.PrimaryKeyConstraint("key"),
        )

    if "class_embeddings" not in existing:
        op.create_table(
            "class_embeddings",
            sa.Column("label_set_id", sa.Integer(), nullable=False),
            sa.Column("model_id", sa.String(length=512), nullable=False),
            sa.Column("version", sa.Integer(), nullable=False),
            sa.Column("n_classes", sa.Integer(), nullable=False),
            sa.Column("dim", sa.Integer(), nullable=False),
            sa.Column("vectors", sa.LargeBinary(), nullable=False),
            sa.ForeignKeyConstraint(["label_set_id"], ["label_sets.id"], ondelete="CASCADE"),
            sa.PrimaryKeyConstraint("label_set_id", "model_id"),
        )

    if "dicom_results" not in existing:
        op.create_table(
            "dicom_results",
            sa.Column("id", sa.Integer(), nullable=False),
            sa.Column("inbox_id", sa.Integer(), nullable=False),
            sa.Column("study_instance_uid", sa.String(length=64), nullable=False),
            sa.Column("series_instance_uid", sa.String(length=64), nullable=False),
            sa.Column("sop_instance_uid", sa.String(length=64), nullable=False),
            sa.Column("label_set", sa.String(length=64), nullable=False),
            sa.Column("label_set_version", sa.Integer(), nullable=False),
            sa.Column("method", sa.String(length=32), nullable=False),
            sa.Column("model_id", sa.String(length=512), nullable=False),
            sa.Column("classification", sa.JSON(), nullable=False),
            sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
            sa.ForeignKeyConstraint(["inbox_id"], ["dicom_inbox.id"], ondelete="CASCADE"),
            sa.PrimaryKeyConstraint("id"),
            sa.UniqueConstraint("inbox_id"),
        )
        with op.batch_alter_table("dicom_results", schema=None) as batch_op:
            batch_op.create_index(
                batch_op.f("ix_dicom_results_study_instance_uid"), ["study_instance_uid"], unique=False
            )

    if "method_states" not in existing:
        op.create_table(
            "method_states",
            sa.Column("id", sa.Integer(), nullable=False),
            sa.Column("kind", sa.String(length=32), nullable=False),
            sa.Column("label_set_id", sa.Integer(), nullable=False),
            sa.Column("label_set_version", sa.Integer(), nullable=False),
            sa.Column("model_id", sa.String(length=512), nullable=False),
            sa.Column("version", sa.Integer(), nullable=False),
            sa.Column("arrays", sa.LargeBinary(), nullable=False),
            sa.Column("meta", sa.JSON(), nullable=False),
            sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
            sa.ForeignKeyConstraint(["label_set_id"], ["label_sets.id"], ondelete="CASCADE"),
            sa.PrimaryKeyConstraint("id"),
            sa.UniqueConstraint("label_set_id", "kind", "model_id", "version"),
        )
        with op.batch_alter_table("method_states", schema=None) as batch_op:
            batch_op.create_index(
                "ix_method_states_lookup", ["label_set_id", "kind", "model_id", "label_set_version"], unique=False
            )

    if "result_deliveries" not in existing:
        op.create_table(
            "result_deliveries",
            sa.Column("id", sa.Integer(), nullable=False),
            sa.Column("result_id", sa.Integer(), nullable=False),
            sa.Column("target", sa.String(length=16), nullable=False),
            sa.Column("destination", sa.String(length=512), nullable=False),
            sa.Column("state", sa.String(length=16), nullable=False),
            sa.Column("attempts", sa.Integer(), nullable=False),
            sa.Column("last_error", sa.String(length=1000), nullable=True),
            sa.Column("due_at", sa.DateTime(timezone=True), nullable=False),
            sa.Column("sent_at", sa.DateTime(timezone=True), nullable=True),
            sa.Column("sr_sop_instance_uid", sa.String(length=64), nullable=True),
            sa.ForeignKeyConstraint(["result_id"], ["dicom_results.id"], ondelete="CASCADE"),
            sa.PrimaryKeyConstraint("id"),
            sa.UniqueConstraint("result_id", "target"),
        )
        with op.batch_alter_table("result_deliveries", schema=None) as batch_op:
            batch_op.create_index("ix_result_deliveries_due", ["state", "due_at"], unique=False)
            batch_op.create_index(batch_op.f("ix_result_deliveries_result_id"), ["result_id"], unique=False)

    if "kpl_fits" in existing:
        move_kpl_fits(op.get_bind())


def downgrade() -> None:
    with op.batch_alter_table("result_deliveries", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_result_deliveries_result_id"))
        batch_op.drop_index("ix_result_deliveries_due")

    op.drop_table("result_deliveries")
    with op.batch_alter_table("method_states", schema=None) as batch_op:
        batch_op.drop_index("ix_method_states_lookup")

    op.drop_table("method_states")
    with op.batch_alter_table("dicom_results", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_dicom_results_study_instance_uid"))

    op.drop_table("dicom_results")
    op.drop_table("class_embeddings")
    op.drop_table("meta")
    with op.batch_alter_table("label_sets", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_label_sets_name"))

    op.drop_table("label_sets")
    op.drop_table("dicom_routes")
    with op.batch_alter_table("dicom_inbox", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_dicom_inbox_study_instance_uid"))
        batch_op.drop_index("ix_dicom_inbox_queue")

    op.drop_table("dicom_inbox")
    op.drop_table("api_keys")
