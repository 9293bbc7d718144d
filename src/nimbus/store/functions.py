"""Functions and their versions: create, update (a new version), read, list and delete.

A function's row holds its name and latest version number; each version holds what runs (runtime,
handler, settings, code and artifact references). ``lookup_function`` caches reads for the invoke path.
"""

from typing import Any

import sqlalchemy as sa
from sqlalchemy import exc as sa_exc
from sqlalchemy.ext.asyncio import AsyncConnection

from nimbus.deployment import ISOLATIONS, SHARED
from nimbus.errors import Conflict, InvalidRequest, NotFound
from nimbus.store import tables
from nimbus.store.builds import hold_artifact, put_artifact, sha256_of
from nimbus.store.changes import ChangesMixin
from nimbus.store.database import boundary, integrity_kind
from nimbus.store.lookups import LookupCache
from nimbus.store.records import (
    DEFAULT_MAX_RETRIES,
    DEFAULT_TENANT,
    FunctionRecord,
    VersionRecord,
    utcnow,
)
from nimbus.store.statements import (
    DEFAULT_LIST_LIMIT,
    FUNCTION_BY_ID,
    GET_CODE,
    GET_FUNCTION,
    GET_VERSION,
    LATEST,
    LOCK_FUNCTION,
    NAME_TAKEN,
    SELECT_LATEST,
    STILL_USED,
    as_function,
    as_version,
    new_id,
)
from nimbus.store.writebehind import WriteBehind

FUNCTION_CACHE_S = 1.0  # how stale the invoke path's function look-up may be for changes made by other nodes
FUNCTION_CACHE_MAX = 10_000

_f = tables.functions
_v = tables.function_versions
_a = tables.artifacts
_i = tables.invocations


