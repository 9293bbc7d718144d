"""Composition root: builds store, compiler, machine driver, pool, scheduler and gateway from one Settings.

Only the CLI and the tests import this module. Start-up order is store → driver → pool → scheduler
(so the scheduler can re-queue its own orphaned async work before the pool takes calls); shutdown runs
in reverse: stop taking work, drain, destroy machines, close the store.
"""

import asyncio
import gc
import logging
import os
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI

from nimbus import __version__, compiler, machines
from nimbus import home as nimbus_home
from nimbus.agent.contract import SDK_DIRS
from nimbus.callbacks import AllowList
from nimbus.cluster.changes import ChangeHandler
from nimbus.cluster.registry import Registry
from nimbus.compiler import sdk
from nimbus.compiler.layers import LayerDirs
from nimbus.config import Settings
from nimbus.gateway import auth, build_api
from nimbus.machines.base import Driver
from nimbus.metrics import Metrics
from nimbus.pool import CodeCache, Pool
from nimbus.scheduler import Scheduler
from nimbus.store import NodeRecord, Store
from nimbus.store.changes import Listener
from nimbus.store.retention import Retention
from nimbus.triggers.ticks import TickLoop

log = logging.getLogger("nimbus")
STORE_FLUSH_TIMEOUT_S = 10.0  # a failing database must not hold the shutdown up for long


@dataclass
class Node:
    """The running parts of one node, as the gateway sees them on ``app.state.node``."""

    settings: Settings
    store: Store
    driver: Driver
    pool: Pool
    scheduler: Scheduler
    metrics: Metrics
    compiler: compiler.Compiler
    layers: LayerDirs
    retention: Retention | None = None
    ticks: TickLoop | None = None
    registry: Registry | None = None
    changes: ChangeHandler | None = None
    listener: Listener | None = None
    draining: bool = False
    """SIGTERM came: /health answers 503 so the balancer sends no more; calls in flight still finish."""

    @classmethod
    async def start(cls, settings: Settings) -> "Node":
        home = nimbus_home.prepare(settings.home)
        store = await Store.open(settings.db_url, write_behind_ms=settings.write_behind_ms,
                                 function_cache_s=settings.function_cache_s, notify=settings.notify == "on")
        driver = builds = listener = registry = None
        try:
            builds = compiler.create_compiler(
                home,
                builder=settings.builder,
                timeout_s=settings.build_timeout_s,
                sdists=settings.build_sdists,
                memory_mb=settings.build_memory_mb,
                concurrency=settings.build_concurrency,
                images={"go": settings.builder_go_image, "rust": settings.builder_rust_image},
                cache=compiler.StoreCache(store),
            )
            sdk_dirs = await bundled_sdk(settings)
            options = _driver_options(settings, sdk_dirs)
            driver = machines.load_driver(settings.driver, home, **options)
            this_node = node_id(home, settings.process_index)
            metrics = Metrics(this_node)
            layer_dirs = LayerDirs(home, store.get_code)
            pool = Pool(
                driver,
                CodeCache(store.get_code, settings.code_cache_mb << 20).load,
                runtimes=settings.runtimes,
                min_warm=settings.min_warm,
                max_warm=settings.max_warm,
                autoscale_window_s=settings.autoscale_window_s,
                max_machines=settings.max_machines,
                max_age_s=settings.max_age_s,
                max_uses=settings.max_uses,
                idle_ttl_s=settings.idle_ttl_s,
                health_interval_s=settings.health_interval_s,
                layer_path=layer_dirs.path,
                account_id=settings.account_id,
                region=settings.region,
                sdk={runtime: SDK_DIRS[runtime] for runtime in sdk_dirs},
                use_snapshots=settings.function_templates != "off" and settings.max_function_templates > 0,
                eager_snapshots=settings.function_templates == "eager",
                snapshot_min_init_ms=settings.function_template_min_init_ms,
                max_snapshots=settings.max_function_templates,
                snapshot_spares=settings.per_call_spares,
            )
            scheduler = Scheduler(
                store, pool, metrics,
                node_id=this_node,
                queue_size=settings.queue_size,
                workers=settings.workers,
                async_poll_s=settings.async_poll_s,
                async_lease_s=settings.async_lease_s,
                async_retry_base_s=settings.async_retry_base_s,
                callback_allow=AllowList(settings.callback_allow),
                tenant_budget=int(settings.tenant_store_mb * (1 << 20)),
                budget_retry_s=settings.retention_interval_s,
                # With auth off there is one tenant: a share would only shrink its queue.
                tenant_queue_share=settings.tenant_queue_share if settings.auth == "on" else 1.0,
            )
            changes = ChangeHandler(pool, scheduler.async_worker.wake)
            listener = store.listener(changes)
            if listener is not None:  # before the first claim: work queued from here on wakes this node
                await listener.start()
            retention = Retention(store, max_age_s=settings.retention_max_age_s,
                                  max_count=settings.retention_max_count, interval_s=settings.retention_interval_s)
            metrics.watch(pool.stats, lambda: scheduler.queue_depth)
            await pool.start()
            await scheduler.start()
            await retention.start()
            ticks = None
            if settings.schedules == "on":
                ticks = TickLoop(store, region=settings.region, account_id=settings.account_id,
                                 poll_s=settings.schedule_poll_s, on_fire=scheduler.async_worker.wake)
                await ticks.start()
            registry = Registry(store, _node_record(settings, this_node),
                                stats=lambda: _node_stats(pool, scheduler), heartbeat_s=settings.heartbeat_s,
                                dead_s=settings.node_dead_s, on_takeover=scheduler.async_worker.wake)
            await registry.start()
        except BaseException:
            if listener is not None:
                await listener.close()
            if driver is not None:
                await driver.close()
            if builds is not None:
                await builds.close()
            await store.close()
            raise
        return cls(settings, store, driver, pool, scheduler, metrics, builds, layer_dirs, retention, ticks,
                   registry, changes, listener)

    def begin_drain(self) -> None:
        """SIGTERM: answer /health with 503, claim no more async work, say ``draining`` in the registry.
        Calls still arrive and run until the server stops listening. Safe from a signal handler."""
        if self.draining:
            return
        self.draining = True
        self.scheduler.drain()
        if self.registry is not None:
            registry = self.registry
            loop = asyncio.get_event_loop()
            loop.call_soon_threadsafe(lambda: loop.create_task(registry.drain(), name="drain"))

    async def stop(self) -> None:
        if self.registry is not None and not self.draining:
            self.draining = True
            await self.registry.drain()
        if self.ticks is not None:
            await self.ticks.close()
        if self.retention is not None:
            await self.retention.close()
        await self.scheduler.close()
        # No call finishes after this (HTTP drained, scheduler closed): write the sync results kept in
        # memory now, not after the slow machine teardown, so a crash during it loses none of them.
        await self.store.flush(timeout=STORE_FLUSH_TIMEOUT_S)  # store.close retries what is still left
        if self.listener is not None:
            await self.listener.close()
        if self.registry is not None:
            await self.registry.close()  # async work handed back, results written: nothing to take over
        await self.compiler.close()  # kills builds still running: their requests are gone with the server
        await self.pool.close()
        await self.driver.close()
        await self.store.close()


