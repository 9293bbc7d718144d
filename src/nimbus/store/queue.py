"""The async queue, on the invocations table: claims, leases, retries and hand-backs of async work, and
the same for result callbacks.

Async work is claimed with ``FOR UPDATE SKIP LOCKED`` on PostgreSQL (one statement under SQLite's write
lock), so claimers on any number of nodes never take the same row; every later write of an attempt is
fenced by the claim's lease token.
"""

import uuid
from collections.abc import Mapping
from datetime import datetime, timedelta

import sqlalchemy as sa

from nimbus.store import tables
from nimbus.store.changes import ChangesMixin
from nimbus.store.database import boundary
from nimbus.store.records import InvocationRecord, utcnow
from nimbus.store.statements import (
    ABANDON_OWNED_SYNC,
    CALLBACK_DONE,
    CLAIM_CALLBACKS,
    CLAIMABLE,
    FENCED_UPDATE,
    RELEASE_OWNED,
    RELEASE_OWNED_CALLBACKS,
    as_invocation,
)

_v = tables.function_versions
_i = tables.invocations


def _claim_statement(busy: Mapping[str, int], *, lock: bool) -> sa.Update:
    """The UPDATE … RETURNING of ``Store.claim_async``; ``busy``: calls per function the claimer already holds.

    Built per claim (``busy`` changes); window functions rank the claimable rows, which PostgreSQL does
    not allow beside ``FOR UPDATE``: there the ranking reads a snapshot and a second select locks the picks.
    """
    held = sa.case(busy, value=_i.c.function_id, else_=0) if busy else sa.literal(0)
    nth = sa.func.row_number().over(partition_by=_i.c.function_id, order_by=(_i.c.created_at, _i.c.id))
    ranked = (
        sa.select(_i.c.id, _i.c.tenant, _i.c.created_at, nth.label("nth"), (_v.c.concurrency - held).label("free"))
        .select_from(_i.join(_v, _v.c.id == _i.c.version_id))
        .where(*CLAIMABLE)
        .subquery("ranked")
    )
    turn = sa.func.row_number().over(partition_by=ranked.c.tenant,
                                     order_by=(ranked.c.nth, ranked.c.created_at, ranked.c.id))
    fair = (sa.select(ranked.c.id, ranked.c.created_at, turn.label("turn"))
            .where(ranked.c.nth <= ranked.c.free).subquery("fair"))
    picks = (sa.select(fair.c.id).order_by(fair.c.turn, fair.c.created_at, fair.c.id)
             .limit(sa.bindparam("limit", type_=sa.Integer)))
    if lock:
        picks = sa.select(_i.c.id).where(_i.c.id.in_(picks), *CLAIMABLE).with_for_update(skip_locked=True)
    return (
        _i.update()
        .where(_i.c.id.in_(picks))
        .values(status="running", lease_owner=sa.bindparam("owner"), lease_expires_at=sa.bindparam("expires"),
                not_before=None)
        .returning(*_i.c)
    )


