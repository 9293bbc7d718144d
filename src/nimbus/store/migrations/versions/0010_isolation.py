"""Per-function isolation: whether a machine that served a call may serve the next one.

Written out by hand and frozen, like the ones before.

- ``function_versions.isolation``: ``shared`` (a machine stays idle for the next call, as before) or
  ``per-call`` (each call gets a fresh machine). Every existing revision becomes ``shared``, which is
  what it ran as, through the server default.

Revision ID: 0010
Revises: 0009
"""

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # A plain ADD COLUMN, no batch: SQLite and PostgreSQL both add a NOT NULL column with a default in
    # place, giving every existing row the default, with no table rebuild (see 0008 on why rebuilds hurt).
    op.add_column("function_versions",
                  sa.Column("isolation", sa.String(16), nullable=False, server_default="shared"))


def downgrade() -> None:
    op.drop_column("function_versions", "isolation")  # SQLite 3.35+ drops a column in place: no rebuild