def _node_record(settings: Settings, node: str) -> NodeRecord:
    host = f"[{settings.host}]" if ":" in settings.host else settings.host
    return NodeRecord(id=node, address=settings.advertise_url or f"http://{host}:{settings.port}",
                      driver=settings.driver, runtimes=list(settings.runtimes), version=__version__, state="up",
                      capacity={"workers": settings.workers, "max_machines": settings.max_machines})


def _node_stats(pool: Pool, scheduler: Scheduler) -> dict:
    """What a heartbeat tells the registry about this node's load."""
    return {"machines": pool.total, "in_flight": scheduler.in_flight, "queue_depth": scheduler.queue_depth,
            "pool": pool.stats()}


def node_id(home: Path, process: int = 0) -> str:
    """A stable id for this node's home: leases it held before a crash are recognised as its own.

    ``process``: the worker process's index (``nimbus.processes``); worker 0 has the home's id, worker
    ``i`` that id with ``-i`` after it, so workers' leases are told apart and a restarted worker reclaims
    its own.
    """
    path = home / "node-id"
    try:
        value = path.read_text().strip()
    except FileNotFoundError:
        value = uuid.uuid4().hex
        # Written whole under another name, then linked into place: of workers starting together the first
        # link wins, and none reads a half-written file.
        tmp = path.with_name(f".node-id.{os.getpid()}")
        tmp.write_text(value + "\n")
        try:
            os.link(tmp, path)
        except FileExistsError:
            value = path.read_text().strip()
        finally:
            tmp.unlink()
    return value if process == 0 else f"{value}-{process}"


