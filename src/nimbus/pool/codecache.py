"""The code a machine is initialised with, cached by bytes in front of the store.

It lives with the pool because the pool is its only caller: every warm and cold start sends the code
(``Pool(code_loader=CodeCache(...).load)``); the store is reached only through ``get_code``.
"""

import asyncio
from collections import OrderedDict
from collections.abc import Awaitable, Callable

from nimbus import packages
from nimbus.deployment import Deployment

CODE_CACHE_BYTES = 256 << 20  # the code cache's default budget (the code_cache_mb setting)


class CodeCache:
    """An LRU of what Init sends, in front of the store: every warm and cold start needs the code.

    Bounded by bytes, not entries: a package may be tens of MiB, so 128 of them could hold GiBs. One
    bigger than the whole budget is loaded for each start and never kept. A package is kept as
    ``packages.to_machine`` makes it (a small one's tree, a big one's zip), converted once per version;
    starts that miss the cache together share one load.
    """

    def __init__(self, get_code: Callable[[str], Awaitable[bytes]], max_bytes: int = CODE_CACHE_BYTES) -> None:
        self.get_code = get_code
        self.max_bytes = max_bytes
        self.size = 0
        self._code: OrderedDict[str, bytes] = OrderedDict()
        self._loading: dict[str, asyncio.Future] = {}

    def __len__(self) -> int:
        return len(self._code)

    def __contains__(self, sha256: str) -> bool:
        return sha256 in self._code

    async def load(self, dep: Deployment) -> bytes:
        key = dep.code_sha256
        code = self._code.get(key)
        if code is not None:
            self._code.move_to_end(key)
            return code
        loading = self._loading.get(key)
        if loading is None:
            loading = self._loading[key] = asyncio.ensure_future(self._fetch(dep))
            loading.add_done_callback(lambda done: self._loaded(key, done))
        return await asyncio.shield(loading)  # a cancelled start leaves the load to the others

    def _loaded(self, key: str, loading: asyncio.Future) -> None:
        del self._loading[key]
        if not loading.cancelled():
            loading.exception()  # retrieved: each start that waited has raised it already

    async def _fetch(self, dep: Deployment) -> bytes:
        code = await self.get_code(dep.code_sha256)
        if dep.package:
            code = await asyncio.to_thread(packages.to_machine, code)
        if len(code) <= self.max_bytes and dep.code_sha256 not in self._code:
            self._code[dep.code_sha256] = code
            self.size += len(code)
            while self.size > self.max_bytes:
                _, evicted = self._code.popitem(last=False)
                self.size -= len(evicted)
        return code
