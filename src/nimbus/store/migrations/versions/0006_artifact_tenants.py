"""Which tenants have asked for each build-cache entry, so a cache hit is reported only to its own tenant.

Written out by hand and frozen, like the ones before.

- ``artifact_tenants``: (build key, tenant) → when that tenant first asked for it and how long that
  request took. A tenant's first request for an artifact another tenant built answers ``cached: false``
  with its own duration; only later requests of the same tenant say ``cached: true``. Rows go with their
  build row (ON DELETE CASCADE) when ``nimbus gc`` removes it.

Revision ID: 0006
Revises: 0005
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "artifact_tenants",
        sa.Column("key", sa.String(64), nullable=False),
        sa.Column("tenant", sa.String(64), nullable=False),
        sa.Column("duration_ms", sa.Float, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["key"], ["builds.key"], name="fk_artifact_tenants_key_builds", ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("key", "tenant", name="pk_artifact_tenants"),
    )


def downgrade() -> None:
    op.drop_table("artifact_tenants")
