"""Function URLs: which functions (and aliases) answer plain HTTP at ``/fn/…``, and how (gateway/urls.py).

Served requests look their config up through a short-lived cache, like ``lookup_function``: a hot URL call
then costs no more database round trips than an ``/api/v1`` invoke. Writes through this store clear it.
"""



import orjson
import sqlalchemy as sa

from nimbus.errors import NotFound
from nimbus.store import tables
from nimbus.store.changes import ChangesMixin
from nimbus.store.database import boundary
from nimbus.store.lookups import LookupCache
from nimbus.store.records import FunctionUrlRecord, utcnow

_u = tables.function_urls
_f = tables.functions
URL_CACHE_MAX = 10_000


class UrlsMixin(ChangesMixin):
    """Put, get, delete and look up function URL configs."""

    _url_cache: LookupCache
    _functions: LookupCache  # the store's function look-ups: the URL cache keeps the same time

    def _record(self, row) -> FunctionUrlRecord:
        return FunctionUrlRecord(function_id=row.function_id, function_name=row.name, tenant=row.tenant,
                                 qualifier=row.qualifier, auth=row.auth, cors=orjson.loads(row.cors),
                                 created_at=row.created_at, updated_at=row.updated_at)

    async def put_function_url(self, name: str, tenant: str, qualifier: str, *, auth: str,
                               cors: dict) -> tuple[FunctionUrlRecord, bool]:
        """Create or replace the URL config of ``name`` (``qualifier`` '' or an alias); whether it is new."""
        fn = await self.get_function(name, tenant)  # type: ignore[attr-defined]
        now = utcnow()
        values = {"auth": auth, "cors": orjson.dumps(cors).decode(), "updated_at": now}
        with boundary(f"put the URL of {name!r}"):
            async with self._write() as conn:
                done = await conn.execute(_u.update().where(_u.c.function_id == fn.id, _u.c.qualifier == qualifier)
                                          .values(**values))
                created = done.rowcount == 0
                if created:
                    await conn.execute(_u.insert(), {**values, "function_id": fn.id, "qualifier": qualifier,
                                                     "tenant": tenant, "created_at": now})
        await self._announce("routes")
        return await self.get_function_url(name, tenant, qualifier), created

    async def get_function_url(self, name: str, tenant: str, qualifier: str) -> FunctionUrlRecord:
        """The URL config. ``NotFound`` for an unknown function or one without a URL for ``qualifier``."""
        with boundary(f"get the URL of {name!r}"):
            async with self._read() as conn:
                row = (await conn.execute(
                    sa.select(_u, _f.c.name).join(_f, _f.c.id == _u.c.function_id)
                    .where(_f.c.name == name, _f.c.tenant == tenant, _u.c.qualifier == qualifier)
                )).first()
        if row is None:
            shown = f"{name}:{qualifier}" if qualifier else name
            raise NotFound(f"function {shown!r} has no URL")
        return self._record(row)

    async def delete_function_url(self, name: str, tenant: str, qualifier: str) -> None:
        """Remove the URL config; ``NotFound`` if there is none."""
        fn = await self.get_function(name, tenant)  # type: ignore[attr-defined]
        with boundary(f"delete the URL of {name!r}"):
            async with self._write() as conn:
                done = await conn.execute(_u.delete().where(_u.c.function_id == fn.id, _u.c.qualifier == qualifier))
        await self._announce("routes")
        if done.rowcount == 0:
            shown = f"{name}:{qualifier}" if qualifier else name
            raise NotFound(f"function {shown!r} has no URL")

    async def lookup_function_url(self, name: str, tenant: str, qualifier: str) -> FunctionUrlRecord:
        """``get_function_url`` through a cache of ``function_cache_s``; misses (``NotFound``) are cached too,
        so requests for a name without a URL cannot each cost a query."""

        async def read() -> FunctionUrlRecord | NotFound:
            try:
                return await self.get_function_url(name, tenant, qualifier)
            except NotFound as exc:
                return exc

        found = await self._url_cache_get().get((tenant, name, qualifier), read)
        if isinstance(found, NotFound):
            raise NotFound(str(found))
        return found

    def _url_cache_get(self) -> LookupCache:
        try:
            return self._url_cache
        except AttributeError:
            self._url_cache = LookupCache(self._functions.ttl_s, URL_CACHE_MAX)
            return self._url_cache

    def clear_caches(self) -> None:
        super().clear_caches()
        self._url_cache_get().clear()
