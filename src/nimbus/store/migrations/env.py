"""Alembic's environment for Nimbus: run by ``Store.open``, never by the ``alembic`` command line.

``Store.open`` hands over a connection that is already inside a transaction holding the migration lock
(``BEGIN IMMEDIATE`` on SQLite, an advisory lock on PostgreSQL), so Alembic opens no transaction of its own
and two nodes starting at once apply each migration exactly once.
"""

from alembic import context

from nimbus.store import tables

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError(
        "Nimbus applies its migrations itself when the store opens (nimbus.store.Store.open); "
        "there is no alembic.ini to run them from the command line"
    )

context.configure(
    connection=connection,
    target_metadata=tables.metadata,
    # SQLite cannot ALTER most things; batch mode rebuilds the table instead, for later migrations.
    render_as_batch=connection.dialect.name == "sqlite",
    compare_type=True,
)

with context.begin_transaction():
    context.run_migrations()
