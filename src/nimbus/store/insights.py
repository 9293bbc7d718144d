"""What the console's overview asks of a tenant's recent invocations: calls, start kinds, errors and latency
per minute over the last hour, the tenant's async backlog and its latest failures.

Each question is one statement, bounded whatever the traffic: the hour is read newest first along the
(tenant, created_at) index and cut at ``WINDOW_MAX`` rows (the page then says it sampled), the backlog is
counted up to ``BACKLOG_MAX``, the failures are looked for among the newest ``FAILURE_SCAN`` calls.

Percentiles need every duration, which a portable SQL has no function for; instead each minute's durations
are counted in SQL into a fixed log-scale histogram (a CASE over ``EDGES_MS``, the same on both backends) and
p50/p99 are read from the counts here, exact to within half a bucket (about 12 %). Only the minute of a
row needs a dialect's own function (SQLite stores text, PostgreSQL ``timestamptz``); both are written here
and both run in tests/integration/test_store_insights.py.
"""

import math
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import sqlalchemy as sa

from nimbus.store import tables
from nimbus.store.database import Database, boundary
from nimbus.store.records import STARTS, utcnow

_i = tables.invocations

WINDOW_MINUTES = 60
WINDOW_MAX = 20_000  # rows of the last hour aggregated at most, the newest: ~60 ms of SQLite's time
BACKLOG_MAX = 10_000  # queued and running async calls counted at most
FAILURE_SCAN = 5_000  # newest calls looked through for the latest failures
FAILURE_AGE = timedelta(days=1)
FAILED = ("failed", "timed_out")
# Bucket edges: 10 per decade from 0.1 ms to 1,000 s. Bucket 0 holds d < EDGES_MS[0], bucket k (k >= 1)
# EDGES_MS[k-1] <= d < EDGES_MS[k], and the last one d >= EDGES_MS[-1].
EDGES_MS = tuple(round(0.1 * 10 ** (k / 10), 6) for k in range(71))


@dataclass(slots=True)
class Minute:
    """One minute of a tenant's calls; percentiles are None when no call of it has finished."""

    at: datetime
    calls: int = 0
    errors: int = 0
    p50_ms: float | None = None
    p99_ms: float | None = None


@dataclass(slots=True)
class Insights:
    """A tenant's last hour, minute by minute, and its totals."""

    since: datetime
    minutes: list[Minute]
    calls: int = 0
    errors: int = 0
    starts: dict[str, int] = field(default_factory=dict)
    p50_ms: float | None = None
    p99_ms: float | None = None
    sampled: bool = False
    """The hour had more than ``WINDOW_MAX`` calls: the figures are those of its newest ones."""


@dataclass(slots=True)
class Failure:
    id: str
    function_name: str
    status: str
    created_at: datetime
    duration_ms: float | None
    error_type: str
    message: str


def bucket_of(duration_ms: float) -> int:
    """The histogram bucket a duration falls in, as the SQL CASE computes it (for tests and the bench)."""
    return next((k for k, edge in enumerate(EDGES_MS) if duration_ms < edge), len(EDGES_MS))


def percentile(counts: dict[int, int], q: float) -> float | None:
    """The ``q`` quantile (0..1) of a histogram ``bucket -> count``: the geometric middle of the bucket
    holding that rank (the edge itself for the two open-ended buckets)."""
    total = sum(counts.values())
    if total == 0:
        return None
    rank = max(1, math.ceil(q * total))
    seen = 0
    for bucket in sorted(counts):
        seen += counts[bucket]
        if seen >= rank:
            if bucket == 0:
                return EDGES_MS[0]
            if bucket >= len(EDGES_MS):
                return EDGES_MS[-1]
            return math.sqrt(EDGES_MS[bucket - 1] * EDGES_MS[bucket])
    return None  # unreachable: the ranks add up to total


def _bucket(duration: sa.ColumnElement, low: int = 0, high: int = len(EDGES_MS)) -> sa.ColumnElement:
    """The bucket of ``duration`` among ``low``..``high``, as a CASE that halves the range at each step (7
    comparisons a row, not up to 71). Literal edges, not parameters: one cached text, constants to the planner."""
    if low == high:
        return sa.literal_column(str(low))
    middle = (low + high + 1) // 2  # duration < EDGES_MS[middle - 1] <=> bucket < middle
    return sa.case((duration < sa.literal_column(repr(EDGES_MS[middle - 1])), _bucket(duration, low, middle - 1)),
                   else_=_bucket(duration, middle, high))


def _minute(dialect: str, created_at: sa.ColumnElement, since_epoch: int) -> sa.ColumnElement:
    """Whole minutes from ``since_epoch`` (unix seconds, a minute's start) to ``created_at``."""
    if dialect == "sqlite":  # naive UTC text 'YYYY-MM-DD HH:MM:SS.ffffff'; strftime('%s') truncates to seconds
        seconds = sa.cast(sa.func.strftime("%s", created_at), sa.Integer)
        return (seconds - sa.literal(since_epoch, sa.Integer)) // 60
    epoch = sa.extract("epoch", created_at)
    return sa.cast(sa.func.floor((epoch - sa.literal(since_epoch, sa.Integer)) / 60), sa.Integer)


def _count(condition: sa.ColumnElement) -> sa.ColumnElement:
    return sa.func.sum(sa.case((condition, 1), else_=0))


