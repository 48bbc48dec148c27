"""Initial schema: data sets, hierarchies, blobs, oracles, libraries, experts, pools.

Revision ID: 0001
Revises:
Create Date: 2025-01-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "blobs",
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("media_type", sa.String(length=100), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("sha256", name=op.f("pk_blobs")),
    )
    op.create_table(
        "datasets",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=128), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_datasets")),
        sa.UniqueConstraint("name", name=op.f("uq_datasets_name")),
    )
    op.create_table(
        "pools",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_pools")),
        sa.UniqueConstraint("name", name=op.f("uq_pools_name")),
    )
    op.create_table(
        "dataset_classes",
        sa.Column("dataset_id", sa.Integer(), nullable=False),
        sa.Column("label", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=256), nullable=False),
        sa.Column("name_key", sa.String(length=256), nullable=False),
        sa.ForeignKeyConstraint(
            ["dataset_id"], ["datasets.id"], name=op.f("fk_dataset_classes_dataset_id_datasets"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("dataset_id", "label", name=op.f("pk_dataset_classes")),
        sa.UniqueConstraint("dataset_id", "name_key", name=op.f("uq_dataset_classes_dataset_id_name_key")),
    )
    op.create_index(op.f("ix_dataset_classes_name_key"), "dataset_classes", ["name_key"], unique=False)
    op.create_table(
        "hierarchies",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("dataset_id", sa.Integer(), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["dataset_id"], ["datasets.id"], name=op.f("fk_hierarchies_dataset_id_datasets")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_hierarchies")),
        sa.UniqueConstraint("dataset_id", "version", name=op.f("uq_hierarchies_dataset_id_version")),
    )
    op.create_table(
        "oracles",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=256), nullable=False),
        sa.Column("dataset_id", sa.Integer(), nullable=False),
        sa.Column("config", sa.JSON(), nullable=False),
        sa.Column("params", sa.BigInteger(), nullable=False),
        sa.Column("metrics", sa.JSON(), nullable=False),
        sa.Column("blob_sha256", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["blob_sha256"], ["blobs.sha256"], name=op.f("fk_oracles_blob_sha256_blobs")),
        sa.ForeignKeyConstraint(["dataset_id"], ["datasets.id"], name=op.f("fk_oracles_dataset_id_datasets")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_oracles")),
        sa.UniqueConstraint("blob_sha256", name=op.f("uq_oracles_blob_sha256")),
    )
    op.create_table(
        "libraries",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=256), nullable=False),
        sa.Column("dataset_id", sa.Integer(), nullable=False),
        sa.Column("oracle_id", sa.Integer(), nullable=True),
        sa.Column("config", sa.JSON(), nullable=False),
        sa.Column("params", sa.BigInteger(), nullable=False),
        sa.Column("metrics", sa.JSON(), nullable=False),
        sa.Column("loss", sa.JSON(), nullable=False),
        sa.Column("blob_sha256", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["blob_sha256"], ["blobs.sha256"], name=op.f("fk_libraries_blob_sha256_blobs")),
        sa.ForeignKeyConstraint(["dataset_id"], ["datasets.id"], name=op.f("fk_libraries_dataset_id_datasets")),
        sa.ForeignKeyConstraint(["oracle_id"], ["oracles.id"], name=op.f("fk_libraries_oracle_id_oracles")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_libraries")),
        sa.UniqueConstraint("blob_sha256", name=op.f("uq_libraries_blob_sha256")),
    )
    op.create_table(
        "tasks",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("hierarchy_id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(
            ["hierarchy_id"], ["hierarchies.id"], name=op.f("fk_tasks_hierarchy_id_hierarchies"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_tasks")),
        sa.UniqueConstraint("hierarchy_id", "name", name=op.f("uq_tasks_hierarchy_id_name")),
    )
    op.create_table(
        "experts",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("library_id", sa.Integer(), nullable=False),
        sa.Column("task_id", sa.Integer(), nullable=False),
        sa.Column("class_ids", sa.JSON(), nullable=False),
        sa.Column("config", sa.JSON(), nullable=False),
        sa.Column("params", sa.BigInteger(), nullable=False),
        sa.Column("val_accuracy", sa.Float(), nullable=True),
        sa.Column("metrics", sa.JSON(), nullable=False),
        sa.Column("loss", sa.JSON(), nullable=False),
        sa.Column("blob_sha256", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["blob_sha256"], ["blobs.sha256"], name=op.f("fk_experts_blob_sha256_blobs")),
        sa.ForeignKeyConstraint(["library_id"], ["libraries.id"], name=op.f("fk_experts_library_id_libraries")),
        sa.ForeignKeyConstraint(["task_id"], ["tasks.id"], name=op.f("fk_experts_task_id_tasks")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_experts")),
        sa.UniqueConstraint(
            "library_id", "task_id", "blob_sha256", name=op.f("uq_experts_library_id_task_id_blob_sha256")
        ),
    )
    op.create_index(op.f("ix_experts_blob_sha256"), "experts", ["blob_sha256"], unique=False)
    op.create_index(op.f("ix_experts_task_id"), "experts", ["task_id"], unique=False)
    op.create_table(
        "pool_versions",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("pool_id", sa.Integer(), nullable=False),
        sa.Column("version", sa.String(length=64), nullable=False),
        sa.Column("library_id", sa.Integer(), nullable=False),
        sa.Column("hierarchy_id", sa.Integer(), nullable=False),
        sa.Column("info", sa.JSON(), nullable=False),
        sa.Column("description", sa.Text(), nullable=False),
        sa.Column("published_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["hierarchy_id"], ["hierarchies.id"], name=op.f("fk_pool_versions_hierarchy_id_hierarchies")
        ),
        sa.ForeignKeyConstraint(["library_id"], ["libraries.id"], name=op.f("fk_pool_versions_library_id_libraries")),
        sa.ForeignKeyConstraint(["pool_id"], ["pools.id"], name=op.f("fk_pool_versions_pool_id_pools")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_pool_versions")),
        sa.UniqueConstraint("pool_id", "version", name=op.f("uq_pool_versions_pool_id_version")),
    )
    op.create_index(op.f("ix_pool_versions_library_id"), "pool_versions", ["library_id"], unique=False)
    op.create_table(
        "task_classes",
        sa.Column("task_id", sa.Integer(), nullable=False),
        sa.Column("label", sa.Integer(), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(
            ["task_id"], ["tasks.id"], name=op.f("fk_task_classes_task_id_tasks"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("task_id", "label", name=op.f("pk_task_classes")),
    )
    op.create_index(op.f("ix_task_classes_label"), "task_classes", ["label"], unique=False)
    op.create_table(
        "pool_aliases",
        sa.Column("pool_id", sa.Integer(), nullable=False),
        sa.Column("alias", sa.String(length=64), nullable=False),
        sa.Column("pool_version_id", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(["pool_id"], ["pools.id"], name=op.f("fk_pool_aliases_pool_id_pools")),
        sa.ForeignKeyConstraint(
            ["pool_version_id"], ["pool_versions.id"], name=op.f("fk_pool_aliases_pool_version_id_pool_versions")
        ),
        sa.PrimaryKeyConstraint("pool_id", "alias", name=op.f("pk_pool_aliases")),
    )
    op.create_index(op.f("ix_pool_aliases_pool_version_id"), "pool_aliases", ["pool_version_id"], unique=False)
    op.create_table(
        "pool_version_experts",
        sa.Column("pool_version_id", sa.Integer(), nullable=False),
        sa.Column("task_id", sa.Integer(), nullable=False),
        sa.Column("expert_id", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(["expert_id"], ["experts.id"], name=op.f("fk_pool_version_experts_expert_id_experts")),
        sa.ForeignKeyConstraint(
            ["pool_version_id"],
            ["pool_versions.id"],
            name=op.f("fk_pool_version_experts_pool_version_id_pool_versions"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(["task_id"], ["tasks.id"], name=op.f("fk_pool_version_experts_task_id_tasks")),
        sa.PrimaryKeyConstraint("pool_version_id", "task_id", name=op.f("pk_pool_version_experts")),
    )
    op.create_index(op.f("ix_pool_version_experts_expert_id"), "pool_version_experts", ["expert_id"], unique=False)


def downgrade() -> None:
    op.drop_index(op.f("ix_pool_version_experts_expert_id"), table_name="pool_version_experts")
    op.drop_table("pool_version_experts")
    op.drop_index(op.f("ix_pool_aliases_pool_version_id"), table_name="pool_aliases")
    op.drop_table("pool_aliases")
    op.drop_index(op.f("ix_task_classes_label"), table_name="task_classes")
    op.drop_table("task_classes")
    op.drop_index(op.f("ix_pool_versions_library_id"), table_name="pool_versions")
    op.drop_table("pool_versions")
    op.drop_index(op.f("ix_experts_task_id"), table_name="experts")
    op.drop_index(op.f("ix_experts_blob_sha256"), table_name="experts")
    op.drop_table("experts")
    op.drop_table("tasks")
    op.drop_table("libraries")
    op.drop_table("oracles")
    op.drop_table("hierarchies")
    op.drop_index(op.f("ix_dataset_classes_name_key"), table_name="dataset_classes")
    op.drop_table("dataset_classes")
    op.drop_table("pools")
    op.drop_table("datasets")
    op.drop_table("blobs")
