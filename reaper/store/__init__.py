"""The reaper's database: SQLAlchemy Core tables (models), alembic migrations (alembic/ at the top
of the repository, shipped inside the wheel so an installed reaper upgrades itself at start) and
repositories by subject (runs, outbox, reports, lease, slack), on SQLite (default) or PostgreSQL.

    store = Store.open("sqlite:///reaper.sqlite")      # or postgresql+psycopg://user:pw@host/db
    store.runs.record_many(items, now)
"""

from .context import NoticeContext, notice_context
from .db import HEAD_REVISION, MIGRATIONS, VERSION_TABLE, Database, make_engine
from .models import UTCDateTime, as_utc, spell_key
from .outbox import Delivery
from .reports import ActionRow, ChannelStatus, NoticeRow, RunRow
from .runs import StopRecord
from .store import Store

__all__ = [
    "HEAD_REVISION",
    "MIGRATIONS",
    "VERSION_TABLE",
    "ActionRow",
    "ChannelStatus",
    "Database",
    "Delivery",
    "NoticeContext",
    "NoticeRow",
    "RunRow",
    "StopRecord",
    "Store",
    "UTCDateTime",
    "as_utc",
    "make_engine",
    "notice_context",
    "spell_key",
]
