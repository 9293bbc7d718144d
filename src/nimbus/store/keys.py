"""API keys: stored by hash (the key itself never is), looked up on every authenticated request.

A key made for the Lambda API also has a SigV4 secret, which is stored as it is: SigV4 is an HMAC, so the
server must hold the secret to recompute a signature (docs/security.md). It is read only by
``get_sigv4_key``; every other read leaves it out, so no record that travels elsewhere carries it.
"""


import sqlalchemy as sa
from sqlalchemy import exc as sa_exc

from nimbus.errors import Conflict, NotFound
from nimbus.store import tables
from nimbus.store.changes import ChangesMixin
from nimbus.store.database import boundary, integrity_kind
from nimbus.store.records import ApiKeyRecord, utcnow
from nimbus.store.statements import as_api_key, new_id

_k = tables.api_keys
_PUBLIC = [c for c in _k.c if c.name != "secret"]  # what records carry: never the secret


class KeysMixin(ChangesMixin):
    """Create, look up, list and revoke API keys."""


    async def create_api_key(self, *, tenant: str, name: str, key_hash: str, admin: bool = False,
                             prefix: str = "", secret: str | None = None) -> ApiKeyRecord:
        """Store a new key by its hash and display prefix (the key itself is never stored).

        ``Conflict`` if the hash exists.
        """
        record = ApiKeyRecord(id=new_id(), tenant=tenant, name=name, key_hash=key_hash, created_at=utcnow(),
                              admin=admin, prefix=prefix)
        with boundary(f"create API key {name!r}"):
            async with self._write() as conn:
                try:
                    await conn.execute(
                        _k.insert(),
                        {"id": record.id, "tenant": tenant, "name": name, "key_hash": key_hash,
                         "created_at": record.created_at, "revoked_at": None, "admin": admin, "prefix": prefix,
                         "secret": secret},
                    )
                except sa_exc.IntegrityError as exc:
                    if integrity_kind(exc) == "unique":
                        raise Conflict("an API key with this hash already exists") from None
                    raise
        return record

    async def get_api_key_by_hash(self, key_hash: str) -> ApiKeyRecord:
        """The live key with this hash. ``NotFound`` if there is none or it was revoked."""
        with boundary("look up an API key"):
            async with self._read() as conn:
                row = (await conn.execute(
                    sa.select(*_PUBLIC).where(_k.c.key_hash == key_hash, _k.c.revoked_at.is_(None))
                )).first()
        if row is None:
            raise NotFound("no such API key")
        return as_api_key(row)

    async def get_sigv4_key(self, id: str) -> tuple[ApiKeyRecord, str]:  # noqa: A002
        """The live key with this id (the SigV4 access key id) and its secret. ``NotFound`` if there is
        none, it was revoked, or it was made without a secret."""
        with boundary("look up an access key"):
            async with self._read() as conn:
                row = (await conn.execute(
                    sa.select(*_PUBLIC, _k.c.secret).where(_k.c.id == id, _k.c.revoked_at.is_(None))
                )).first()
        if row is None or row.secret is None:
            raise NotFound("no such access key")
        values = dict(row._mapping)
        secret = values.pop("secret")
        return ApiKeyRecord(**values), secret

    async def get_api_key(self, id: str) -> ApiKeyRecord:  # noqa: A002
        """One key by id, revoked or not. ``NotFound``."""
        with boundary(f"get API key {id!r}"):
            async with self._read() as conn:
                row = (await conn.execute(sa.select(*_PUBLIC).where(_k.c.id == id))).first()
        if row is None:
            raise NotFound(f"API key {id!r} not found")
        return as_api_key(row)

    async def list_api_keys(self, *, tenant: str | None = None, admin: bool | None = None, live: bool = False,
                            limit: int | None = None) -> list[ApiKeyRecord]:
        """Keys oldest first: of one tenant or all, admin or not or both, revoked ones unless ``live``."""
        query = sa.select(*_PUBLIC).order_by(_k.c.created_at, _k.c.id)
        if tenant is not None:
            query = query.where(_k.c.tenant == tenant)
        if admin is not None:
            query = query.where(_k.c.admin == admin)
        if live:
            query = query.where(_k.c.revoked_at.is_(None))
        if limit is not None:
            query = query.limit(limit)
        with boundary("list API keys"):
            async with self._read() as conn:
                rows = (await conn.execute(query)).all()
        return [as_api_key(row) for row in rows]

    async def revoke_api_key(self, id: str) -> ApiKeyRecord:  # noqa: A002
        """Revoke a key (revoking twice keeps the first time). Returns it. ``NotFound``."""
        with boundary(f"revoke API key {id!r}"):
            async with self._write() as conn:
                await conn.execute(
                    _k.update().where(_k.c.id == id, _k.c.revoked_at.is_(None)).values(revoked_at=utcnow())
                )
                row = (await conn.execute(sa.select(*_PUBLIC).where(_k.c.id == id))).first()
        if row is None:
            raise NotFound(f"API key {id!r} not found")
        await self._announce("key", key_hash=row.key_hash)  # every node's guard forgets it at once
        return as_api_key(row)
