"""Published versions and aliases; which version an invocation ran; the SigV4 secret of API keys.

Written out by hand and frozen, like the ones before.

- ``function_versions.published``: the published version number of a revision (NULL: unpublished), unique
  per function; ``description`` and ``role`` (the Lambda API's execution role, stored and echoed);
  ``published_description``, the description given when publishing (the version's, not $LATEST's).
- ``functions.last_published``: the highest number handed out, so a deleted version's is never reused.
- ``aliases``: named pointers at a published version, optionally with a weighted second one.
- ``invocations.executed_version``: "$LATEST" or the published number that ran.
- ``api_keys.secret``: the secret a SigV4 signature is checked with (gateway/lambda_api).

Before this migration every revision was an immutable numbered version that callers could name by number,
so each existing revision becomes the published version of the same number (``published = version``) and
``last_published`` is the highest of them: every number in use keeps naming the code it named.

Revision ID: 0008
Revises: 0007
"""

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Plain ADD COLUMNs, no batch: on SQLite a batch that rebuilt ``functions`` would drop the old table,
    # and its ON DELETE CASCADE would take every version and invocation with it.
    op.add_column("function_versions", sa.Column("published", sa.Integer, nullable=True))
    op.add_column("function_versions", sa.Column("description", sa.Text, nullable=False, server_default=""))
    op.add_column("function_versions", sa.Column("role", sa.Text, nullable=True))
    op.add_column("function_versions", sa.Column("published_description", sa.Text, nullable=True))
    op.add_column("functions", sa.Column("last_published", sa.Integer, nullable=False, server_default=sa.text("0")))
    op.add_column("invocations",
                  sa.Column("executed_version", sa.String(16), nullable=False, server_default="$LATEST"))
    op.add_column("api_keys", sa.Column("secret", sa.Text, nullable=True))
    op.execute("UPDATE function_versions SET published = version")
    op.execute(
        "UPDATE functions SET last_published = "
        "(SELECT COALESCE(MAX(v.version), 0) FROM function_versions v WHERE v.function_id = functions.id)"
    )
    op.create_index("ix_function_versions_function_id_published", "function_versions", ["function_id", "published"],
                    unique=True)
    op.create_table(
        "aliases",
        sa.Column("id", sa.String(32), nullable=False),
        sa.Column("function_id", sa.String(32), nullable=False),
        sa.Column("tenant", sa.String(64), nullable=False),
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("version", sa.String(16), nullable=False),
        sa.Column("additional_version", sa.Integer, nullable=True),
        sa.Column("additional_weight", sa.Float, nullable=True),
        sa.Column("description", sa.Text, nullable=False, server_default=""),
        sa.Column("revision_id", sa.String(32), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_aliases"),
        sa.ForeignKeyConstraint(["function_id"], ["functions.id"], name="fk_aliases_function_id_functions",
                                ondelete="CASCADE"),
        sa.UniqueConstraint("function_id", "name", name="uq_aliases_function_id_name"),
    )


def downgrade() -> None:
    op.drop_table("aliases")
    op.drop_index("ix_function_versions_function_id_published", "function_versions")
    for table, column in (("api_keys", "secret"), ("invocations", "executed_version"),
                          ("functions", "last_published"), ("function_versions", "published_description"),
                          ("function_versions", "role"), ("function_versions", "description"),
                          ("function_versions", "published")):
        op.drop_column(table, column)  # SQLite 3.35+ drops a column in place: no rebuild, no cascade
