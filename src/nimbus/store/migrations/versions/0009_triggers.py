"""Triggers: function URLs and schedules, and which trigger started an invocation.

Written out by hand and frozen, like the ones before.

Revision ID: 0009
Revises: 0008
"""

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    _upgrade_urls()
    _upgrade_schedules()


def downgrade() -> None:
    _downgrade_schedules()
    _downgrade_urls()


# ---------------------------------------------------------------- function URLs (and invocations.trigger)


def _upgrade_urls() -> None:
    op.add_column("invocations", sa.Column("trigger", sa.String(16), nullable=False, server_default="api"))
    op.create_table(
        "function_urls",
        sa.Column("function_id", sa.String(32), nullable=False),
        sa.Column("qualifier", sa.String(128), nullable=False),
        sa.Column("tenant", sa.String(64), nullable=False),
        sa.Column("auth", sa.String(8), nullable=False),
        sa.Column("cors", sa.Text, nullable=False, server_default="{}"),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("function_id", "qualifier", name="pk_function_urls"),
        sa.ForeignKeyConstraint(["function_id"], ["functions.id"], name="fk_function_urls_function_id_functions",
                                ondelete="CASCADE"),
    )


def _downgrade_urls() -> None:
    op.drop_table("function_urls")
    op.drop_column("invocations", "trigger")


# ---------------------------------------------------------------- schedules


def _upgrade_schedules() -> None:
    op.create_table(
        "schedules",
        sa.Column("id", sa.String(32), nullable=False),
        sa.Column("function_id", sa.String(32), nullable=False),
        sa.Column("tenant", sa.String(64), nullable=False),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("qualifier", sa.String(128), nullable=False, server_default="$LATEST"),
        sa.Column("expression", sa.String(256), nullable=False),
        sa.Column("input", sa.Text, nullable=True),
        sa.Column("enabled", sa.Boolean, nullable=False, server_default=sa.true()),
        sa.Column("next_fire_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_schedules"),
        sa.ForeignKeyConstraint(["function_id"], ["functions.id"], name="fk_schedules_function_id_functions",
                                ondelete="CASCADE"),
        sa.UniqueConstraint("function_id", "name", name="uq_schedules_function_id_name"),
    )
    op.create_index("ix_schedules_enabled_next_fire_at", "schedules", ["enabled", "next_fire_at"])
    op.create_table(
        "schedule_ticks",
        sa.Column("schedule_id", sa.String(32), nullable=False),
        sa.Column("fire_time", sa.DateTime(timezone=True), nullable=False),
        sa.Column("invocation_id", sa.String(32), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("schedule_id", "fire_time", name="pk_schedule_ticks"),
        sa.ForeignKeyConstraint(["schedule_id"], ["schedules.id"], name="fk_schedule_ticks_schedule_id_schedules",
                                ondelete="CASCADE"),
    )


def _downgrade_schedules() -> None:
    op.drop_table("schedule_ticks")
    op.drop_index("ix_schedules_enabled_next_fire_at", "schedules")
    op.drop_table("schedules")
