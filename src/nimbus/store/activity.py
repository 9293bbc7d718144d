"""What the console's function pages ask: a name search, each listed function's recent activity, a
function's newest calls without their payloads, and its function URLs.

Every query is bounded and walks an index: the search reads the tenant's functions by name (the
(tenant, name) unique index), activity reads only the page's functions on invocations(function_id,
created_at), and the newest calls are the first rows of that same index.
"""

from dataclasses import dataclass
from datetime import datetime, timedelta
from types import SimpleNamespace

import orjson
import sqlalchemy as sa

from nimbus.store import tables
from nimbus.store.database import Database, boundary
from nimbus.store.records import DEFAULT_TENANT, FunctionRecord, FunctionUrlRecord, utcnow
from nimbus.store.statements import SELECT_LATEST, as_function
from nimbus.store.writebehind import WriteBehind

ACTIVITY_WINDOW = timedelta(hours=24)
ACTIVITY_IDS_MAX = 200  # functions per activity query: a page of the list is 50
RECENT_MAX = 200
ERROR_STATUSES = ("failed", "timed_out")

_f = tables.functions
_i = tables.invocations
_u = tables.function_urls


@dataclass(slots=True, kw_only=True)
class Activity:
    """One function's calls: the newest one ever, and how many of the window's failed."""

    last_call: datetime | None = None
    calls: int = 0
    """Calls created in the window (queued and running ones too)."""
    errors: int = 0
    """Calls of the window that failed or timed out."""

    @property
    def error_rate(self) -> float | None:
        return self.errors / self.calls if self.calls else None


@dataclass(slots=True, kw_only=True)
class CallSummary:
    """A row of a function's recent calls: what a listing shows, none of the payloads (event, output, logs)."""

    id: str
    status: str
    mode: str
    start: str | None
    restored: bool
    duration_ms: float | None
    trigger: str
    version: int
    executed_version: str
    attempts: int
    created_at: datetime
    failed: bool = False
    """Has an error (its type is in ``error_type``)."""
    error_type: str | None = None


_SUMMARY = (_i.c.id, _i.c.status, _i.c.mode, _i.c.start, _i.c.restored, _i.c.duration_ms, _i.c.trigger,
            _i.c.version, _i.c.executed_version, _i.c.attempts, _i.c.created_at)
_SUMMARY_NAMES = tuple(c.name for c in _SUMMARY)


