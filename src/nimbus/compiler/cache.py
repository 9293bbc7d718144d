"""Where built artifacts are kept by cache key: the node's store, or memory (tests, and a store-less fallback)."""

from __future__ import annotations

import dataclasses
import logging
from collections import OrderedDict
from typing import Any, Protocol, runtime_checkable

from nimbus.compiler.base import Build
from nimbus.errors import NotFound

log = logging.getLogger("nimbus.compiler")

DEFAULT_MEMORY_ENTRIES = 128


@runtime_checkable
class Cache(Protocol):
    """Builds by key. ``get`` answers a hit with ``cached=True``; ``put`` must be durable before it returns.

    ``put`` may return the build the cache already held under that key (another node's concurrent build
    won): the compiler then hands out that one, whose artifact is the one stored. None means ``build`` itself.

    ``claim`` records that ``tenant`` asked for ``key`` and says whether it had before: None on its first
    request (recorded with ``duration_ms``), else that first request's duration. The artifact is shared
    across tenants; the fact that it was already there is told only to a tenant that asked for it before.
    """

    async def get(self, key: str) -> Build | None: ...

    async def put(self, build: Build) -> Build | None: ...

    async def claim(self, key: str, tenant: str, duration_ms: float) -> float | None: ...


class MemoryCache:
    """An in-process LRU of builds (at most ``max_entries``); counts its hits and misses."""

    def __init__(self, max_entries: int = DEFAULT_MEMORY_ENTRIES) -> None:
        self.max_entries = max_entries
        self._builds: OrderedDict[str, Build] = OrderedDict()
        self._tenants: dict[str, dict[str, float]] = {}  # key → tenant → its first request's duration
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._builds)

    async def get(self, key: str) -> Build | None:
        build = self._builds.get(key)
        if build is None:
            self.misses += 1
            return None
        self._builds.move_to_end(key)
        self.hits += 1
        return dataclasses.replace(build, cached=True)

    async def put(self, build: Build) -> Build | None:
        self._builds[build.key] = dataclasses.replace(build, cached=False)
        self._builds.move_to_end(build.key)
        while len(self._builds) > self.max_entries:
            key, _ = self._builds.popitem(last=False)
            self._tenants.pop(key, None)
        return None

    async def claim(self, key: str, tenant: str, duration_ms: float) -> float | None:
        asked = self._tenants.setdefault(key, {})
        if tenant in asked:
            return asked[tenant]
        asked[tenant] = duration_ms
        return None


class StoreCache:
    """Builds kept in the node's store: the build record by key, the artifact bytes by their sha256.

    ``put`` is also what stores the artifact the function version will point at, so its errors propagate.
    A record whose artifact bytes are gone counts as a miss (the build runs again and stores them anew).
    """

    def __init__(self, store: Any) -> None:
        self.store = store

    async def get(self, key: str) -> Build | None:
        record = await self.store.get_build(key)
        if record is None:
            return None
        try:
            artifact = await self.store.get_code(record.artifact_sha256)
        except NotFound:
            log.warning("build %s: its artifact %s is missing from the store; building again", key,
                        record.artifact_sha256)
            return None
        return Build(
            key=record.key,
            runtime=record.runtime,
            toolchain=record.toolchain,
            artifact=artifact,
            artifact_sha256=record.artifact_sha256,
            log=record.log,
            duration_ms=record.duration_ms,
            cached=True,
            source_sha256=record.source_sha256,
            kind=record.kind,
        )

    async def put(self, build: Build) -> Build | None:
        record = await self.store.put_build(
            key=build.key,
            runtime=build.runtime,
            toolchain=build.toolchain,
            source_sha256=build.source_sha256,
            artifact=build.artifact,
            log=build.log,
            duration_ms=build.duration_ms,
            kind=build.kind,
        )
        if record.artifact_sha256 == build.artifact_sha256:
            return None
        # The key was stored first by another build (put_build keeps the first): only its artifact is stored.
        # Ours ran for this request all the same: it is reported as built, with its own log and duration.
        return dataclasses.replace(build, artifact=await self.store.get_code(record.artifact_sha256),
                                   artifact_sha256=record.artifact_sha256)

    async def claim(self, key: str, tenant: str, duration_ms: float) -> float | None:
        return await self.store.claim_build(key, tenant, duration_ms)


__all__ = ["Cache", "MemoryCache", "StoreCache"]
