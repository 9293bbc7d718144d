"""FunctionSlots: a function's concurrency limit holds over all its versions, whatever their limits."""

import asyncio

from nimbus.scheduler.calls import FunctionSlots


async def _run(slots, function_id, limit, running, peak, release):
    async with slots.slot(function_id, limit):
        running[0] += 1
        peak[0] = max(peak[0], running[0])
        await release.wait()
        running[0] -= 1


async def test_versions_with_different_limits_never_run_past_the_calling_versions_limit():
    """The old per-function semaphore was replaced when a call with another limit came: alternating
    versions with limits 1 and 2 then ran 4 at once. Now a call waits while its function runs `limit`."""
    slots, running, peak, release = FunctionSlots(), [0], [0], asyncio.Event()
    tasks = [asyncio.create_task(_run(slots, "f", 1 if i % 2 else 2, running, peak, release)) for i in range(8)]
    await asyncio.sleep(0.05)
    assert running[0] == 2 and slots.running("f") == 2
    release.set()
    await asyncio.gather(*tasks)
    assert peak[0] <= 2 and slots.running("f") == 0
    assert not slots._entries  # an idle function holds nothing


async def test_one_limit_admits_exactly_that_many_and_the_rest_follow():
    slots, running, peak, release = FunctionSlots(), [0], [0], asyncio.Event()
    tasks = [asyncio.create_task(_run(slots, "g", 3, running, peak, release)) for _ in range(10)]
    await asyncio.sleep(0.05)
    assert running[0] == 3
    release.set()
    await asyncio.gather(*tasks)
    assert peak[0] == 3


async def test_functions_do_not_share_slots():
    slots, release = FunctionSlots(), asyncio.Event()
    running_a, running_b, peak = [0], [0], [0]
    tasks = [asyncio.create_task(_run(slots, "a", 1, running_a, peak, release)),
             asyncio.create_task(_run(slots, "b", 1, running_b, peak, release))]
    await asyncio.sleep(0.05)
    assert running_a[0] == running_b[0] == 1
    release.set()
    await asyncio.gather(*tasks)


async def test_a_cancelled_waiter_leaves_no_count_behind():
    slots, running, peak, release = FunctionSlots(), [0], [0], asyncio.Event()
    holder = asyncio.create_task(_run(slots, "h", 1, running, peak, release))
    await asyncio.sleep(0.01)
    waiter = asyncio.create_task(_run(slots, "h", 1, running, peak, release))
    await asyncio.sleep(0.01)
    waiter.cancel()
    release.set()
    await holder
    await asyncio.gather(waiter, return_exceptions=True)
    assert not slots._entries


async def test_under_the_limit_a_call_takes_no_lock_and_waiters_still_each_check_their_own_limit():
    """The fast path (no waiters, under the limit) makes no Condition; once someone waits, a new call
    goes through the Condition, where it checks its own version's limit as before."""
    slots, running, peak, release = FunctionSlots(), [0], [0], asyncio.Event()
    first = asyncio.create_task(_run(slots, "k", 2, running, peak, release))
    await asyncio.sleep(0.01)
    assert slots._entries["k"][2] is None and running[0] == 1
    narrow = asyncio.create_task(_run(slots, "k", 1, running, peak, release))  # limit 1: must wait
    await asyncio.sleep(0.01)
    assert slots._entries["k"][1] == 1 and running[0] == 1
    late = asyncio.create_task(_run(slots, "k", 2, running, peak, release))  # under its own limit: runs
    await asyncio.sleep(0.01)
    assert running[0] == 2 and slots._entries["k"][1] == 1
    release.set()
    await asyncio.gather(first, narrow, late)
    assert not slots._entries
