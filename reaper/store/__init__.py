"""The reaper's database: SQLAlchemy 2 models, alembic migrations (inside the package, so an
installed reaper upgrades itself at start) and the repository, on SQLite (default) or PostgreSQL.

    store = Store.open("sqlite:///reaper.sqlite")      # or postgresql+psycopg://user:pw@host/db
"""

from .models import UTCDateTime, as_utc, spell_key
from .repo import MIGRATIONS, VERSION_TABLE, Delivery, StopRecord, Store, make_engine, notice_context

__all__ = [
    "MIGRATIONS",
    "VERSION_TABLE",
    "Delivery",
    "StopRecord",
    "Store",
    "UTCDateTime",
    "as_utc",
    "make_engine",
    "notice_context",
    "spell_key",
]
