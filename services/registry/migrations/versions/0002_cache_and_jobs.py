"""Composed-model cache and extraction jobs.

Revision ID: 0002
Revises: 0001
Create Date: 2025-01-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "composed_models",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("pool_version_id", sa.Integer(), nullable=False),
        sa.Column("class_set", sa.String(length=64), nullable=False),
        sa.Column("class_ids", sa.JSON(), nullable=False),
        sa.Column("format", sa.String(length=32), nullable=False),
        sa.Column("blob_sha256", sa.String(length=64), nullable=False),
        sa.Column("metadata", sa.JSON(), nullable=False),
        sa.Column("hits", sa.BigInteger(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_hit_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(["blob_sha256"], ["blobs.sha256"], name=op.f("fk_composed_models_blob_sha256_blobs")),
        sa.ForeignKeyConstraint(
            ["pool_version_id"],
            ["pool_versions.id"],
            name=op.f("fk_composed_models_pool_version_id_pool_versions"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_composed_models")),
        sa.UniqueConstraint(
            "pool_version_id", "class_set", "format", name=op.f("uq_composed_models_pool_version_id_class_set_format")
        ),
    )
    op.create_index(op.f("ix_composed_models_blob_sha256"), "composed_models", ["blob_sha256"], unique=False)
    op.create_table(
        "extraction_jobs",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("progress", sa.Float(), nullable=False),
        sa.Column("stage", sa.String(length=64), nullable=False),
        sa.Column("message", sa.Text(), nullable=False),
        sa.Column("params", sa.JSON(), nullable=False),
        sa.Column("error", sa.Text(), nullable=False),
        sa.Column("oracle_id", sa.Integer(), nullable=True),
        sa.Column("pool_version_id", sa.Integer(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["oracle_id"], ["oracles.id"], name=op.f("fk_extraction_jobs_oracle_id_oracles")),
        sa.ForeignKeyConstraint(
            ["pool_version_id"],
            ["pool_versions.id"],
            name=op.f("fk_extraction_jobs_pool_version_id_pool_versions"),
            ondelete="SET NULL",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_extraction_jobs")),
    )
    op.create_index(op.f("ix_extraction_jobs_created_at"), "extraction_jobs", ["created_at"], unique=False)
    op.create_index(op.f("ix_extraction_jobs_state"), "extraction_jobs", ["state"], unique=False)


def downgrade() -> None:
    op.drop_index(op.f("ix_extraction_jobs_state"), table_name="extraction_jobs")
    op.drop_index(op.f("ix_extraction_jobs_created_at"), table_name="extraction_jobs")
    op.drop_table("extraction_jobs")
    op.drop_index(op.f("ix_composed_models_blob_sha256"), table_name="composed_models")
    op.drop_table("composed_models")
