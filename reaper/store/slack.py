"""The Slack channel's persistent cache of users.lookupByEmail answers (see reaper/notify/slack.py:
it survives restarts, so a sweep of 10,000 notices does not look every user up again)."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import select

from .db import Database
from .models import SLACK_LOOKUPS, as_utc


class SlackLookups:
    def __init__(self, db: Database) -> None:
        self.db = db

    def lookup(self, email: str, now: datetime) -> tuple[bool, str | None]:
        """(True, member id or None for "not on Slack") while a cached answer is fresh, else (False, None)."""
        now = as_utc(now)
        with self.db.read() as s:
            row = s.execute(
                select(SLACK_LOOKUPS.c.user_id, SLACK_LOOKUPS.c.expires_at).where(SLACK_LOOKUPS.c.email == email)
            ).first()
        if row is None or row.expires_at <= now:
            return False, None
        return True, row.user_id

    def remember(self, email: str, user_id: str | None, expires_at: datetime) -> None:
        expires_at = as_utc(expires_at)
        with self.db.write() as s:
            s.execute(SLACK_LOOKUPS.delete().where(SLACK_LOOKUPS.c.email == email))
            s.execute(SLACK_LOOKUPS.insert().values(email=email, user_id=user_id, expires_at=expires_at))