def create_app(settings: Settings | None = None) -> FastAPI:
    """The ASGI app of a whole node; its lifespan starts and stops the node."""
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        node = await Node.start(settings)
        app.state.node = node
        try:
            if node.changes is not None:  # a key revoked on another node stops working here at once
                node.changes.forget_key = app.state.guard.forget
                node.changes.forget_keys = app.state.guard.forget_all
            if settings.auth == "on":
                await auth.ensure_first_admin_key(node.store)
            log.info("nimbus node %s ready on http://%s:%s (driver %s, store %s, auth %s)",
                     node.registry.node_id if node.registry else "?", settings.host, settings.port,
                     settings.driver, node.store.dialect, settings.auth)
            if settings.console == "on":
                log.info("console: http://%s:%s/console/%s", settings.host, settings.port,
                         " (sign in with an API key)" if settings.auth == "on" else "")
            note = getattr(node.driver, "templates_note", None)
            if note:
                log.info("template machines: %s", note)
            log.info("function templates: %s", node.pool.snapshots.note)
            # What start-up made (modules, the app, the store's metadata) lives as long as the node: out
            # of the collector's sight it is not walked again by every full collection, which took 60-100
            # ms here and stalled every call in flight (the warm p99 at concurrency 32).
            gc.collect()
            gc.freeze()
            yield
        finally:
            await node.stop()

    return build_api(lifespan)


def serve(settings: Settings, sockets: list | None = None) -> bool:
    """Run a node in the foreground until SIGINT/SIGTERM (uvicorn drains requests, then the lifespan stops).

    ``sockets``: listening sockets to serve instead of binding ``host:port`` (a worker of
    ``nimbus.processes``). Whether the node started (False: its start-up failed).
    """
    import uvicorn

    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = create_app(settings)

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            node = getattr(app.state, "node", None)
            if node is not None and not node.draining and settings.drain_s > 0:
                # Drain first: /health says 503 while calls are still served, so the balancer moves the
                # traffic away before this node stops listening. A second signal stops it at once.
                node.begin_drain()
                loop = asyncio.get_event_loop()
                loop.call_soon_threadsafe(loop.call_later, settings.drain_s, super().handle_exit, sig, frame)
                log.info("draining for %g s (NIMBUS_DRAIN_S) before stopping", settings.drain_s)
                return
            if node is not None:
                # Stop claiming async work the moment the signal lands, not after HTTP connections drain.
                node.begin_drain()
                node.scheduler.stop_claiming()
            super().handle_exit(sig, frame)

    server = Server(server_config(app, settings))
    server.run(sockets=sockets)
    return server.started


def server_config(app, settings: Settings, **overrides):
    """The uvicorn configuration of a node: its address, and deadlines for clients slow to send a request.

    ``overrides``: other ``uvicorn.Config`` arguments (tests serve on port 0 with quieter logs).
    """
    import uvicorn

    from nimbus.gateway.deadlines import protocol_class

    options = dict(host=settings.host, port=settings.port, log_level=settings.log_level, access_log=False,
                   timeout_graceful_shutdown=30, timeout_keep_alive=settings.keepalive_s,
                   http=protocol_class(settings.header_timeout_s, settings.body_timeout_s))
    return uvicorn.Config(app, **{**options, **overrides})


async def bundled_sdk(settings: Settings, runtimes: list[str] | None = None) -> dict[str, str]:
    """runtime → host directory of the AWS SDK its machines get, built first if this host lacks it.

    Before any machine boots, so every machine of a runtime has it, blank ones included (every runtime
    that bundles one, ``runtimes`` or not: pre-warmed or not, its functions run). Empty when
    ``sdk_layer`` is off, and on the Firecracker driver, whose guest images do not carry it yet.
    """
    if not settings.sdk_layer:
        return {}
    if settings.driver != "bwrap":
        log.warning("the %s driver's machines get no bundled AWS SDK (NIMBUS_SDK_LAYER): its guest images "
                    "do not carry one yet", settings.driver)
        return {}
    cache = settings.sdk_cache.expanduser().resolve()
    return await sdk.ensure_all(runtimes or sdk.RUNTIMES, cache, sdk.layer_builder(cache))


def _driver_options(settings: Settings, sdk_dirs: dict[str, str] | None = None) -> dict:
    """The chosen driver's own keyword arguments, from the settings (``sdk_dirs``: from :func:`bundled_sdk`)."""
    reply_buffer_bytes = settings.reply_buffer_mb << 20
    if settings.driver == "bwrap":
        return {"use_templates": {"auto": None, "on": True, "off": False}[settings.templates],
                "uid_base": settings.machine_uid_base, "uid_count": settings.machine_uid_count,
                "reply_buffer_bytes": reply_buffer_bytes, "sdk": sdk_dirs or {}}
    from nimbus.machines.firecracker import FirecrackerConfig

    return {"config": FirecrackerConfig(
        firecracker=settings.firecracker_bin.resolve(),
        jailer=settings.jailer_bin.resolve() if settings.jailer == "on" else None,
        chroot_base=settings.chroot_base.resolve(),
        uid=settings.jail_uid,
        gid=settings.jail_gid,
        kernel=settings.kernel.resolve() if settings.kernel else None,
        snapshots=settings.snapshots == "on",
    ), "reply_buffer_bytes": reply_buffer_bytes}
