"""The build cache, dependency layers and garbage collection, and the artifacts they and functions share.

An artifact (code, a compiled binary, a layer) is stored once per sha256 and referenced by versions and
build-cache rows; ``hold_artifact``/``put_artifact`` are how a new reference keeps it from being
collected by a concurrent delete or ``collect_garbage`` before its transaction commits.
"""

import asyncio
import hashlib
from datetime import datetime, timedelta

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from nimbus.errors import NotFound, StoreError
from nimbus.store import tables
from nimbus.store.database import Database, boundary, upsert_for
from nimbus.store.records import DEFAULT_TENANT, BuildRecord, LayerRecord, utcnow
from nimbus.store.statements import (
    ARTIFACT_PRESENT,
    ARTIFACT_SIZE,
    GET_BUILD,
    LAYER_ASKS,
    LAYER_USERS,
    LIST_LAYERS,
    STILL_USED,
    as_build,
)

HASH_IN_THREAD_BYTES = 1 << 20  # hash larger code off the event loop
ARTIFACT_PUT_TRIES = 3

_v = tables.function_versions
_a = tables.artifacts
_b = tables.builds
_t = tables.artifact_tenants


async def sha256_of(data: bytes) -> str:
    if len(data) > HASH_IN_THREAD_BYTES:
        return await asyncio.to_thread(lambda: hashlib.sha256(data).hexdigest())
    return hashlib.sha256(data).hexdigest()


def check_sha256(what: str, value: str) -> None:
    # SQLite would store a longer or malformed key without complaint; PostgreSQL would refuse it only late.
    if len(value) != 64 or value.strip("0123456789abcdef"):
        raise ValueError(f"{what} must be a lower-case hex sha256 (64 characters), not {value!r}")


async def hold_artifact(conn: AsyncConnection, sha: str) -> int:
    """The size of a stored artifact a new row is about to reference, kept from deletion until commit.

    ``NotFound`` if it is not stored: the caller must ``put_build`` it first.
    """
    size = await conn.scalar(ARTIFACT_SIZE, {"key": sha})
    if size is None:
        raise NotFound(f"artifact {sha!r} not found: store the build with put_build first")
    return int(size)


async def put_artifact(conn: AsyncConnection, sha: str, runtime: str, code: bytes, now: datetime) -> None:
    """Make sure the artifact exists and stays until this transaction commits.

    If a concurrent delete collected it between our look and our insert, we look again.
    """
    insert = upsert_for(conn.dialect.name)(_a).values(
        sha256=sha, runtime=runtime, size=len(code), content=code, created_at=now
    ).on_conflict_do_nothing(index_elements=[_a.c.sha256])
    for _ in range(ARTIFACT_PUT_TRIES):
        if await conn.scalar(ARTIFACT_PRESENT, {"key": sha}) is not None:
            return
        if (await conn.execute(insert)).rowcount == 1:
            return
    raise StoreError(f"artifact {sha} kept disappearing while being stored; try again")


class _LostRace(Exception):
    """Raised inside a write transaction to roll it back: another writer committed the same row first."""