class QueueMixin(ChangesMixin):
    """Claiming, leasing and retrying async invocations and their result deliveries."""


    async def claim_async(self, owner: str, *, limit: int, lease_s: float,
                          busy: Mapping[str, int] | None = None) -> list[InvocationRecord]:
        """Take up to ``limit`` async invocations to run, leased to ``owner`` for ``lease_s``.

        Fair, so one tenant's backlog cannot hold up everyone else's calls: of each function at most as
        many as it can start now, its version's ``concurrency`` less ``busy[function_id]`` (the calls the
        claiming node already runs or holds for it); oldest first within a function, functions in turn
        (each one's oldest, then each one's second…) and tenants in turn above them.

        Claimable: ``queued`` and past its ``not_before``, or ``running`` under a lease that has run out
        (its node died). Each claimed row becomes ``running``; its ``lease_owner`` is the lease token
        ``"<owner>:<nonce>"``, new with every claim, which fences every later write of this attempt
        (``start_attempt``, ``finish_invocation``, ``retry_later``, ``release``). ``attempts`` is not
        changed: ``start_attempt`` counts it. No two claimers ever get the same row: on PostgreSQL the
        picks are locked ``FOR UPDATE SKIP LOCKED`` and checked to be claimable again (a row another node
        took meanwhile is skipped); on SQLite the pick and the update are one statement, run under the
        write lock that SQLite holds for a whole statement (in-process, the store's own lock serialises
        writers too). Returned oldest first.
        """
        if limit <= 0:
            return []
        now = utcnow()
        params = {"now": now, "limit": limit, "owner": f"{owner}:{uuid.uuid4().hex[:12]}",
                  "expires": now + timedelta(seconds=lease_s)}
        statement = _claim_statement({key: n for key, n in (busy or {}).items() if n > 0},
                                     lock=self.dialect == "postgresql")
        with boundary("claim async invocations"):
            async with self._write_one() as conn:
                rows = (await conn.execute(statement, params)).all()
        # RETURNING promises no order.
        return sorted((as_invocation(row) for row in rows), key=lambda inv: (inv.created_at, inv.id))

    async def start_attempt(self, id: str, token: str) -> bool:  # noqa: A002
        """Count an attempt: the claimed call is about to reach a machine. Fenced by the lease token.

        Attempts are counted here, not at the claim, so work a node had claimed but not started when it
        died (or was stopped) is not charged an attempt it never made.
        """
        with boundary(f"start invocation {id!r}"):
            async with self._write_one() as conn:
                result = await conn.execute(FENCED_UPDATE.values(attempts=_i.c.attempts + 1, started_at=utcnow()),
                                            {"key": id, "token": token})
        return result.rowcount == 1

    async def retry_later(
        self,
        id: str,  # noqa: A002
        *,
        token: str,
        not_before: datetime,
        error: dict | None,
        start: str | None,
        logs: str,
        logs_truncated: bool,
        duration_ms: float | None,
        restored: bool = False,
    ) -> bool:
        """Put a failed attempt back in the queue, not to be claimed before ``not_before`` (its backoff).

        The failed attempt's outcome stays visible meanwhile (``error``, ``logs``…) under status
        ``queued``. Fenced like ``finish_invocation``; False when the lease is no longer this one.
        """
        values = {
            "status": "queued", "lease_owner": None, "lease_expires_at": None, "not_before": not_before,
            "error": error, "start": start, "restored": restored, "logs": logs, "logs_truncated": logs_truncated,
            "duration_ms": duration_ms, "output": None,
        }
        with boundary(f"queue invocation {id!r} for a retry"):
            async with self._write_one() as conn:
                result = await conn.execute(FENCED_UPDATE.values(**values), {"key": id, "token": token})
        return result.rowcount == 1

    async def release(self, leases: dict[str, str]) -> int:
        """Hand back leased async work at once (graceful shutdown): queued again, claimable by anyone.

        ``leases`` maps invocation id to its lease token. Returns how many rows were handed back.
        """
        if not leases:
            return 0
        statement = FENCED_UPDATE.values(status="queued", lease_owner=None, lease_expires_at=None)
        with boundary("hand back leases"):
            async with self._write() as conn:
                count = 0
                for id_, token in leases.items():  # executemany's rowcount is not reliable on every driver
                    count += (await conn.execute(statement, {"key": id_, "token": token})).rowcount
        if count:
            self._announce_work()
        return count

    async def release_owned(self, owner: str) -> int:
        """Put back in the queue the async invocations node ``owner`` was running; how many.

        A node restarting after a crash hands back its own work at once instead of waiting for its
        leases to run out. An interrupted attempt that had started stays counted. Its pending result
        deliveries are freed too, and its idempotent sync calls, which nobody can finish now, are
        marked failed.
        """
        like = owner.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        params = {"owner": owner, "owner_like": f"{like}:%"}
        with boundary(f"release the leases of {owner!r}"):
            async with self._write() as conn:
                result = await conn.execute(RELEASE_OWNED, params)
                await conn.execute(ABANDON_OWNED_SYNC, {**params, "now": utcnow()})
                await conn.execute(RELEASE_OWNED_CALLBACKS, params)
        if result.rowcount:
            self._announce_work()
        return result.rowcount

    async def renew_leases(self, leases: dict[str, str], lease_s: float) -> set[str]:
        """Extend these leases (invocation id → lease token); the ids whose lease still holds."""
        if not leases:
            return set()
        statement = (
            _i.update()
            .where(_i.c.id.in_(list(leases)), _i.c.lease_owner.in_(set(leases.values())), _i.c.status == "running")
            .values(lease_expires_at=utcnow() + timedelta(seconds=lease_s))
            .returning(_i.c.id, _i.c.lease_owner)
        )
        with boundary("renew leases"):
            async with self._write_one() as conn:
                rows = (await conn.execute(statement)).all()
        return {id_ for id_, token in rows if leases.get(id_) == token}

    async def claim_callbacks(self, owner: str, *, limit: int, lease_s: float) -> list[InvocationRecord]:
        """Take up to ``limit`` pending result deliveries, each leased to ``owner`` for ``lease_s``.

        A finished invocation has no lease of its own, so its lease columns hold the delivery's, and
        ``not_before`` the delivery's backoff. ``callback_attempts`` counts the claim. No event loaded.
        """
        if limit <= 0:
            return []
        now = utcnow()
        params = {"now": now, "limit": limit, "owner": owner, "expires": now + timedelta(seconds=lease_s)}
        with boundary("claim result callbacks"):
            async with self._write_one() as conn:
                rows = (await conn.execute(CLAIM_CALLBACKS, params)).all()
        return [as_invocation(row) for row in rows]

    async def callback_done(self, id: str, *, owner: str, attempt: int, status: str,  # noqa: A002
                            not_before: datetime | None = None) -> bool:
        """Record a delivery's outcome: ``delivered``, ``failed`` (gave up), or ``pending`` again after
        ``not_before``. Fenced by the delivery's lease; False when it is no longer this one."""
        if status not in ("pending", "delivered", "failed"):
            raise ValueError(f"{status!r} is not a callback status")
        values = {"callback_status": status, "lease_owner": None, "lease_expires_at": None, "not_before": not_before}
        with boundary(f"record the callback of {id!r}"):
            async with self._write_one() as conn:
                result = await conn.execute(CALLBACK_DONE.values(**values),
                                            {"key": id, "owner": owner, "attempt": attempt})
        return result.rowcount == 1
