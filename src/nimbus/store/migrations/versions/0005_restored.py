"""Invocations say whether their machine was restored from a snapshot (the firecracker driver's ``restored``).

Written out by hand and frozen, like the ones before.

Revision ID: 0005
Revises: 0004
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("invocations") as batch:
        batch.add_column(sa.Column("restored", sa.Boolean, nullable=False, server_default=sa.false()))


def downgrade() -> None:
    with op.batch_alter_table("invocations") as batch:
        batch.drop_column("restored")
