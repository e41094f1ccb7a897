"""The one-click keep links' records (reaper/notify/keeplinks.py): which links were used, and the
signing secret the reaper made for itself when ``web.link_secret`` is not configured."""

from __future__ import annotations

import secrets
from datetime import UTC, datetime

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from .db import Database
from .models import KEEP_LINKS, SECRETS, as_utc

LINK_SECRET = "keep-link"


class KeepLinks:
    def __init__(self, db: Database) -> None:
        self.db = db
        self._secret: bytes | None = None

    def secret(self) -> bytes:
        """The keep links' signing key: made once (32 random bytes), then read back; two reapers
        making it at the same moment agree on the first one written."""
        if self._secret is not None:
            return self._secret
        with self.db.read() as s:
            value = s.execute(select(SECRETS.c.value).where(SECRETS.c.name == LINK_SECRET)).scalar()
        if value is None:
            try:
                with self.db.write() as s:
                    s.execute(SECRETS.insert().values(name=LINK_SECRET, value=secrets.token_hex(32),
                                                      created_at=datetime.now(UTC)))
            except IntegrityError:
                pass  # another process made it first: read theirs
            with self.db.read() as s:
                value = s.execute(select(SECRETS.c.value).where(SECRETS.c.name == LINK_SECRET)).scalar_one()
        self._secret = bytes.fromhex(value)
        return self._secret

    def claim(self, link_id: str, *, user: str, server: str, notice_id: int | None, now: datetime) -> bool:
        """Record the link as used; False when it already was (the primary key decides, atomically)."""
        try:
            with self.db.write() as s:
                s.execute(KEEP_LINKS.insert().values(id=link_id, used_at=as_utc(now), user=user, server=server,
                                                     notice_id=notice_id))
        except IntegrityError:
            return False
        return True

    def release(self, link_id: str) -> None:
        """Forget a claim whose keep did not happen (refused by the policy, the server gone)."""
        with self.db.write() as s:
            s.execute(KEEP_LINKS.delete().where(KEEP_LINKS.c.id == link_id))

    def used_at(self, link_id: str) -> datetime | None:
        with self.db.read() as s:
            value: datetime | None = s.execute(
                select(KEEP_LINKS.c.used_at).where(KEEP_LINKS.c.id == link_id)).scalar()
        return value
