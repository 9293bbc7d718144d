"""Retention: the sweep that deletes old finished invocations finds them by age through an index.

Written out by hand and frozen, like the ones before.

Revision ID: 0007
Revises: 0006
"""

from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_invocations_created_at", "invocations", ["created_at"])


def downgrade() -> None:
    op.drop_index("ix_invocations_created_at", "invocations")
