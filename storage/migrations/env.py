"""Alembic environment for the mask index.

``MaskIndex.upgrade()`` hands in an open connection through
``config.attributes["connection"]``; the ``alembic`` command line instead gets
the URL from the chexmask settings.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine, pool
from sqlalchemy.engine import Connection

from chexmask.storage.models import StorageModel, include_in_autogenerate

target_metadata = StorageModel.metadata


def _configure(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        # SQLite cannot ALTER most things; batch mode rebuilds the table instead.
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
        include_object=include_in_autogenerate,
    )
    with context.begin_transaction():
        context.run_migrations()


def _database_url() -> str:
    from chexmask.config import Settings
    from chexmask.storage.engine import engine_url

    return engine_url(Settings.from_env().database_url)


def run_migrations_offline() -> None:
    context.configure(url=_database_url(), target_metadata=target_metadata, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = context.config.attributes.get("connection")
    if connection is not None:
        _configure(connection)
        return
    engine = create_engine(_database_url(), poolclass=pool.NullPool)
    with engine.connect() as connection:
        _configure(connection)


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
