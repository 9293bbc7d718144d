"""Compiled runtimes: the build cache, and the built artifact each version runs.

Written out by hand and frozen, like 0001: it describes the schema as it was when it was written.

- ``builds``: sha256(runtime, toolchain, source) → artifact, so identical code is built once, across
  restarts and across nodes sharing a database.
- ``function_versions.artifact_sha256``: the built artifact a compiled version runs; NULL for the
  interpreted versions every existing row is.

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "builds",
        sa.Column("key", sa.String(64), nullable=False),
        sa.Column("runtime", sa.String(64), nullable=False),
        sa.Column("toolchain", sa.String(256), nullable=False),
        sa.Column("source_sha256", sa.String(64), nullable=False),
        sa.Column("artifact_sha256", sa.String(64), nullable=False),
        sa.Column("log", sa.Text, nullable=False, server_default=""),
        sa.Column("duration_ms", sa.Float, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("key", name="pk_builds"),
        sa.ForeignKeyConstraint(
            ["artifact_sha256"], ["artifacts.sha256"], name="fk_builds_artifact_sha256_artifacts",
        ),
    )
    op.create_index("ix_builds_artifact_sha256", "builds", ["artifact_sha256"])

    # SQLite cannot add a foreign key to an existing table: batch mode rebuilds it there (copying the
    # rows), and emits plain ALTER TABLE statements on PostgreSQL.
    with op.batch_alter_table("function_versions") as batch:
        batch.add_column(sa.Column("artifact_sha256", sa.String(64), nullable=True))
        batch.create_foreign_key(
            "fk_function_versions_artifact_sha256_artifacts", "artifacts", ["artifact_sha256"], ["sha256"],
        )
        batch.create_index("ix_function_versions_artifact_sha256", ["artifact_sha256"])


def downgrade() -> None:
    with op.batch_alter_table("function_versions") as batch:
        batch.drop_index("ix_function_versions_artifact_sha256")
        batch.drop_constraint("fk_function_versions_artifact_sha256_artifacts", type_="foreignkey")
        batch.drop_column("artifact_sha256")
    op.drop_index("ix_builds_artifact_sha256", table_name="builds")
    op.drop_table("builds")