class InsightsMixin(Database):
    """Aggregates over recent invocations for the console's overview."""

    async def tenant_insights(self, tenant: str, *, now: datetime | None = None,
                              minutes: int = WINDOW_MINUTES) -> Insights:
        """The tenant's last ``minutes`` whole minutes (the current one last), from at most the newest
        ``WINDOW_MAX`` calls of them."""
        now = now or utcnow()
        since = now.replace(second=0, microsecond=0) - timedelta(minutes=minutes - 1)
        since_epoch = int(since.timestamp())
        window = (sa.select(_i.c.created_at, _i.c.start, _i.c.status, _i.c.duration_ms)
                  .where(_i.c.tenant == tenant, _i.c.created_at >= since)
                  .order_by(_i.c.created_at.desc()).limit(WINDOW_MAX).subquery())
        minute = _minute(self.dialect, window.c.created_at, since_epoch).label("minute")
        bucket = _bucket(window.c.duration_ms).label("bucket")
        finished = window.c.duration_ms.is_not(None)
        query = (sa.select(minute, sa.case((finished, bucket), else_=sa.literal_column("-1")).label("bucket"),
                           sa.func.count().label("calls"), _count(window.c.status.in_(FAILED)).label("errors"),
                           *(_count(window.c.start == kind).label(kind) for kind in STARTS))
                 .group_by(sa.literal_column("minute"), sa.literal_column("bucket")))
        with boundary("sum up recent invocations"):
            async with self._read() as conn:
                rows = (await conn.execute(query)).all()
        out = Insights(since=since, minutes=[Minute(at=since + timedelta(minutes=k)) for k in range(minutes)],
                       starts=dict.fromkeys(STARTS, 0))
        per_minute: list[dict[int, int]] = [{} for _ in range(minutes)]
        hour: dict[int, int] = {}
        for row in rows:
            k = int(row.minute)
            if not 0 <= k < minutes:
                continue  # written with a clock ahead of ours
            slot = out.minutes[k]
            slot.calls += row.calls
            slot.errors += int(row.errors or 0)
            for kind in STARTS:
                out.starts[kind] += int(getattr(row, kind) or 0)
            if row.bucket >= 0:
                per_minute[k][row.bucket] = per_minute[k].get(row.bucket, 0) + row.calls
                hour[row.bucket] = hour.get(row.bucket, 0) + row.calls
        for slot, counts in zip(out.minutes, per_minute, strict=True):
            slot.p50_ms, slot.p99_ms = percentile(counts, 0.50), percentile(counts, 0.99)
        out.calls = sum(slot.calls for slot in out.minutes)
        out.errors = sum(slot.errors for slot in out.minutes)
        out.p50_ms, out.p99_ms = percentile(hour, 0.50), percentile(hour, 0.99)
        out.sampled = out.calls >= WINDOW_MAX
        return out

    async def async_backlog(self, tenant: str) -> int:
        """The tenant's async calls queued or running, counted up to ``BACKLOG_MAX`` (on the claim index)."""
        # ``tenant || ''``: the tenant's own index holds every call it ever made, so keep the planner (SQLite's,
        # which has no statistics) on the claim index (mode, status), which holds only the queue.
        inner = (sa.select(sa.literal(1).label("one"))
                 .where(_i.c.mode == "async", _i.c.status.in_(("queued", "running")), _i.c.tenant + "" == tenant)
                 .limit(BACKLOG_MAX).subquery())
        with boundary("count queued invocations"):
            async with self._read() as conn:
                return int(await conn.scalar(sa.select(sa.func.count()).select_from(inner)) or 0)

    async def recent_failures(self, tenant: str, limit: int = 10, *, now: datetime | None = None) -> list[Failure]:
        """The tenant's latest failed or timed-out calls, newest first, among its newest ``FAILURE_SCAN``
        calls of the last day."""
        now = now or utcnow()
        recent = (sa.select(_i.c.id, _i.c.status, _i.c.created_at)
                  .where(_i.c.tenant == tenant, _i.c.created_at >= now - FAILURE_AGE)
                  .order_by(_i.c.created_at.desc()).limit(FAILURE_SCAN).subquery())
        ids = (sa.select(recent.c.id).where(recent.c.status.in_(FAILED))
               .order_by(recent.c.created_at.desc()).limit(limit))
        # Two statements: the ids first, then those rows by primary key. As one (``id IN (subquery)``),
        # PostgreSQL without fresh statistics hashed the whole table against the ids (40 ms at 100,000 rows).
        with boundary("list recent failures"):
            async with self._read() as conn:
                found = list((await conn.execute(ids)).scalars())
                if not found:
                    return []
                rows = (await conn.execute(
                    sa.select(_i.c.id, _i.c.function_name, _i.c.status, _i.c.created_at, _i.c.duration_ms, _i.c.error)
                    .where(_i.c.id.in_(found)).order_by(_i.c.created_at.desc(), _i.c.id))).all()
        out = []
        for row in rows:
            error = row.error if isinstance(row.error, dict) else {}
            out.append(Failure(id=row.id, function_name=row.function_name, status=row.status,
                               created_at=row.created_at, duration_ms=row.duration_ms,
                               error_type=str(error.get("type") or row.status)[:200],
                               message=str(error.get("message") or "")[:500]))
        return out
