"""What a node does when another node announces a change (``store.changes``): the same as the node that
made it did for itself, so a function updated through any node is served as updated by every node.

Payloads come from nodes holding the database's credentials, but are still checked for shape: a field of
the wrong type is ignored rather than trusted.
"""

import logging
from collections.abc import Callable

from nimbus.pool import Pool

log = logging.getLogger("nimbus.cluster")


class ChangeHandler:
    """Applies one notification (the store has cleared its look-up caches already): retire machines, forget
    keys, wake workers."""

    def __init__(self, pool: Pool, wake_workers: Callable[[], None]) -> None:
        self.pool = pool
        self.wake_workers = wake_workers
        self.forget_key: Callable[[str], None] | None = None
        """The gateway's guard: a key revoked elsewhere stops working here at once (set by the app)."""
        self.forget_keys: Callable[[], None] | None = None

    def __call__(self, change: dict) -> None:
        kind = change.get("k")
        if kind == "work":
            self.wake_workers()
            return
        if kind == "function" and _text(change, "id", "version_id"):
            # $LATEST moved: its old revision's machines go; published versions keep theirs.
            self.pool.retire_function(change["id"], keep_version_id=change["version_id"], latest_only=True)
        elif kind == "function_deleted" and _text(change, "id"):
            self.pool.retire_function(change["id"])
        elif kind == "version_deleted" and _text(change, "version_id") and isinstance(change.get("number"), int):
            self.pool.retire_version(change["version_id"], str(change["number"]))
        elif kind == "key" and _text(change, "key_hash"):
            if self.forget_key is not None:
                self.forget_key(change["key_hash"])
        elif kind == "resync":
            # Changes may have been missed: nothing cached is trusted; queued work may be waiting.
            if self.forget_keys is not None:
                self.forget_keys()
            self.wake_workers()


def _text(change: dict, *names: str) -> bool:
    return all(isinstance(change.get(name), str) for name in names)
