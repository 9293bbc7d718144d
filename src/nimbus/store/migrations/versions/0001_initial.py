"""The first schema: functions, their versions, artifacts, invocations and API keys.

Written out by hand rather than imported from ``nimbus.store.tables``: a migration describes the schema as
it was when the migration was written, and must not change when the tables module does.

Revision ID: 0001
Revises: none
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def _when(name: str, nullable: bool = False) -> sa.Column:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def upgrade() -> None:
    op.create_table(
        "artifacts",
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("runtime", sa.String(64), nullable=False),
        sa.Column("size", sa.BigInteger, nullable=False),
        sa.Column("content", sa.LargeBinary, nullable=False),
        _when("created_at"),
        sa.PrimaryKeyConstraint("sha256", name="pk_artifacts"),
    )

    op.create_table(
        "functions",
        sa.Column("id", sa.String(32), nullable=False),
        sa.Column("tenant", sa.String(64), nullable=False, server_default="default"),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
        _when("created_at"),
        _when("updated_at"),
        sa.PrimaryKeyConstraint("id", name="pk_functions"),
        sa.UniqueConstraint("tenant", "name", name="uq_functions_tenant_name"),
    )

    op.create_table(
        "function_versions",
        sa.Column("id", sa.String(32), nullable=False),
        sa.Column("function_id", sa.String(32), nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("runtime", sa.String(64), nullable=False),
        sa.Column("handler", sa.String(256), nullable=False),
        sa.Column("env", sa.JSON(none_as_null=True), nullable=False),
        sa.Column("memory_mb", sa.Integer, nullable=False),
        sa.Column("timeout_s", sa.Float, nullable=False),
        sa.Column("concurrency", sa.Integer, nullable=False),
        sa.Column("code_sha256", sa.String(64), nullable=False),
        sa.Column("code_size", sa.BigInteger, nullable=False),
        sa.Column("code_kind", sa.String(16), nullable=False),
        _when("created_at"),
        sa.PrimaryKeyConstraint("id", name="pk_function_versions"),
        sa.UniqueConstraint("function_id", "version", name="uq_function_versions_function_id_version"),
        sa.ForeignKeyConstraint(
            ["function_id"], ["functions.id"], ondelete="CASCADE",
            name="fk_function_versions_function_id_functions",
        ),
        sa.ForeignKeyConstraint(
            ["code_sha256"], ["artifacts.sha256"], name="fk_function_versions_code_sha256_artifacts",
        ),
    )
    op.create_index("ix_function_versions_code_sha256", "function_versions", ["code_sha256"])

    op.create_table(
        "invocations",
        sa.Column("id", sa.String(32), nullable=False),
        sa.Column("function_id", sa.String(32), nullable=False),
        sa.Column("function_name", sa.String(64), nullable=False),
        sa.Column("tenant", sa.String(64), nullable=False, server_default="default"),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("version_id", sa.String(32), nullable=False),
        sa.Column("mode", sa.String(8), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("start", sa.String(8), nullable=True),
        sa.Column("event", sa.LargeBinary, nullable=True),
        sa.Column("output", sa.LargeBinary, nullable=True),
        sa.Column("error", sa.JSON(none_as_null=True), nullable=True),
        sa.Column("logs", sa.Text, nullable=False, server_default=""),
        sa.Column("logs_truncated", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("duration_ms", sa.Float, nullable=True),
        _when("created_at"),
        _when("started_at", nullable=True),
        _when("finished_at", nullable=True),
        sa.Column("attempts", sa.Integer, nullable=False, server_default=sa.text("0")),
        sa.Column("lease_owner", sa.String(64), nullable=True),
        _when("lease_expires_at", nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_invocations"),
        sa.ForeignKeyConstraint(
            ["function_id"], ["functions.id"], ondelete="CASCADE", name="fk_invocations_function_id_functions",
        ),
    )
    op.create_index("ix_invocations_function_id_created_at", "invocations", ["function_id", "created_at"])
    op.create_index(
        "ix_invocations_mode_status_lease_expires_at", "invocations", ["mode", "status", "lease_expires_at"]
    )

    op.create_table(
        "api_keys",
        sa.Column("id", sa.String(32), nullable=False),
        sa.Column("tenant", sa.String(64), nullable=False),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("key_hash", sa.String(128), nullable=False),
        _when("created_at"),
        _when("revoked_at", nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_api_keys"),
        sa.UniqueConstraint("key_hash", name="uq_api_keys_key_hash"),
    )
    op.create_index("ix_api_keys_tenant", "api_keys", ["tenant"])


def downgrade() -> None:
    op.drop_table("api_keys")
    op.drop_table("invocations")
    op.drop_table("function_versions")
    op.drop_table("functions")
    op.drop_table("artifacts")
