"""The store: one database and its repositories by subject.

    store = Store.open("sqlite:///reaper.sqlite")      # or postgresql+psycopg://user:pw@host/db
    store.runs.histories(keys); store.outbox.due_deliveries(now); store.reports.runs_overview()
    store.lease.acquire(holder, now, ttl); store.slack.lookup(email, now)
"""

from __future__ import annotations

from sqlalchemy import Engine

from .db import (
    HEAD_REVISION,
    Database,
    ensure_sqlite_folder,
    make_engine,
    normalize_url,
    sqlite_memory,
    upgrade_in_child,
)
from .keeplinks import KeepLinks
from .lease import Lease
from .outbox import Outbox
from .reports import Reports
from .runs import Runs
from .slack import SlackLookups


class Store:
    """The repositories over one database: ``runs`` (runs, observations, stops), ``outbox``
    (notices to deliver), ``reports`` (actions, notices and runs read back, sweeps), ``lease``
    (the single active reaper), ``slack`` (the Slack channel's lookup cache) and ``keeplinks`` (the
    one-click keep links used, and their signing secret)."""

    def __init__(self, engine: Engine) -> None:
        self.db = Database(engine)
        self.runs = Runs(self.db)
        self.outbox = Outbox(self.db)
        self.reports = Reports(self.db)
        self.lease = Lease(self.db)
        self.slack = SlackLookups(self.db)
        self.keeplinks = KeepLinks(self.db)

    @classmethod
    def open(cls, url: str, *, upgrade: bool = True, isolated: bool = False) -> Store:
        """Open (creating the SQLite file's folder) and, unless told not to, migrate to head.

        A database already at head is only checked (one query), without alembic. ``isolated``
        (the service): a migration that is needed runs in a child interpreter, so the long-lived
        process never loads alembic; an in-memory database has no other process to share it and
        is migrated here."""
        u = normalize_url(url)
        ensure_sqlite_folder(u)
        store = cls(make_engine(u))
        if upgrade:
            try:
                if store.db.stored_revision() != HEAD_REVISION:
                    if isolated and not sqlite_memory(u):
                        upgrade_in_child(u)
                    else:
                        store.db.upgrade()
            except BaseException:
                store.close()
                raise
        return store

    @property
    def engine(self) -> Engine:
        return self.db.engine

    @property
    def dialect(self) -> str:
        return self.db.dialect

    def close(self) -> None:
        self.db.close()

    def __repr__(self) -> str:
        return f"Store({self.engine.url.render_as_string(hide_password=True)})"
