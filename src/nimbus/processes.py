"""Several worker processes per node (``NIMBUS_PROCESSES``): a small supervisor and N whole nodes.

One Python process uses about one core, so a node alone on a bigger host serves N worker processes, each a
whole node (store connection, driver, pool, scheduler) serving the same ``host:port`` and the same store.
With ``processes = 1`` none of this runs: ``nimbus up`` serves in its own process as before.

How the workers share what they share:

- **The port.** The supervisor binds one listening socket and every worker serves it (uvicorn's
  ``Server.run(sockets=...)``), rather than each worker binding its own with ``SO_REUSEPORT``. With
  ``SO_REUSEPORT`` the kernel hands each connection to a worker by a hash of its address, whether that
  worker is busy or not, and the connections waiting in a dying worker's own queue are reset; on one shared
  socket a connection goes to whichever worker's loop is free to accept it first, so a busy worker takes
  fewer, and a restarted worker serves the same queue at once. The supervisor holds the socket, so the
  port stays bound while a worker restarts. uvicorn's own ``workers=`` supervisor cannot tell a worker its
  index, which the slicing below needs; this one does, and restarts with a back-off.
- **The store.** SQLite (WAL mode, ``BEGIN IMMEDIATE`` for transactions, ``busy_timeout`` for other
  processes) or PostgreSQL, as several nodes share one today. Every worker runs all the background duties:
  async claims are one ``UPDATE … RETURNING`` statement, which SQLite runs under its file write lock (so
  two workers never take the same row; ``FOR UPDATE SKIP LOCKED`` on PostgreSQL); a schedule's tick is a
  unique (schedule, fire time) row inserted in the transaction that queues its call, so it fires once;
  retention sweeps delete under the same lock and each worker measures tenants' usage for its own budget
  checks. Nothing is only multi-node-safe on PostgreSQL.
- **Caches.** A write through one worker clears that worker's function cache only: the others see a
  changed or deleted function within ``function_cache_s``, as other nodes on one database do.
- **Identity.** Worker ``i`` has the node id of the home with ``-i`` after it (``nimbus.app.node_id``), so
  leases tell workers apart and a restarted worker hands back the async work it held.
- **Budgets.** Each worker gets an equal share (rounded down, at least 1) of ``max_machines``,
  ``max_warm`` (at least ``min_warm``), ``max_function_templates``, ``workers``, ``queue_size``,
  ``code_cache_mb``, ``reply_buffer_mb``, ``build_concurrency`` and the per-caller ``rate_limit`` and
  ``rate_burst`` (a caller on one connection gets one worker's share), so the node as a whole keeps its
  bounds; ``min_warm`` and ``per_call_spares`` are floors and stay whole per worker. Machine host uids are
  a security boundary: worker ``i`` gets the ``i``-th of N disjoint slices of
  ``[machine_uid_base, machine_uid_base + machine_uid_count)``, so two machines of different workers never
  share a uid. Machine cgroups are named by random machine ids under the one ``nimbus`` directory, and the
  home's shared files (layers, the seccomp program, the SDK cache) are written under temporary names and
  renamed into place, so workers do not collide there either.

The supervisor passes SIGTERM on to every worker at the first SIGTERM or SIGINT (each drains its HTTP
connections and flushes the store) and waits for all; a later signal is passed on as SIGINT, which makes
uvicorn stop at once. A worker that dies is started again after a back-off. Workers get SIGTERM when the
supervisor dies (``PR_SET_PDEATHSIG``), even by ``kill -9``.
"""

from __future__ import annotations

import ctypes
import logging
import math
import multiprocessing
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from multiprocessing.connection import wait
from multiprocessing.process import BaseProcess

from nimbus.config import Settings

log = logging.getLogger("nimbus.processes")

STARTUP_FAILURE = 3  # a worker's exit status when its node did not start (uvicorn's own)
RESTART_BASE_S = 0.5  # back-off before restarting a worker that died; doubles with each quick death
RESTART_MAX_S = 30.0
STABLE_S = 30.0  # a worker that ran this long before dying is restarted after RESTART_BASE_S again
PR_SET_PDEATHSIG = 1
# A worker's sentinel pipe says when it exits, unless a process it started still holds the pipe's other end:
# the exit status is polled this often as well.
POLL_S = 1.0

