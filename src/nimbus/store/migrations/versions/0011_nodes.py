"""The node registry: one row per node sharing the database, with its state and last heartbeat.

Written out by hand and frozen, like the ones before.

Revision ID: 0011
Revises: 0010
"""

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "nodes",
        sa.Column("id", sa.String(64), nullable=False),
        sa.Column("address", sa.String(255), nullable=False),
        sa.Column("driver", sa.String(16), nullable=False),
        sa.Column("runtimes", sa.JSON(none_as_null=True), nullable=False),
        sa.Column("capacity", sa.JSON(none_as_null=True), nullable=False),
        sa.Column("version", sa.String(32), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("stats", sa.JSON(none_as_null=True), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("heartbeat_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_nodes"),
    )
    op.create_index("ix_nodes_state_heartbeat_at", "nodes", ["state", "heartbeat_at"])


def downgrade() -> None:
    op.drop_index("ix_nodes_state_heartbeat_at", table_name="nodes")
    op.drop_table("nodes")