class FunctionsMixin(ChangesMixin):
    """Functions and versions; a function's code is an artifact (``nimbus.store.builds``)."""

    # lookup_function's cache, (tenant, key) → record; lookup_qualified's shares it, (tenant, key, qualifier).
    _functions: LookupCache
    _behind: WriteBehind | None

    async def create_function(
        self,
        *,
        name: str,
        runtime: str,
        handler: str,
        env: dict[str, str],
        memory_mb: int,
        timeout_s: float,
        concurrency: int,
        code: bytes,
        code_kind: str,
        tenant: str = DEFAULT_TENANT,
        artifact_sha256: str | None = None,
        max_retries: int = DEFAULT_MAX_RETRIES,
        layer_sha256: str | None = None,
        description: str = "",
        role: str | None = None,
        isolation: str = SHARED,
    ) -> FunctionRecord:
        """Create a function at version 1. ``Conflict`` if the tenant already has one with this name.

        The code is stored once per sha256: functions with identical bytes share one artifact.
        ``artifact_sha256`` (compiled runtimes) names the built artifact the machines run, and
        ``layer_sha256`` the dependency layer they mount, both already stored by ``put_build``;
        ``NotFound`` if there is no such artifact; ``InvalidRequest`` for an unknown ``isolation``.
        """
        _check_isolation(isolation)
        now = utcnow()
        sha = await sha256_of(code)
        record = FunctionRecord(
            id=new_id(), name=name, tenant=tenant, runtime=runtime, handler=handler, env=dict(env),
            memory_mb=memory_mb, timeout_s=float(timeout_s), concurrency=concurrency, version=1,
            version_id=new_id(), code_sha256=sha, code_size=len(code), code_kind=code_kind, created_at=now,
            updated_at=now, artifact_sha256=artifact_sha256, max_retries=max_retries, layer_sha256=layer_sha256,
            description=description, role=role, isolation=isolation,
        )
        with boundary(f"create function {name!r}"):
            async with self._write() as conn:
                # Checked first so a taken name does not cost an upload of the code.
                if await conn.scalar(NAME_TAKEN, {"tenant": tenant, "key": name}) is not None:
                    raise Conflict(f"function {name!r} already exists")
                if artifact_sha256 is not None:
                    record.artifact_size = await hold_artifact(conn, artifact_sha256)
                if layer_sha256 is not None:
                    await hold_artifact(conn, layer_sha256)
                await put_artifact(conn, sha, runtime, code, now)
                try:
                    await conn.execute(
                        _f.insert(),
                        {"id": record.id, "tenant": tenant, "name": name, "version": 1, "created_at": now,
                         "updated_at": now},
                    )
                except sa_exc.IntegrityError as exc:
                    if integrity_kind(exc) == "unique":  # created by someone else since the check
                        raise Conflict(f"function {name!r} already exists") from None
                    raise
                await conn.execute(_v.insert(), _version_row(record))
        return record

    async def update_function(
        self,
        name_or_id: str,
        *,
        tenant: str = DEFAULT_TENANT,
        code: bytes | None = None,
        code_kind: str | None = None,
        runtime: str | None = None,
        handler: str | None = None,
        env: dict[str, str] | None = None,
        memory_mb: int | None = None,
        timeout_s: float | None = None,
        concurrency: int | None = None,
        artifact_sha256: str | None = None,
        max_retries: int | None = None,
        layer_sha256: str | None = None,
        description: str | None = None,
        role: str | None = None,
        isolation: str | None = None,
    ) -> FunctionRecord:
        """Make version N+1 from the latest, with the given code and settings changed. ``NotFound``.

        The built artifact goes with the code: new code runs ``artifact_sha256`` (None: it is interpreted),
        no new code keeps the latest version's artifact, unless ``artifact_sha256`` names a new one (the
        same source rebuilt, say for another toolchain). The dependency layer goes with the code the same
        way. A named artifact or layer must exist (``put_build``), else ``NotFound``.
        """
        if isolation is not None:
            _check_isolation(isolation)
        now = utcnow()
        sha = await sha256_of(code) if code is not None else None
        with boundary(f"update function {name_or_id!r}"):
            async with self._write() as conn:
                function_id = await self._lock_function(conn, name_or_id, tenant)
                current = as_function((await conn.execute(FUNCTION_BY_ID, {"key": function_id})).one())
                if artifact_sha256 is not None:
                    built: tuple[str | None, int | None] = (
                        artifact_sha256, await hold_artifact(conn, artifact_sha256))
                elif code is not None:
                    built = (None, None)
                else:
                    # Nothing to lock: the current version references it, and we hold the function's lock.
                    built = (current.artifact_sha256, current.artifact_size)
                if layer_sha256 is not None:
                    await hold_artifact(conn, layer_sha256)
                    layer: str | None = layer_sha256
                else:
                    layer = None if code is not None else current.layer_sha256
                record = FunctionRecord(
                    id=current.id, name=current.name, tenant=current.tenant,
                    runtime=runtime if runtime is not None else current.runtime,
                    handler=handler if handler is not None else current.handler,
                    env=dict(env) if env is not None else current.env,
                    memory_mb=memory_mb if memory_mb is not None else current.memory_mb,
                    timeout_s=float(timeout_s) if timeout_s is not None else current.timeout_s,
                    concurrency=concurrency if concurrency is not None else current.concurrency,
                    version=current.version + 1, version_id=new_id(),
                    code_sha256=sha if sha is not None else current.code_sha256,
                    code_size=len(code) if code is not None else current.code_size,
                    code_kind=code_kind if code_kind is not None else current.code_kind,
                    created_at=current.created_at, updated_at=now,
                    artifact_sha256=built[0], artifact_size=built[1],
                    max_retries=max_retries if max_retries is not None else current.max_retries,
                    layer_sha256=layer,
                    description=description if description is not None else current.description,
                    role=role if role is not None else current.role,
                    isolation=isolation if isolation is not None else current.isolation,
                )
                if code is not None:
                    await put_artifact(conn, record.code_sha256, record.runtime, code, now)
                await conn.execute(_v.insert(), _version_row(record))
                await conn.execute(
                    _f.update().where(_f.c.id == record.id).values(version=record.version, updated_at=now)
                )
        # This node sees its own change at once; the others retire their $LATEST machines of it.
        await self._announce("function", id=record.id, version_id=record.version_id)
        return record

    async def get_function(self, name_or_id: str, tenant: str = DEFAULT_TENANT) -> FunctionRecord:
        """The function (at its latest version) by name or id. ``NotFound``."""
        with boundary(f"read function {name_or_id!r}"):
            async with self._read() as conn:
                row = (await conn.execute(GET_FUNCTION, {"key": name_or_id, "tenant": tenant})).first()
        if row is None:
            raise _not_found(name_or_id)
        return as_function(row)

    async def lookup_function(self, name_or_id: str, tenant: str = DEFAULT_TENANT) -> FunctionRecord:
        """``get_function`` through a short-lived cache, for the invoke path: the look-up was the biggest
        share of a warm call's CPU. Writes through this store clear it at once; a change made by another
        node is seen within ``function_cache_s``. The record is shared: callers must not change it."""
        key = (tenant, name_or_id)
        known, fn = self._functions.peek(key)  # a hit builds no closure and no coroutine
        if not known:
            fn = await self._functions.get(key, lambda: self.get_function(name_or_id, tenant))
        return fn

    async def list_functions(
        self,
        *,
        tenant: str = DEFAULT_TENANT,
        runtime: str | None = None,
        limit: int = DEFAULT_LIST_LIMIT,
        offset: int = 0,
    ) -> tuple[list[FunctionRecord], int]:
        """One page of the tenant's functions ordered by name, and how many there are in all."""
        where = [_f.c.tenant == tenant]
        if runtime is not None:
            where.append(_v.c.runtime == runtime)
        with boundary("list functions"):
            async with self._read() as conn:
                rows = (await conn.execute(
                    SELECT_LATEST.where(*where).order_by(_f.c.name).limit(max(limit, 0)).offset(max(offset, 0))
                )).all()
                total = await conn.scalar(sa.select(sa.func.count()).select_from(LATEST).where(*where))
        return [as_function(row) for row in rows], int(total or 0)

    async def delete_function(self, name_or_id: str, tenant: str = DEFAULT_TENANT) -> FunctionRecord:
        """Delete a function, its versions and invocations, and any artifact nothing else uses.

        Returns the function as it was. ``NotFound``.
        """
        with boundary(f"delete function {name_or_id!r}"):
            async with self._write() as conn:
                function_id = await self._lock_function(conn, name_or_id, tenant)
                if self._behind is not None:
                    # Rows not sent yet go with it; one in a flush now either commits first (and is
                    # deleted here) or finds the function gone and is dropped.
                    self._behind.forget_function(function_id)
                record = as_function((await conn.execute(FUNCTION_BY_ID, {"key": function_id})).one())
                rows = (await conn.execute(
                    sa.select(_v.c.code_sha256, _v.c.artifact_sha256, _v.c.layer_sha256)
                    .where(_v.c.function_id == function_id)
                )).all()
                shas = sorted({sha for row in rows for sha in row if sha is not None})
                await conn.execute(_i.delete().where(_i.c.function_id == function_id))
                await conn.execute(tables.aliases.delete().where(tables.aliases.c.function_id == function_id))
                await conn.execute(_v.delete().where(_v.c.function_id == function_id))
                await conn.execute(_f.delete().where(_f.c.id == function_id))
                # Lock the candidates first, in a statement of its own: a concurrent create or put_build
                # that is about to reference one holds FOR KEY SHARE on it, so this waits for it to commit,
                # and the DELETE below (a new snapshot) then sees its row and keeps the artifact.
                await conn.execute(sa.select(_a.c.sha256).where(_a.c.sha256.in_(shas)).with_for_update())
                # A build row keeps its artifact too: the cache outlives the function (`nimbus gc` prunes it).
                await conn.execute(_a.delete().where(_a.c.sha256.in_(shas), ~STILL_USED))
        await self._announce("function_deleted", id=function_id)  # every node retires its machines
        return record

    async def get_version(self, version_id: str) -> VersionRecord:
        """One version by its id (what an invocation records). ``NotFound``."""
        with boundary(f"read version {version_id!r}"):
            async with self._read() as conn:
                row = (await conn.execute(GET_VERSION, {"key": version_id})).first()
        if row is None:
            raise NotFound(f"version {version_id!r} not found")
        return as_version(row)

    async def get_code(self, sha256: str) -> bytes:
        """The code bytes stored under this hash. ``NotFound``."""
        with boundary(f"read artifact {sha256!r}"):
            async with self._read() as conn:
                content = await conn.scalar(GET_CODE, {"key": sha256})
        if content is None:
            raise NotFound(f"artifact {sha256!r} not found")
        return bytes(content)

    async def _lock_function(self, conn: AsyncConnection, key: str, tenant: str) -> str:
        """The id of the function ``key`` names, locked for this transaction (PostgreSQL). ``NotFound``."""
        function_id = await conn.scalar(LOCK_FUNCTION, {"key": key, "tenant": tenant})
        if function_id is None:
            raise _not_found(key)
        return function_id


def _not_found(key: str) -> NotFound:
    return NotFound(f"function {key!r} not found")


def _check_isolation(isolation: str) -> None:
    """The gateway checks it too; this keeps any other caller from storing a value no pool understands."""
    if isolation not in ISOLATIONS:
        raise InvalidRequest(f"isolation {str(isolation)[:40]!r} must be one of {', '.join(ISOLATIONS)}")


def _version_row(record: FunctionRecord) -> dict[str, Any]:
    """The function_versions row of a record's latest version."""
    return {
        "id": record.version_id, "function_id": record.id, "version": record.version, "runtime": record.runtime,
        "handler": record.handler, "env": record.env, "memory_mb": record.memory_mb,
        "timeout_s": record.timeout_s, "concurrency": record.concurrency, "code_sha256": record.code_sha256,
        "code_size": record.code_size, "code_kind": record.code_kind, "created_at": record.updated_at,
        "artifact_sha256": record.artifact_sha256, "max_retries": record.max_retries,
        "layer_sha256": record.layer_sha256, "published": None, "description": record.description,
        "role": record.role, "isolation": record.isolation,
    }