_spawn = multiprocessing.get_context("spawn")


def worker_settings(settings: Settings, index: int) -> Settings:
    """The settings of worker ``index`` of ``settings.processes``: its share of every node-wide budget."""
    n = settings.processes
    if not 0 <= index < n:
        raise ValueError(f"worker {index} of {n}")
    if n == 1:
        return settings

    def share(total: int, floor: int = 1) -> int:
        return max(floor, total // n)

    uids = settings.machine_uid_count // n
    update = {
        "machine_uid_base": settings.machine_uid_base + index * uids,
        "machine_uid_count": uids,
        "max_machines": share(settings.max_machines),
        "max_warm": share(settings.max_warm, settings.min_warm),
        "max_function_templates": share(settings.max_function_templates, min(1, settings.max_function_templates)),
        "workers": share(settings.workers),
        "queue_size": share(settings.queue_size),
        "code_cache_mb": settings.code_cache_mb // n,
        "reply_buffer_mb": share(settings.reply_buffer_mb),
        "build_concurrency": share(settings.build_concurrency),
        "rate_limit": settings.rate_limit / n,
        "rate_burst": math.ceil(settings.rate_burst / n),
    }
    mine = settings.model_copy(update=update)
    mine._process_index = index
    return mine


def supervise(settings: Settings) -> int:
    """Bind ``host:port``, run ``settings.processes`` workers on it until a signal; the exit status."""
    from nimbus.app import server_config

    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    _prepare_cgroups(settings)
    sock = server_config("nimbus.app:create_app", settings).bind_socket()
    try:
        return Supervisor(settings, sock).run()
    finally:
        sock.close()


def _prepare_cgroups(settings: Settings) -> None:
    """On cgroup v2 a node moves itself into a leaf so its own cgroup can hold machine cgroups; that works
    only when it is alone there, so the supervisor moves first and its workers are born in the leaf."""
    if settings.driver != "bwrap" or os.geteuid() != 0:
        return
    from nimbus.machines import cgroups

    try:
        cgroups.Hierarchy.detect().close()
    except cgroups.CgroupUnavailable:
        pass  # each worker finds the same and falls back to rlimits, saying so


@dataclass
class _Slot:
    """One worker's place: its process now, and when to start the next one."""

    index: int
    process: BaseProcess | None = None
    started_at: float = 0.0
    starts: int = 0
    quick_deaths: int = 0
    restart_at: float | None = None
    exitcodes: list[int] = field(default_factory=list)


class Supervisor:
    """Starts the workers, restarts one that dies, passes signals on and waits for all to stop."""

    def __init__(self, settings: Settings, sock: socket.socket) -> None:
        self.settings = settings
        self.sock = sock
        self.slots = [_Slot(i) for i in range(settings.processes)]
        self.stopping = False
        self.status = 0
        self._signals: list[int] = []

    def run(self) -> int:
        wake_r, wake_w = socket.socketpair()
        wake_r.setblocking(False)
        wake_w.setblocking(False)
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        old_fd = signal.set_wakeup_fd(wake_w.fileno())
        try:
            log.info("starting %d worker processes (supervisor pid %d)", len(self.slots), os.getpid())
            for slot in self.slots:
                self._start(slot)
            while True:
                self._handle_signals()
                self._reap()
                if self.stopping and not any(self._running(slot) for slot in self.slots):
                    break
                self._restart_due()
                sentinels = [s.process.sentinel for s in self.slots
                             if s.process is not None and s.process.exitcode is None]
                wait([wake_r, *sentinels], timeout=self._next_timeout())  # see POLL_S
                try:
                    while wake_r.recv(512):
                        pass
                except BlockingIOError:
                    pass
        finally:
            signal.set_wakeup_fd(old_fd)
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            wake_r.close()
            wake_w.close()
        log.info("all worker processes stopped")
        return self.status

    def _on_signal(self, sig: int, _frame) -> None:
        self._signals.append(sig)

    def _handle_signals(self) -> None:
        while self._signals:
            sig = self._signals.pop(0)
            forward = signal.SIGINT if self.stopping else signal.SIGTERM
            if not self.stopping:
                log.info("received %s: stopping the worker processes", signal.Signals(sig).name)
            self.stopping = True
            self._send_all(forward)

    def _send_all(self, sig: int) -> None:
        for slot in self.slots:
            if self._running(slot) and slot.process is not None and slot.process.pid is not None:
                try:
                    os.kill(slot.process.pid, sig)
                except ProcessLookupError:
                    pass

    @staticmethod
    def _running(slot: _Slot) -> bool:
        return slot.process is not None and slot.process.exitcode is None

    def _start(self, slot: _Slot) -> None:
        process = _spawn.Process(target=_worker, args=(self.settings, slot.index, self.sock, os.getpid()),
                                 name=f"nimbus-worker-{slot.index}")
        process.start()
        slot.process, slot.started_at, slot.restart_at = process, time.monotonic(), None
        slot.starts += 1
        log.info("worker %d: pid %s", slot.index, process.pid)

    def _reap(self) -> None:
        for slot in self.slots:
            process = slot.process
            if process is None or process.exitcode is None:
                continue
            process.join()
            code = process.exitcode
            slot.exitcodes.append(code)
            slot.process = None
            if self.stopping:
                continue
            if code == STARTUP_FAILURE and slot.starts == 1:
                # The first start failed: the configuration, the store or the host is wrong, and every
                # restart would fail the same way.
                log.error("worker %d could not start its node: stopping", slot.index)
                self.status = STARTUP_FAILURE
                self.stopping = True
                self._send_all(signal.SIGTERM)
                continue
            lived = time.monotonic() - slot.started_at
            slot.quick_deaths = 0 if lived >= STABLE_S else slot.quick_deaths + 1
            delay = min(RESTART_MAX_S, RESTART_BASE_S * 2 ** max(0, slot.quick_deaths - 1))
            slot.restart_at = time.monotonic() + delay
            log.warning("worker %d (pid %s) exited with %s after %.1f s; restarting it in %.1f s",
                        slot.index, process.pid, code, lived, delay)

    def _restart_due(self) -> None:
        now = time.monotonic()
        for slot in self.slots:
            if slot.process is None and slot.restart_at is not None and slot.restart_at <= now \
                    and not self.stopping:
                self._start(slot)

    def _next_timeout(self) -> float:
        due = [s.restart_at for s in self.slots if s.process is None and s.restart_at is not None]
        return POLL_S if not due or self.stopping else min(POLL_S, max(0.0, min(due) - time.monotonic()))


def _worker(settings: Settings, index: int, sock: socket.socket, parent: int) -> None:
    """A worker process's main: a whole node on the supervisor's socket."""
    _die_with(parent)
    _close_on_exec()
    from nimbus.app import serve

    started = serve(worker_settings(settings, index), sockets=[sock])
    sys.exit(0 if started else STARTUP_FAILURE)


def _close_on_exec() -> None:
    """Make every descriptor this worker was born with close-on-exec, as all of a node's own are (PEP 446).

    ``spawn`` hands the listening socket, its sentinel pipe and the resource tracker's pipe over as
    inheritable descriptors; left so, they reached the machines' sandboxes (a machine holding the node's
    listening socket could accept its connections).
    """
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd > 2:
            try:
                os.set_inheritable(fd, False)
            except OSError:  # the directory's own descriptor, closed by now
                pass


def _die_with(parent: int) -> None:
    """SIGTERM this process when ``parent`` dies (``kill -9`` included), so no worker outlives the supervisor."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG)")
    if os.getppid() != parent:  # it died before the line above
        sys.exit(0)


__all__ = ["STARTUP_FAILURE", "Supervisor", "supervise", "worker_settings"]