class BuildsMixin(Database):
    """The build cache (``put_build``, ``claim_build``), layers and garbage collection."""

    async def put_build(
        self,
        *,
        key: str,
        runtime: str,
        toolchain: str,
        source_sha256: str,
        artifact: bytes,
        log: str,
        duration_ms: float,
        kind: str = "artifact",
    ) -> BuildRecord:
        """Store a build's artifact (shared with any identical bytes) and its cache row, in one transaction.

        Idempotent: if ``key`` is already there (stored before, or by a concurrent put on any node), that
        row is returned unchanged and nothing new is kept, so the first build of a key is the one every
        deploy gets.
        """
        check_sha256("key", key)
        check_sha256("source_sha256", source_sha256)
        if len(toolchain) > tables.TOOLCHAIN:
            raise ValueError(f"toolchain is {len(toolchain)} characters; at most {tables.TOOLCHAIN} are kept")
        now = utcnow()
        record = BuildRecord(
            key=key, runtime=runtime, toolchain=toolchain, source_sha256=source_sha256,
            artifact_sha256=await sha256_of(artifact), artifact_size=len(artifact), log=log,
            duration_ms=float(duration_ms), created_at=now, kind=kind,
        )
        insert = self._upsert(_b).values(
            key=key, runtime=runtime, toolchain=toolchain, source_sha256=source_sha256,
            artifact_sha256=record.artifact_sha256, log=log, duration_ms=record.duration_ms, created_at=now,
            kind=kind,
        ).on_conflict_do_nothing(index_elements=[_b.c.key])
        with boundary(f"store build {key!r}"):
            try:
                async with self._write() as conn:
                    row = (await conn.execute(GET_BUILD, {"key": key})).first()
                    if row is not None:
                        return as_build(row)
                    await put_artifact(conn, record.artifact_sha256, runtime, artifact, now)
                    if (await conn.execute(insert)).rowcount == 0:
                        # PostgreSQL: a concurrent put of this key committed while we waited on it. Roll
                        # back, so an artifact only our losing build produced is not left behind unused.
                        raise _LostRace
            except _LostRace:
                async with self._read() as conn:
                    row = (await conn.execute(GET_BUILD, {"key": key})).first()
                if row is None:  # the winner's row was pruned in between: nothing sensible to return
                    raise StoreError(f"build {key!r} was removed while being stored; try again") from None
                return as_build(row)
        return record

    async def get_build(self, key: str) -> BuildRecord | None:
        """The cached build under ``key``, or None: a miss is the normal answer, not an error."""
        with boundary(f"read build {key!r}"):
            async with self._read() as conn:
                row = (await conn.execute(GET_BUILD, {"key": key})).first()
        return None if row is None else as_build(row)

    async def claim_build(self, key: str, tenant: str, duration_ms: float) -> float | None:
        """Note that ``tenant`` asked for build ``key`` (its request took ``duration_ms``).

        None when this is the tenant's first request for it (recorded now); otherwise the duration of
        that first request. The build cache is shared by every tenant; whether a tenant had it already
        is only ever told to that tenant (``cached``), so a hit never confirms what another deployed.
        """
        check_sha256("key", key)
        insert = self._upsert(_t).values(
            key=key, tenant=tenant, duration_ms=float(duration_ms), created_at=utcnow(),
        ).on_conflict_do_nothing(index_elements=[_t.c.key, _t.c.tenant])
        with boundary(f"record build {key!r} for tenant {tenant!r}"):
            async with self._write() as conn:
                if (await conn.execute(insert)).rowcount:
                    return None
                first = await conn.scalar(sa.select(_t.c.duration_ms).where(_t.c.key == key, _t.c.tenant == tenant))
                return float(first or 0.0)

    async def list_layers(self, tenant: str | None = DEFAULT_TENANT) -> list[LayerRecord]:
        """Dependency layers, newest first, each with the names of ``tenant``'s functions that mount it.

        A tenant sees the layers its own functions use; ``tenant=None`` (an admin) sees every layer, the
        unused ones too, with every tenant's function names as ``tenant/name``. A tenant sees its own first
        request's time and duration (``claim_build``), not the build's, which another tenant may have run.
        """
        with boundary("list layers"):
            async with self._read() as conn:
                rows = (await conn.execute(LIST_LAYERS)).all()
                users = (await conn.execute(LAYER_USERS)).all()
                asks = {} if tenant is None else {
                    row.artifact_sha256: row for row in (await conn.execute(LAYER_ASKS)).all()
                    if row.tenant == tenant}
        names: dict[str, set[str]] = {}
        for sha, name, owner in users:
            if tenant is None:
                names.setdefault(sha, set()).add(name if owner == DEFAULT_TENANT else f"{owner}/{name}")
            elif owner == tenant:
                names.setdefault(sha, set()).add(name)
        layers = []
        for row in rows:
            if tenant is not None and row.artifact_sha256 not in names:
                continue
            own = asks.get(row.artifact_sha256, row)
            layers.append(LayerRecord(
                sha256=row.artifact_sha256, key=row.key, runtime=row.runtime, platform=row.toolchain, size=row.size,
                log=row.log, duration_ms=own.duration_ms, created_at=own.created_at,
                functions=sorted(names.get(row.artifact_sha256, ()))))
        return layers

    async def collect_garbage(self, *, grace_s: float = 0.0) -> dict[str, int]:
        """Remove build-cache rows (compiled artifacts and layers) that no version uses, then every artifact
        nothing references; only what is older than ``grace_s``, so a deploy between its build and its
        version insert keeps what it just stored. Returns counts of builds, layers, artifacts and bytes freed.
        """
        cutoff = utcnow() - timedelta(seconds=max(0.0, grace_s))
        used = sa.or_(
            sa.select(_v.c.id).where(_v.c.code_sha256 == _b.c.artifact_sha256).exists(),
            sa.select(_v.c.id).where(_v.c.artifact_sha256 == _b.c.artifact_sha256).exists(),
            sa.select(_v.c.id).where(_v.c.layer_sha256 == _b.c.artifact_sha256).exists(),
        )
        with boundary("collect garbage"):
            async with self._write() as conn:
                stale = (await conn.execute(
                    sa.select(_b.c.key, _b.c.kind).where(_b.c.created_at < cutoff, ~used)
                )).all()
                keys = [row.key for row in stale]
                if keys:
                    await conn.execute(_b.delete().where(_b.c.key.in_(keys), ~used))
                candidates = sa.select(_a.c.sha256).where(_a.c.created_at < cutoff, ~STILL_USED)
                # Lock first (a deploy about to reference one holds FOR KEY SHARE: wait for it), then delete
                # in a statement of its own, which sees what that deploy committed.
                shas = list((await conn.scalars(candidates.with_for_update())).all())
                freed = 0
                if shas:
                    freed = int(await conn.scalar(
                        sa.select(sa.func.coalesce(sa.func.sum(_a.c.size), 0)).where(_a.c.sha256.in_(shas))) or 0)
                    result = await conn.execute(_a.delete().where(_a.c.sha256.in_(shas), ~STILL_USED))
                    removed = result.rowcount
                else:
                    removed = 0
        layers = sum(row.kind == "layer" for row in stale)
        return {"builds": len(stale) - layers, "layers": layers, "artifacts": removed, "bytes": freed}

    async def layer_shas(self) -> set[str]:
        """The sha256 of every layer the store still holds (a node keeps only these unpacked)."""
        with boundary("list layers"):
            async with self._read() as conn:
                rows = await conn.scalars(
                    sa.select(_v.c.layer_sha256).where(_v.c.layer_sha256.is_not(None))
                    .union(sa.select(_b.c.artifact_sha256).where(_b.c.kind == "layer"))
                )
                return set(rows.all())
