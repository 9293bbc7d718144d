"""Hardening: async retries and callbacks, idempotency keys, admin API keys.

Written out by hand and frozen, like 0001 and 0002.

- ``function_versions.max_retries``: how often a failed async invocation is tried again (Lambda's
  default, 2).
- ``invocations.not_before``: a retried invocation is not claimed before its backoff ends.
- ``invocations.callback_url`` / ``callback_status`` / ``callback_attempts``: where an async result
  is POSTed, and how far that delivery got (``pending``, ``delivered``, ``failed``).
- ``invocations.idempotency_key``: a repeated ``Idempotency-Key`` finds the first invocation; unique
  per tenant.
- ``api_keys.admin`` (may manage keys of every tenant) and ``api_keys.prefix`` (the first characters
  of the key, shown by ``nimbus keys ls`` so a key can be recognised without storing it).

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("function_versions") as batch:
        batch.add_column(sa.Column("max_retries", sa.Integer, nullable=False, server_default=sa.text("2")))
    with op.batch_alter_table("invocations") as batch:
        batch.add_column(sa.Column("not_before", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("callback_url", sa.String(2048), nullable=True))
        batch.add_column(sa.Column("callback_status", sa.String(16), nullable=True))
        batch.add_column(sa.Column("callback_attempts", sa.Integer, nullable=False, server_default=sa.text("0")))
        batch.add_column(sa.Column("idempotency_key", sa.String(256), nullable=True))
        batch.create_index("ix_invocations_tenant_idempotency_key", ["tenant", "idempotency_key"], unique=True)
        batch.create_index("ix_invocations_callback_status", ["callback_status"])
    with op.batch_alter_table("api_keys") as batch:
        batch.add_column(sa.Column("admin", sa.Boolean, nullable=False, server_default=sa.false()))
        batch.add_column(sa.Column("prefix", sa.String(16), nullable=False, server_default=""))


def downgrade() -> None:
    with op.batch_alter_table("api_keys") as batch:
        batch.drop_column("prefix")
        batch.drop_column("admin")
    with op.batch_alter_table("invocations") as batch:
        batch.drop_index("ix_invocations_callback_status")
        batch.drop_index("ix_invocations_tenant_idempotency_key")
        batch.drop_column("idempotency_key")
        batch.drop_column("callback_attempts")
        batch.drop_column("callback_status")
        batch.drop_column("callback_url")
        batch.drop_column("not_before")
    with op.batch_alter_table("function_versions") as batch:
        batch.drop_column("max_retries")
