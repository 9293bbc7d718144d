"""Admission, limits and dispatch: every invocation, sync or async, runs through ``Scheduler``.

``calls.py`` takes calls in (429 when the queue is full), runs sync ones and queues async ones, and
runs any one call on a machine; ``worker.py`` claims the queued async calls from the store, keeps their
leases, and retries, hands back or finishes them. See docs/architecture.md for the long story.
"""

from nimbus.scheduler.calls import Scheduler, check_idempotency_key
from nimbus.scheduler.worker import AsyncWorker

__all__ = ["AsyncWorker", "Scheduler", "check_idempotency_key"]
