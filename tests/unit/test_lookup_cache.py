"""The invoke path's look-up cache: one read in flight per key, and a clear that wins over a read."""

import asyncio

import pytest

from nimbus.store.lookups import LookupCache


class Reader:
    """A read that waits until released, counting how often it was started."""

    def __init__(self, value="v1") -> None:
        self.calls = 0
        self.value = value
        self.release = asyncio.Event()

    async def __call__(self):
        self.calls += 1
        await self.release.wait()
        if isinstance(self.value, Exception):
            raise self.value
        return self.value


async def test_concurrent_misses_share_one_read():
    cache, read = LookupCache(60, 100), Reader()
    waiters = [asyncio.create_task(cache.get("k", read)) for _ in range(32)]
    await asyncio.sleep(0)
    read.release.set()
    assert await asyncio.gather(*waiters) == ["v1"] * 32
    assert read.calls == 1
    assert await cache.get("k", read) == "v1" and read.calls == 1  # then a hit


async def test_an_expired_entry_is_read_again_once():
    cache, read = LookupCache(0.01, 100), Reader()
    read.release.set()
    assert await cache.get("k", read) == "v1"
    await asyncio.sleep(0.02)
    read.value = "v2"
    assert await asyncio.gather(*(cache.get("k", read) for _ in range(8))) == ["v2"] * 8
    assert read.calls == 2


async def test_an_error_reaches_every_waiter_and_is_not_kept():
    cache, read = LookupCache(60, 100), Reader(LookupError("gone"))
    waiters = [asyncio.create_task(cache.get("k", read)) for _ in range(4)]
    await asyncio.sleep(0)
    read.release.set()
    results = await asyncio.gather(*waiters, return_exceptions=True)
    assert all(isinstance(r, LookupError) for r in results) and read.calls == 1
    read.value = "back"
    assert await cache.get("k", read) == "back" and read.calls == 2


async def test_a_clear_during_a_read_keeps_what_it_found_out_of_the_cache():
    cache, read = LookupCache(60, 100), Reader("before the write")
    first = asyncio.create_task(cache.get("k", read))
    await asyncio.sleep(0)
    cache.clear()  # a write on this node while the read was in flight
    later = Reader("after the write")
    later.release.set()
    assert await cache.get("k", later) == "after the write"  # not joined to the older read
    read.release.set()
    assert await first == "before the write"
    assert await cache.get("k", Reader("unused")) == "after the write"


async def test_a_waiter_that_goes_away_does_not_cancel_the_read():
    cache, read = LookupCache(60, 100), Reader()
    gone = asyncio.create_task(cache.get("k", read))
    stays = asyncio.create_task(cache.get("k", read))
    await asyncio.sleep(0)
    gone.cancel()
    read.release.set()
    assert await stays == "v1"
    with pytest.raises(asyncio.CancelledError):
        await gone


async def test_no_caching_with_a_zero_ttl_and_a_bounded_size():
    read = Reader()
    read.release.set()
    uncached = LookupCache(0, 100)
    for _ in range(3):
        await uncached.get("k", read)
    assert read.calls == 3 and len(uncached) == 0
    small = LookupCache(60, 4)
    for i in range(10):
        await small.get(i, read)
    assert len(small) <= 4


async def test_forget_drops_the_matching_entries_and_the_reads_in_flight():
    cache, read = LookupCache(60, 100), Reader()
    read.release.set()
    await cache.get("a", read)
    await cache.get("b", read)
    slow = Reader("stale")
    pending = asyncio.create_task(cache.get("c", slow))
    await asyncio.sleep(0)
    cache.forget(lambda key, value: key == "a")
    assert cache.peek("a") == (False, None) and cache.peek("b") == (True, "v1")
    slow.release.set()
    assert await pending == "stale"
    assert cache.peek("c") == (False, None)  # read before the forget: not stored


async def test_api_keys_missed_together_are_read_once_and_a_revoked_key_is_forgotten():
    """The auth guard's key cache: a burst of requests with one uncached key costs one query."""
    from nimbus.gateway.auth import Guard, Principal

    class Store:
        reads = 0

        async def get_api_key_by_hash(self, key_hash):
            Store.reads += 1
            await asyncio.sleep(0.01)
            return type("Key", (), {"id": "k1", "tenant": "t", "admin": False, "key_hash": key_hash})()

    guard, store = Guard(), Store()
    who = await asyncio.gather(*(guard.look_up(store, "h1") for _ in range(16)))
    assert Store.reads == 1 and set(who) == {Principal(key_id="k1", tenant="t", admin=False)}
    assert guard.cached("h1") == (True, who[0])
    guard.forget("h1")
    assert guard.cached("h1") == (False, None)
