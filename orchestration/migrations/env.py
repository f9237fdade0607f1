"""Alembic environment: the URL comes from the caller (orchestration.ledger), never from a file."""
from __future__ import annotations

from alembic import context
from sqlalchemy import engine_from_config, pool

from orchestration.ledger_schema import Base

config = context.config
connection = config.attributes.get("connection")


def run(connection) -> None:
    context.configure(connection=connection, target_metadata=Base.metadata,
                      render_as_batch=connection.dialect.name == "sqlite")
    with context.begin_transaction():
        context.run_migrations()


if connection is not None:
    run(connection)
else:
    engine = engine_from_config(config.get_section(config.config_ini_section) or {}, prefix="sqlalchemy.",
                                poolclass=pool.NullPool)
    with engine.connect() as new_connection:
        run(new_connection)
