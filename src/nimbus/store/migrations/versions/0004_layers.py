"""Dependency layers: a version may mount a layer; the build cache holds layers beside artifacts.

Written out by hand and frozen, like the ones before.

- ``function_versions.layer_sha256``: the archive of the version's resolved dependencies (an artifact),
  NULL when it has none. No ON DELETE: a referenced layer cannot be deleted.
- ``builds.kind``: ``artifact`` (compiled code, every row so far) or ``layer``.

Revision ID: 0004
Revises: 0003
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("function_versions") as batch:
        batch.add_column(sa.Column("layer_sha256", sa.String(64), nullable=True))
        batch.create_foreign_key("fk_function_versions_layer_sha256_artifacts", "artifacts", ["layer_sha256"],
                                 ["sha256"])
        batch.create_index("ix_function_versions_layer_sha256", ["layer_sha256"])
    with op.batch_alter_table("builds") as batch:
        batch.add_column(sa.Column("kind", sa.String(16), nullable=False, server_default="artifact"))


def downgrade() -> None:
    with op.batch_alter_table("builds") as batch:
        batch.drop_column("kind")
    with op.batch_alter_table("function_versions") as batch:
        batch.drop_index("ix_function_versions_layer_sha256")
        batch.drop_constraint("fk_function_versions_layer_sha256_artifacts", type_="foreignkey")
        batch.drop_column("layer_sha256")
