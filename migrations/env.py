"""Alembic environment for the costwatch store, driven from code by ``costwatch.store.migrate``.

The caller passes an open connection (already inside a transaction and holding the migration
lock) in ``config.attributes["connection"]``; there is no ``alembic.ini`` and no offline mode.
"""

from __future__ import annotations

from alembic import context

from costwatch.store.partitions import is_attempt_partition
from costwatch.store.schema import VERSION_TABLE, metadata

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run costwatch migrations through costwatch.store.migrate, which passes a connection")

context.configure(
    connection=connection,
    target_metadata=metadata,
    version_table=VERSION_TABLE,
    # SQLite cannot ALTER most things in place; batch mode rebuilds the table instead.
    render_as_batch=connection.dialect.name == "sqlite",
    compare_type=True,
    # The attempts table's partitions (PostgreSQL) are made at run time, not by the schema's tables.
    include_name=lambda name, kind, _parents: not (kind == "table" and is_attempt_partition(name)),
)

with context.begin_transaction():
    context.run_migrations()