class ActivityMixin(Database):
    """Per-function activity and listings for the console's function pages."""

    _behind: WriteBehind | None

    async def search_functions(self, *, tenant: str = DEFAULT_TENANT, contains: str = "", limit: int = 50,
                               offset: int = 0) -> tuple[list[tuple[FunctionRecord, int]], int]:
        """One page of the tenant's functions whose name holds ``contains`` (any character taken literally),
        by name, each with its last published number (0: none); and how many match in all."""
        where = [_f.c.tenant == tenant]
        if contains:
            where.append(_f.c.name.contains(contains.lower(), autoescape=True))
        statement = (SELECT_LATEST.add_columns(_f.c.last_published).where(*where).order_by(_f.c.name)
                     .limit(max(limit, 0)).offset(max(offset, 0)))
        with boundary("search functions"):
            async with self._read() as conn:
                rows = (await conn.execute(statement)).all()
                total = await conn.scalar(sa.select(sa.func.count()).select_from(_f).where(*where))
        found = []
        for row in rows:
            values = dict(row._mapping)
            last = values.pop("last_published")
            record = as_function(SimpleNamespace(_mapping=values))  # type: ignore[arg-type]
            found.append((record, int(last or 0)))
        return found, int(total or 0)

    async def function_activity(self, function_ids: list[str], *, tenant: str = DEFAULT_TENANT,
                                now: datetime | None = None) -> dict[str, Activity]:
        """Each function's last call and its calls and errors of the last 24 h, in one statement: a grouped
        count over the window on invocations(function_id, created_at), and the newest call per function
        from the same index (a min/max look-up, not a scan). Functions of other tenants get nothing."""
        ids = sorted(set(function_ids))[:ACTIVITY_IDS_MAX]
        if not ids:
            return {}
        since = (now or utcnow()) - ACTIVITY_WINDOW
        window = (
            sa.select(_i.c.function_id, sa.func.count().label("calls"),
                      sa.func.sum(sa.case((_i.c.status.in_(ERROR_STATUSES), 1), else_=0)).label("errors"))
            .where(_i.c.function_id.in_(ids), _i.c.created_at >= since)
            .group_by(_i.c.function_id)
            .subquery("window")
        )
        last = (sa.select(sa.func.max(_i.c.created_at)).where(_i.c.function_id == _f.c.id)
                .correlate(_f).scalar_subquery())
        statement = (
            sa.select(_f.c.id, last.label("last_call"), window.c.calls, window.c.errors)
            .select_from(_f.outerjoin(window, window.c.function_id == _f.c.id))
            .where(_f.c.id.in_(ids), _f.c.tenant == tenant)
        )
        # Finished sync calls still in the write-behind buffer (a few ms old) count too; taken before the
        # read, as list_invocations_page does (one committed meanwhile may then count twice: a display).
        unwritten = self._unwritten(ids)
        with boundary("read function activity"):
            async with self._read() as conn:
                rows = (await conn.execute(statement)).all()
        found = {row.id: Activity(last_call=row.last_call, calls=int(row.calls or 0), errors=int(row.errors or 0))
                 for row in rows}
        for values in unwritten:
            known = found.get(values["function_id"])
            if known is None or values["tenant"] != tenant or values["created_at"] < since:
                continue
            known.calls += 1
            known.errors += values["status"] in ERROR_STATUSES
            if known.last_call is None or values["created_at"] > known.last_call:
                known.last_call = values["created_at"]
        return found

    async def recent_calls(self, function_id: str, *, tenant: str = DEFAULT_TENANT,
                           limit: int = 50) -> list[CallSummary]:
        """A function's newest calls first, without their event, output or logs (those written behind too)."""
        limit = min(max(limit, 0), RECENT_MAX)
        unwritten = [values for values in self._unwritten([function_id]) if values["tenant"] == tenant]
        # By function_id alone: with the tenant in the WHERE too, SQLite picks the (tenant, created_at) index
        # and walks every call of the tenant. A function's calls are its tenant's; checked again below.
        statement = (
            sa.select(*_SUMMARY, _i.c.tenant, _i.c.error)
            .where(_i.c.function_id == function_id)
            .order_by(_i.c.created_at.desc(), _i.c.id.desc()).limit(limit)
        )
        with boundary("list recent calls"):
            async with self._read() as conn:
                rows = (await conn.execute(statement)).all()
        merged = {row.id: _summary(dict(row._mapping)) for row in rows if row.tenant == tenant}
        merged.update((values["id"], _summary(values)) for values in unwritten)
        return sorted(merged.values(), key=lambda call: (call.created_at, call.id), reverse=True)[:limit]

    async def function_urls(self, function_id: str, *, tenant: str = DEFAULT_TENANT) -> list[FunctionUrlRecord]:
        """The function's URL configs ('' qualifier, $LATEST, first; then its aliases'), by their primary key."""
        statement = (sa.select(_u, _f.c.name).join(_f, _f.c.id == _u.c.function_id)
                     .where(_u.c.function_id == function_id, _u.c.tenant == tenant)
                     .order_by(_u.c.qualifier).limit(RECENT_MAX))
        with boundary("list function URLs"):
            async with self._read() as conn:
                rows = (await conn.execute(statement)).all()
        return [FunctionUrlRecord(function_id=row.function_id, function_name=row.name, tenant=row.tenant,
                                  qualifier=row.qualifier, auth=row.auth, cors=orjson.loads(row.cors),
                                  created_at=row.created_at, updated_at=row.updated_at) for row in rows]

    def _unwritten(self, function_ids: list[str]) -> list[dict]:
        if self._behind is None:
            return []
        return [values for function_id in function_ids for values in self._behind.of_function(function_id)]



def _summary(values: dict) -> CallSummary:
    error = values.get("error")
    return CallSummary(**{name: values[name] for name in _SUMMARY_NAMES}, failed=bool(error),
                       error_type=str(error.get("type") or "Error") if isinstance(error, dict) else None)
