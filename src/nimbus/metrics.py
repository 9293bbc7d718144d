"""Prometheus metrics of one node, in a registry of its own (tests run several nodes in one process).

Pool sizes and queue depth are read at scrape time by a collector, so the hot path pays nothing for
them; counters and histograms are bumped once per invocation.
"""

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
CHILDREN_KEPT_MAX = 10_000
DURATION_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._counted: dict[tuple[str, str, str], tuple] = {}
        self.invocations = Counter(
            "nimbus_invocations",
            "Invocations finished, by function, status and start kind.",
            ["function", "status", "start"],
            registry=self.registry,
        )
        self.duration = Histogram(
            "nimbus_invocation_duration_seconds",
            "Time from a worker taking the call to its result, by start kind.",
            ["start"],
            buckets=DURATION_BUCKETS,
            registry=self.registry,
        )
        self.rejected = Counter(
            "nimbus_invocations_rejected",
            "Invocations refused because the queue was full.",
            registry=self.registry,
        )

    def observe(self, function: str, status: str, start: str | None, seconds: float) -> None:
        kind = start or "none"
        # The labelled children, kept: ``labels()`` checks and locks on every call (2% of a warm call's
        # CPU). Bounded like the registry's own children, which live as long as it does.
        key = (function, status, kind)
        child = self._counted.get(key)
        if child is None:
            if len(self._counted) >= CHILDREN_KEPT_MAX:
                self._counted.clear()
            child = self._counted[key] = (self.invocations.labels(function, status, kind), self.duration.labels(kind))
        child[0].inc()
        child[1].observe(seconds)

    def watch(self, pool_stats: Callable[[], dict], queue_depth: Callable[[], int]) -> None:
        """Export pool sizes and queue depth, read when Prometheus scrapes."""
        self.registry.register(_NodeCollector(pool_stats, queue_depth))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _NodeCollector:
    def __init__(self, pool_stats: Callable[[], dict], queue_depth: Callable[[], int]) -> None:
        self._pool_stats = pool_stats
        self._queue_depth = queue_depth

    def describe(self):
        return []

    def collect(self):
        machines = GaugeMetricFamily("nimbus_pool_machines", "Machines by runtime and state.",
                                     labels=["runtime", "state"])
        targets = GaugeMetricFamily("nimbus_pool_target_blank",
                                    "Blank machines the pool aims to keep per runtime (autoscaled within "
                                    "[min_warm, max_warm]).", labels=["runtime"])
        for runtime, states in sorted(self._pool_stats().items()):
            for state, count in sorted(states.items()):
                if state == "target":  # a goal, not machines in a state
                    targets.add_metric([runtime], count)
                else:
                    machines.add_metric([runtime, state], count)
        yield machines
        yield targets
        yield GaugeMetricFamily("nimbus_queue_depth", "Invocations admitted and waiting for a machine.",
                                value=self._queue_depth())
