"""Alembic environment for the reaper's store.

Two ways in:
* programmatically (``reaper.store.Store.upgrade``): the caller passes an open connection in
  ``config.attributes["connection"]``; nothing else is read and logging is left alone;
* from the command line (``alembic upgrade head`` at the repository root, with alembic.ini): the
  database URL comes from ``sqlalchemy.url`` if set in code, else env ``REAPER_DATABASE_URL``, else
  the reaper's config (``$REAPER_CONFIG`` or ./config.yaml, ``database_url``), never from the ini.
"""

from __future__ import annotations

import os
from logging.config import fileConfig

from alembic import context
from sqlalchemy import Connection

from reaper.store.models import metadata

VERSION_TABLE = "reaper_alembic_version"

config = context.config
target_metadata = metadata


def _url() -> str:
    url = config.get_main_option("sqlalchemy.url")
    if url:
        return url
    env = os.environ.get("REAPER_DATABASE_URL")
    if env:
        return env
    from reaper.config import default_config_path, load_settings

    return load_settings(default_config_path()).database_url


def _configure(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        version_table=VERSION_TABLE,
        render_as_batch=connection.dialect.name == "sqlite",  # SQLite cannot ALTER most things
        compare_type=True,
    )


def run_migrations_offline() -> None:
    context.configure(
        url=_url(),
        target_metadata=target_metadata,
        version_table=VERSION_TABLE,
        literal_binds=True,
        dialect_opts={"paramstyle": "named"},
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    shared = config.attributes.get("connection")
    if shared is not None:
        _configure(shared)
        with context.begin_transaction():
            context.run_migrations()
        return
    if config.config_file_name is not None:
        fileConfig(config.config_file_name, disable_existing_loggers=False)
    from reaper.store.db import make_engine

    engine = make_engine(_url())
    try:
        with engine.connect() as connection:
            _configure(connection)
            with context.begin_transaction():
                context.run_migrations()
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
