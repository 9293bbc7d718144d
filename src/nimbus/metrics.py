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
    """Every series carries ``node``, the node id of the registry (``nimbus nodes``): one Prometheus can
    scrape a whole fleet, or its load balancer, and still tell nodes apart."""

    def __init__(self, node: str = "") -> None:
        self.node = node
        self.registry = CollectorRegistry(auto_describe=True)
        self._counted: dict[tuple[str, str, str], tuple] = {}
        self.invocations = Counter(
            "nimbus_invocations",
            "Invocations finished, by function, status and start kind.",
            ["node", "function", "status", "start"],
            registry=self.registry,
        )
        self.duration = Histogram(
            "nimbus_invocation_duration_seconds",
            "Time from a worker taking the call to its result, by start kind.",
            ["node", "start"],
            buckets=DURATION_BUCKETS,
            registry=self.registry,
        )
        self.rejected = Counter(
            "nimbus_invocations_rejected",
            "Invocations refused because the queue was full.",
            ["node"],
            registry=self.registry,
        ).labels(node)

    def observe(self, function: str, status: str, start: str | None, seconds: float) -> None:
        kind = start or "none"
        # The labelled children, kept: ``labels()`` checks and locks on every call (2% of a warm call's
        # CPU). Bounded like the registry's own children, which live as long as it does.
        key = (function, status, kind)
        child = self._counted.get(key)
        if child is None:
            if len(self._counted) >= CHILDREN_KEPT_MAX:
                self._counted.clear()
            child = self._counted[key] = (self.invocations.labels(self.node, function, status, kind),
                                           self.duration.labels(self.node, kind))
        child[0].inc()
        child[1].observe(seconds)

    def watch(self, pool_stats: Callable[[], dict], queue_depth: Callable[[], int]) -> None:
        """Export pool sizes and queue depth, read when Prometheus scrapes."""
        self.registry.register(_NodeCollector(self.node, pool_stats, queue_depth))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _NodeCollector:
    def __init__(self, node: str, pool_stats: Callable[[], dict], queue_depth: Callable[[], int]) -> None:
        self._node = node
        self._pool_stats = pool_stats
        self._queue_depth = queue_depth

    def describe(self):
        return []

    def collect(self):
        node = self._node
        machines = GaugeMetricFamily("nimbus_pool_machines", "Machines by runtime and state.",
                                     labels=["node", "runtime", "state"])
        targets = GaugeMetricFamily("nimbus_pool_target_blank",
                                    "Blank machines the pool aims to keep per runtime (autoscaled within "
                                    "[min_warm, max_warm]).", labels=["node", "runtime"])
        for runtime, states in sorted(self._pool_stats().items()):
            for state, count in sorted(states.items()):
                if state == "target":  # a goal, not machines in a state
                    targets.add_metric([node, runtime], count)
                else:
                    machines.add_metric([node, runtime, state], count)
        yield machines
        yield targets
        depth = GaugeMetricFamily("nimbus_queue_depth", "Invocations admitted and waiting for a machine.",
                                  labels=["node"])
        depth.add_metric([node], self._queue_depth())
        yield depth
