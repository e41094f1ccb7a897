"""The single-active-reaper lease: one row per lease name, held by one reaper until it expires."""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import or_, select, update

from .db import Database
from .models import LEASES, as_utc

DEFAULT_LEASE = "reaper"


class Lease:
    def __init__(self, db: Database) -> None:
        self.db = db

    def acquire(self, holder: str, now: datetime, ttl: timedelta, *, name: str = DEFAULT_LEASE) -> bool:
        """Take or renew the lease. True when ``holder`` holds it until now + ttl; False when another
        holder's lease has not expired. Atomic on both databases (insert-or-nothing, then a
        conditional update of the one row)."""
        now = as_utc(now)
        until = now + ttl
        with self.db.write() as s:
            ins = s.execute(
                self.db.insert(LEASES)
                .values(name=name, holder=holder, acquired_at=now, expires_at=until)
                .on_conflict_do_nothing(index_elements=["name"])
            )
            if ins.rowcount == 1:
                return True
            upd = s.execute(
                update(LEASES)
                .where(LEASES.c.name == name, or_(LEASES.c.holder == holder, LEASES.c.expires_at <= now))
                .values(holder=holder, expires_at=until, acquired_at=now)
            )
            return upd.rowcount == 1

    def holder(self, now: datetime, *, name: str = DEFAULT_LEASE) -> str | None:
        """Who holds an unexpired lease, if anyone."""
        now = as_utc(now)
        with self.db.read() as s:
            row = s.execute(select(LEASES.c.holder, LEASES.c.expires_at).where(LEASES.c.name == name)).first()
        if row is None or row.expires_at <= now:
            return None
        return str(row.holder)

    def release(self, holder: str, *, name: str = DEFAULT_LEASE) -> None:
        """Give the lease up (on a clean shutdown) so another reaper can take over at once."""
        with self.db.write() as s:
            s.execute(LEASES.delete().where(LEASES.c.name == name, LEASES.c.holder == holder))
