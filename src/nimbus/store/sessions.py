"""Console sessions: a login opened with an API key, stored by the hash of its cookie's token.

A session is valid while it has not expired and its key is not revoked: the look-up joins the key, so
revoking a key (on any node) ends its sessions at once, with no notice to send. Each key keeps at most
``SESSIONS_PER_KEY`` sessions (a login past that ends the oldest), and expired ones are deleted by the
next login, so a key holder cannot grow the table without bound.
"""

from datetime import datetime, timedelta

import sqlalchemy as sa

from nimbus.store import tables
from nimbus.store.database import Database, boundary
from nimbus.store.records import ApiKeyRecord, utcnow
from nimbus.store.statements import as_api_key

_s = tables.console_sessions
_k = tables.api_keys
_KEY_COLUMNS = [c for c in _k.c if c.name != "secret"]
SESSIONS_PER_KEY = 20


class SessionsMixin(Database):
    """Open, look up and end console sessions."""

    async def open_console_session(self, token_hash: str, key_id: str, lifetime_s: float) -> datetime:
        """Store a new session for ``key_id``; returns when it expires. Ends expired sessions, and this
        key's oldest ones past ``SESSIONS_PER_KEY``."""
        now = utcnow()
        expires = now + timedelta(seconds=lifetime_s)
        with boundary("open a console session"):
            async with self._write() as conn:
                await conn.execute(_s.delete().where(_s.c.expires_at <= now))
                kept = (sa.select(_s.c.token_hash).where(_s.c.key_id == key_id)
                        .order_by(_s.c.created_at.desc()).limit(SESSIONS_PER_KEY - 1))
                await conn.execute(_s.delete().where(_s.c.key_id == key_id, _s.c.token_hash.not_in(kept)))
                await conn.execute(_s.insert(), {"token_hash": token_hash, "key_id": key_id, "created_at": now,
                                                 "expires_at": expires})
        return expires

    async def console_session_key(self, token_hash: str) -> ApiKeyRecord | None:
        """The live key behind a live session; None when the session is unknown, expired or its key revoked."""
        query = (sa.select(*_KEY_COLUMNS).select_from(_s.join(_k, _k.c.id == _s.c.key_id))
                 .where(_s.c.token_hash == token_hash, _s.c.expires_at > utcnow(), _k.c.revoked_at.is_(None)))
        with boundary("look up a console session"):
            async with self._read() as conn:
                row = (await conn.execute(query)).first()
        return None if row is None else as_api_key(row)

    async def close_console_session(self, token_hash: str) -> None:
        """End a session (logging out); ending an unknown one does nothing."""
        with boundary("close a console session"):
            async with self._write() as conn:
                await conn.execute(_s.delete().where(_s.c.token_hash == token_hash))
