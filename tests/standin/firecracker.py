#!/usr/bin/env python3
"""A TEST STAND-IN for the ``firecracker`` binary. It is NOT Firecracker and boots no virtual machine.

No firecracker binary and no usable KVM exist where Nimbus is developed, so the Firecracker driver's
process handling (start, API calls, vsock, snapshots, shutdown) is tested against this executable. It
lives under ``tests/`` only and is never used by ``make run``. Run it as::

    python tests/standin/firecracker.py --api-sock PATH [--id ID]     (or through install()'s wrapper)
    python tests/standin/firecracker.py --version    → "Firecracker v1.10.0 (nimbus test stand-in)"

What it does, following Firecracker's API schema (``firecracker.yaml``) and its vsock, jailer and
snapshot documents:

* Command line: ``--api-sock`` (default ``/run/firecracker.socket``) and ``--id`` (letters, digits,
  hyphens, at most 64; default ``anonymous-instance``) are used; ``--version`` and ``--help`` answer.
  Flags that only tune timing, seccomp or logging (:data:`IGNORED_VALUE_FLAGS`, :data:`IGNORED_SWITCHES`;
  the jailer passes ``--start-time-us`` and ``--start-time-cpu-us``) are accepted and ignored. Other
  flags Firecracker knows but the stand-in does not model (``--config-file``, ``--no-api``…) and
  unknown flags are refused: a message on stderr, exit 1. An existing file at the API socket's path
  is refused too (exit 1), as the socket cannot be bound.
* The API socket serves HTTP/1.1 with keep-alive. Every call is checked against the schema: a method
  and path it lacks is a ``400`` fault; a body that is not JSON or fails its definition (unknown keys
  refused) is a ``400`` ``{"fault_message": …}``. Calls run one at a time, as on Firecracker's single
  API thread. Implemented: ``GET /``, ``/version``, ``/machine-config``, ``/vm/config``; ``PUT
  /boot-source``, ``/drives/{id}``, ``/machine-config``, ``/vsock``, ``/logger``, ``/metrics``,
  ``/network-interfaces/{id}``, ``/actions`` (InstanceStart, SendCtrlAltDel, FlushMetrics),
  ``/snapshot/create``, ``/snapshot/load``; ``PATCH /machine-config``, ``/vm``. Any other call the
  schema has (balloon, mmds, entropy, …) is a ``400`` fault saying the stand-in does not implement it.
* Rules enforced: a path id equals the body's id; pre-boot calls are refused once the VM started (or
  was restored); a kernel, initrd or drive file must exist when configured and again at InstanceStart,
  which also needs a boot source and a root drive; one root drive only; vCPUs 1 or even with SMT;
  memory > 0; metrics configured once; snapshot/create only when Paused (Diff only with
  ``track_dirty_pages``); snapshot/load only on a fresh process (only logger and metrics configured).
* Paths in bodies and ``--api-sock`` are relative to the working directory when relative. With
  ``NIMBUS_STANDIN_ROOT`` set (the jailer stand-in sets it to the jail's root and starts this in it),
  absolute paths are taken under that directory, emulating the jailer's chroot (``..`` cannot climb
  out of it). Sockets inside the working directory are bound by relative path, so a jail deep in a
  temporary directory still fits AF_UNIX's 108-byte limit.
* The vsock device: ``PUT /vsock`` binds the Unix socket at ``uds_path`` at once (an existing file is
  a fault). Each host connection is read for ``CONNECT <port>\\n``. The connection is closed without
  an answer — as ``vsock.md`` says when nothing listens — when the line is malformed, the VM is not
  Running (not started or paused), the port is not the agent's (9999), or the guest agent does not
  listen (yet, or any more: the stand-in's connect to the agent's socket, below, fails). Otherwise the
  stand-in has a connection to the agent, answers ``OK <host port>\\n`` (from ``1 << 30`` upward) and
  bridges it byte for byte to the agent (a half-close is passed on). Any number of host connections may be
  made over the VM's life; the agent serves them one at a time, in the order it accepts them (one
  made while another is open waits in its listen backlog, as on a real guest's vsock listener).
  A CONNECT whose host already hung up is treated like any other: bridged, it ends at once.
* "Booting": InstanceStart starts ONE real agent process (``nimbus.agent.main``, from this repository's
  ``src``) for the VM's life, in the listening mode a real Firecracker guest runs it in (``main()``
  with ``--vsock-port 9999``: ``_listen_host``, ``serve_listener`` and ``Agent`` all real) with one
  change, the address family: ``standin.agent.LISTEN_LAUNCH`` replaces ``listen_vsock`` with a Unix
  stream socket bound and listening at ``.nimbus-standin-guest-<stand-in pid>.sock`` in the working
  directory (shared by the stand-in and the agent; bound by that relative name, for AF_UNIX's 108
  bytes; removed at exit). It gets a fresh ``--task-dir`` (``.nimbus-standin-task-*`` in the working
  directory, removed at exit) and a sandbox-like environment; it runs as a plain host process (no VM,
  no sandbox) that is SIGKILLed by the kernel if the stand-in dies in any way (``PR_SET_PDEATHSIG``),
  so no agent outlives its "VMM". Its network is a namespace of its own holding only ``lo``, up (the
  guest's loopback, as its init brings it up; ``standin.agent``'s ``own_network``): what a function
  serves there (a ``provided`` function's Runtime API on 127.0.0.1:9001) is its VM's alone. The agent listens a few tens of milliseconds after InstanceStart
  (its imports); a CONNECT before that is closed without an answer, and the host's retry succeeds.
  The agent keeps listening for its whole life: when a connection ends (the host's end of stream, or
  a reset) it accepts the next one, with the same function loaded. It ends on a protocol violation
  (an unknown or malformed frame), on SIGTERM, or when killed.
* The guest powering off: when the agent process exits (for whatever reason; its status is logged),
  the stand-in removes its sockets and exits 0, as Firecracker exits when its guest shuts down (the
  guest's init powers off when the agent ends). A host hanging up does not end the agent, so it does
  not power the VM off. SendCtrlAltDel sends the agent SIGTERM, which ends it. SIGTERM or SIGINT to
  the stand-in: the agent is killed, the sockets removed, exit 0.
* ``PATCH /vm``: Paused sends the agent SIGSTOP, Resumed SIGCONT (a stopped process also stops
  answering on an open bridge, as paused vCPUs would).
* Snapshots — the stand-in does NOT snapshot memory or any process state. ``/snapshot/create`` writes
  ``snapshot_path`` as JSON holding the VM's configuration (boot source, drives, machine config, vsock,
  network interfaces) and a marker saying it is a stand-in snapshot; ``mem_file_path`` becomes a
  sparse file of ``mem_size_mib`` MiB (truncated, never written). It then resets the vsock device as
  Firecracker does: every open host connection is closed (the host sees its end close), the listener
  is not. The paused agent reads the end of that connection when resumed and accepts the next one,
  so after Resumed a new CONNECT reaches the same agent process, with the function it had loaded.
  ``/snapshot/load`` reads that JSON (a ``400`` fault if it is missing or not a stand-in snapshot),
  needs the memory file (``mem_backend`` File, or the deprecated ``mem_file_path``; exactly one; size
  ``mem_size_mib`` MiB; ``Uffd`` is not modelled) and every drive file at the paths recorded (the
  snapshot document: host resources at the same relative paths), binds the vsock socket at
  ``vsock_override.uds_path`` or the recorded ``uds_path``. A load that fails after those checks
  start is answered with a fault and then the process exits 1 (the document: "the current Firecracker
  process is ended"). Loaded, the VM is Paused, or Running with ``resume_vm``. Since no memory is
  snapshotted, running for the first time after a load starts a FRESH agent process, listening as at
  InstanceStart: a function initialised before the snapshot is NOT there after the load (unlike a real
  restore, where the agent process and the function it loaded come back); the host must init again.
* Logger: lines go to stderr, and also to ``log_path`` once ``PUT /logger`` named one (created if
  missing; level ``Off`` writes none there). Metrics: FlushMetrics appends one JSON line of the
  stand-in's own counters to ``metrics_path``.

What it does NOT do: run a kernel or a guest, use KVM, emulate any device but the vsock's host side,
open TAP devices (network interfaces are recorded only), apply rate limiters, CPU templates or huge
pages, implement balloon/MMDS/entropy/serial/pmem/hotplug, guest-initiated vsock connections
(``uds_path_<port>``), guest ports other than the agent's, diff snapshots' dirty-page tracking,
memory or process snapshots (a loaded VM's guest is a new agent), or seccomp.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

if __name__ == "__main__":  # run as a script: import ``standin`` from tests/, not siblings from tests/standin/
    _HERE = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
    sys.path.insert(0, str(_HERE.parent))

import asyncio
import contextlib
import json
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from urllib.parse import unquote

from standin import agent as guest
from standin import muxer, schema, wire

VERSION = "1.10.0"
VERSION_LINE = f"Firecracker v{VERSION} (nimbus test stand-in)"
APP_NAME = "Firecracker"
DEFAULT_API_SOCK = "/run/firecracker.socket"
DEFAULT_ID = "anonymous-instance"
ID_MAX_LEN = 64
AGENT_PORT = 9999  # where the guest agent listens (docs/architecture.md#frame-protocol)
ROOT_ENV = "NIMBUS_STANDIN_ROOT"
GUEST_SOCKET = ".nimbus-standin-guest-{pid}.sock"  # the agent's "AF_VSOCK" listener, in the cwd; pid: the stand-in's
SNAPSHOT_MARKER = "nimbus-standin-snapshot"
SNAPSHOT_FORMAT = 1
MIB = 1 << 20
DEFAULT_MACHINE_CONFIG = {"vcpu_count": 1, "mem_size_mib": 128, "smt": False, "track_dirty_pages": False}

IGNORED_VALUE_FLAGS = frozenset({"--start-time-us", "--start-time-cpu-us", "--parent-cpu-time-us",
                                 "--seccomp-filter", "--http-api-max-payload-size", "--mmds-size-limit",
                                 "--level", "--module"})
IGNORED_SWITCHES = frozenset({"--no-seccomp", "--show-level", "--show-log-origin", "--boot-timer"})
NOT_MODELLED_FLAGS = frozenset({"--config-file", "--no-api", "--log-path", "--metrics-path",
                                "--describe-snapshot", "--enable-pci", "--metadata"})
USAGE = ("usage: firecracker [--api-sock PATH] [--id ID] [--version] [--help]\n"
         "(nimbus test stand-in for Firecracker; see tests/standin/firecracker.py)")

NOT_STARTED, RUNNING, PAUSED = "Not started", "Running", "Paused"
PRE_BOOT_REFUSED = "The requested operation is not supported after starting the microVM."


class UsageError(Exception):
    pass


class Fault(Exception):
    """A call refused: answered ``400`` with this message."""


class LoadFailed(Fault):
    """A snapshot load that failed past its pre-checks: answered, then the process ends."""


def parse_args(argv: list[str]) -> dict:
    options = {"api_sock": DEFAULT_API_SOCK, "id": DEFAULT_ID, "version": False, "help": False}
    seen: set[str] = set()
    args = list(argv)
    while args:
        arg = args.pop(0)
        name, eq, value = arg.partition("=")
        if name in seen:
            raise UsageError(f"argument {name!r} was given more than once")
        seen.add(name)
        if name in ("--version", "--help") or name in IGNORED_SWITCHES:
            if eq:
                raise UsageError(f"argument {name!r} takes no value")
            if name in ("--version", "--help"):
                options[name[2:]] = True
            continue
        if name in NOT_MODELLED_FLAGS:
            raise UsageError(f"argument {name!r} is Firecracker's but the nimbus test stand-in does not model it")
        if name not in ("--api-sock", "--id") and name not in IGNORED_VALUE_FLAGS:
            raise UsageError(f"found argument {arg!r} which wasn't expected, or isn't valid in this context")
        if not eq:
            if not args:
                raise UsageError(f"argument {name!r} needs a value")
            value = args.pop(0)
        if name == "--api-sock":
            if not value:
                raise UsageError("--api-sock needs a path")
            options["api_sock"] = value
        elif name == "--id":
            if not re.fullmatch(r"[A-Za-z0-9-]{1,64}", value):
                raise UsageError(f"invalid instance id {value!r}: letters, digits and hyphens, 1 to {ID_MAX_LEN}")
            options["id"] = value
    return options


def host_path(path: str) -> Path:
    """Where the file a body names is on this host: relative to the cwd, absolute ones under the jail root."""
    root = os.environ.get(ROOT_ENV)
    if os.path.isabs(path):
        if root:
            return Path(root) / os.path.normpath(path).lstrip("/")
        return Path(path)
    return Path.cwd() / path


def bind_name(path: Path) -> str:
    """The name to bind a socket at ``path`` by: relative when it is inside the cwd (AF_UNIX paths are short)."""
    cwd = Path.cwd()
    try:
        return str(path.relative_to(cwd))
    except ValueError:
        return str(path)


class StandInVmm:
    """One stand-in Firecracker process: its API server, "VM" state, vsock device and guest agent."""

    def __init__(self, options: dict, spec: dict) -> None:
        self.id = options["id"]
        self.api_path = host_path(options["api_sock"])
        self.spec = spec
        self.state = NOT_STARTED
        self.loaded = False  # restored from a snapshot
        self.boot_source: dict | None = None
        self.drives: dict[str, dict] = {}
        self.machine_config = dict(DEFAULT_MACHINE_CONFIG)
        self.machine_config_set = False
        self.vsock: dict | None = None
        self.network_interfaces: dict[str, dict] = {}
        self.logger: dict | None = None
        self.metrics: dict | None = None
        self.log_file = None
        self.counters = {"api_requests": 0, "api_faults": 0, "vsock_connections": 0, "vsock_refused": 0}
        # the vsock device
        self.vsock_server: asyncio.AbstractServer | None = None
        self.vsock_name: str | None = None
        self.vsock_tasks: set[asyncio.Task] = set()
        self.next_host_port = muxer.HOST_PORT_BASE
        # the guest
        self.agent: asyncio.subprocess.Process | None = None
        self.guest_socket = GUEST_SOCKET.format(pid=os.getpid())  # relative to the cwd, which the agent shares
        self.task_dirs: list[str] = []
        self.watchers: set[asyncio.Task] = set()
        # the process
        self.api_server: asyncio.AbstractServer | None = None
        self.api_tasks: set[asyncio.Task] = set()
        self.lock = asyncio.Lock()
        self.done = asyncio.Event()
        self.exit_code = 0

    # ------------------------------------------------------------ the process

    def log(self, message: str, level: str = "INFO") -> None:
        line = f"{time.strftime('%Y-%m-%dT%H:%M:%S')} [{self.id}:stand-in:{level}] {message}"
        print(line, file=sys.stderr, flush=True)
        if self.log_file is not None:
            with contextlib.suppress(OSError):
                self.log_file.write(line + "\n")
                self.log_file.flush()

    def stop(self, code: int, why: str) -> None:
        if not self.done.is_set():
            self.exit_code = code
            self.log(f"exiting ({code}): {why}")
            self.done.set()

    async def run(self) -> int:
        if self.api_path.exists() or self.api_path.is_symlink():
            print(f"firecracker (nimbus test stand-in): cannot bind the API socket {self.api_path}: "
                  "a file exists there (Address in use)", file=sys.stderr)
            return 1
        try:
            self.api_server = await asyncio.start_unix_server(self._serve_api, path=bind_name(self.api_path))
        except OSError as exc:
            print(f"firecracker (nimbus test stand-in): cannot bind the API socket {self.api_path}: {exc}",
                  file=sys.stderr)
            return 1
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self.stop, 0, f"signal {signal.Signals(signum).name}")
        self.log(f"{VERSION_LINE}: API server listening on {self.api_path}")
        try:
            await self.done.wait()
        finally:
            await self._shut_down()
        return self.exit_code

    async def _shut_down(self) -> None:
        self.api_server.close()
        await self._close_vsock_device()
        for task in list(self.api_tasks):
            task.cancel()
        await asyncio.gather(*self.api_tasks, return_exceptions=True)
        if self.agent is not None and self.agent.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.agent.kill()
            await self.agent.wait()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.guest_socket)  # the agent leaves it (it ends with os._exit)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(bind_name(self.api_path))
        for path in self.task_dirs:
            shutil.rmtree(path, ignore_errors=True)
        if self.log_file is not None:
            self.log_file.close()

    # ------------------------------------------------------------ HTTP

    async def _serve_api(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.api_tasks.add(asyncio.current_task())
        try:
            while True:
                try:
                    request = await wire.read_request(reader)
                except wire.BadRequest as exc:
                    writer.write(wire.fault(400, f"bad HTTP request: {exc}"))
                    await writer.drain()
                    return
                if request is None:
                    return
                async with self.lock:
                    reply, end_process = await self.answer(request)
                writer.write(reply)
                await writer.drain()
                if end_process:
                    self.stop(1, "the snapshot load failed")
                    return
                if request.wants_close:
                    return
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self.api_tasks.discard(asyncio.current_task())
            writer.close()

    async def answer(self, request: wire.Request) -> tuple[bytes, bool]:
        """The response to one call, and whether the process ends after sending it."""
        self.counters["api_requests"] += 1
        method, path = request.method, request.path
        try:
            return await self._dispatch(method, path, request.body), False
        except LoadFailed as exc:
            self.counters["api_faults"] += 1
            self.log(f"{method} {path}: {exc}", "ERROR")
            return wire.fault(400, str(exc)), True
        except Fault as exc:
            self.counters["api_faults"] += 1
            self.log(f"{method} {path}: {exc}", "WARN")
            return wire.fault(400, str(exc)), False

    async def _dispatch(self, method: str, path: str, raw: bytes) -> bytes:
        found = schema.operation(self.spec, method, path)
        if found is None:
            raise Fault(f"Invalid request method and/or path: {method} {path}.")
        template, op = found
        params = {k: unquote(v) for k, v in schema.path_params(template, path).items()}
        body_schema = schema.body_schema(op)
        body = None
        if body_schema is None:
            if raw:
                raise Fault(f"{method} {path} takes no body")
        else:
            if not raw:
                raise Fault(f"{method} {path}: the request needs a JSON body")
            try:
                body = json.loads(raw)
            except ValueError as exc:
                raise Fault(f"the body is not JSON: {exc}") from None
            error = schema.body_error(self.spec, body_schema, body)
            if error is not None:
                raise Fault(f"invalid body for {method} {template}: {error}")
        handler = getattr(self, _handler_name(method, template), None)
        if handler is None:
            raise Fault(f"{method} {template} is not implemented by the nimbus test stand-in for Firecracker")
        self.log(f"{method} {path}", "DEBUG")
        answer = await handler(body, **params)
        return wire.response(204) if answer is None else wire.json_response(200, answer)

    def _pre_boot(self) -> None:
        if self.state != NOT_STARTED or self.loaded:
            raise Fault(PRE_BOOT_REFUSED)

    def _existing_file(self, path: str, what: str) -> Path:
        found = host_path(path)
        if not found.is_file():
            raise Fault(f"cannot open the {what} {path!r} ({found}): no such file")
        return found

    # ------------------------------------------------------------ questions

    async def get_(self, body) -> dict:
        return {"id": self.id, "state": self.state, "vmm_version": VERSION, "app_name": APP_NAME}

    async def get_version(self, body) -> dict:
        return {"firecracker_version": VERSION}

    async def get_machine_config(self, body) -> dict:
        return dict(self.machine_config)

    async def get_vm_config(self, body) -> dict:
        config = {"machine-config": dict(self.machine_config), "drives": list(self.drives.values()),
                  "network-interfaces": list(self.network_interfaces.values())}
        for key, value in (("boot-source", self.boot_source), ("vsock", self.vsock), ("logger", self.logger),
                           ("metrics", self.metrics)):
            if value is not None:
                config[key] = value
        return config

    # ------------------------------------------------------------ configuration

    async def put_boot_source(self, body) -> None:
        self._pre_boot()
        self._existing_file(body["kernel_image_path"], "kernel image")
        if "initrd_path" in body:
            self._existing_file(body["initrd_path"], "initrd")
        self.boot_source = body

    async def put_drives_drive_id(self, body, drive_id: str) -> None:
        self._pre_boot()
        if body["drive_id"] != drive_id:
            raise Fault(f"The id from the path ({drive_id!r}) does not match the id from the body "
                        f"({body['drive_id']!r}).")
        if "socket" in body or "path_on_host" not in body:
            raise Fault("vhost-user drives are not modelled by the stand-in: give path_on_host")
        self._existing_file(body["path_on_host"], "drive file")
        if body["is_root_device"] and any(d["is_root_device"] for i, d in self.drives.items() if i != drive_id):
            raise Fault("A root block device already exists.")
        self.drives[drive_id] = body

    def _check_machine_config(self, config: dict) -> None:
        if config["mem_size_mib"] < 1:
            raise Fault("The memory size (MiB) is invalid: it must be at least 1.")
        if config.get("smt") and config["vcpu_count"] > 1 and config["vcpu_count"] % 2:
            raise Fault("The vCPU number is invalid: with SMT it must be 1 or an even number.")

    async def put_machine_config(self, body) -> None:
        self._pre_boot()
        config = {**DEFAULT_MACHINE_CONFIG, **body}
        self._check_machine_config(config)
        self.machine_config = config
        self.machine_config_set = True

    async def patch_machine_config(self, body) -> None:
        self._pre_boot()
        config = {**self.machine_config, **body}
        self._check_machine_config(config)
        self.machine_config = config
        self.machine_config_set = True

    async def put_network_interfaces_iface_id(self, body, iface_id: str) -> None:
        self._pre_boot()
        if body["iface_id"] != iface_id:
            raise Fault(f"The id from the path ({iface_id!r}) does not match the id from the body "
                        f"({body['iface_id']!r}).")
        self.network_interfaces[iface_id] = body  # recorded only: the stand-in opens no TAP device

    async def put_vsock(self, body) -> None:
        self._pre_boot()
        await self._close_vsock_device()
        self.vsock = None
        await self._open_vsock_device(body["uds_path"])
        self.vsock = body

    async def put_logger(self, body) -> None:
        if "log_path" in body:
            try:
                log_file = open(host_path(body["log_path"]), "a")
            except OSError as exc:
                raise Fault(f"cannot open the log file {body['log_path']!r}: {exc}") from None
            if self.log_file is not None:
                self.log_file.close()
            self.log_file = None if body.get("level") == "Off" else log_file
            if self.log_file is None:
                log_file.close()
        self.logger = body
        self.log(f"logger configured: {body}")

    async def put_metrics(self, body) -> None:
        if self.metrics is not None:
            raise Fault("Reinitialization of metrics is not allowed.")
        try:
            host_path(body["metrics_path"]).open("a").close()
        except OSError as exc:
            raise Fault(f"cannot open the metrics file {body['metrics_path']!r}: {exc}") from None
        self.metrics = body

    # ------------------------------------------------------------ actions and state

    async def put_actions(self, body) -> None:
        action = body["action_type"]
        if action == "FlushMetrics":
            if self.metrics is None:
                raise Fault("The metrics system is not initialized: PUT /metrics first.")
            line = {"utc_timestamp_ms": int(time.time() * 1000), "nimbus_stand_in": True, **self.counters}
            if self.metrics.get("emit_id"):
                line["id"] = self.id
            if "properties" in self.metrics:
                line["properties"] = self.metrics["properties"]
            with host_path(self.metrics["metrics_path"]).open("a") as f:
                f.write(json.dumps(line) + "\n")
        elif action == "SendCtrlAltDel":
            if self.state == NOT_STARTED:
                raise Fault("SendCtrlAltDel: the microVM is not running.")
            if self.agent is not None and self.agent.returncode is None:
                self.log("Ctrl+Alt+Del: the guest shuts down (SIGTERM to the agent)")
                self.agent.send_signal(signal.SIGTERM)
        else:
            await self._instance_start()

    async def _instance_start(self) -> None:
        if self.state != NOT_STARTED or self.loaded:
            raise Fault("InstanceStart: the microVM is already running.")
        if self.boot_source is None:
            raise Fault("Cannot start the microVM without a kernel: configure the boot source.")
        self._existing_file(self.boot_source["kernel_image_path"], "kernel image")
        if "initrd_path" in self.boot_source:
            self._existing_file(self.boot_source["initrd_path"], "initrd")
        if not any(d["is_root_device"] for d in self.drives.values()):
            raise Fault("Cannot start the microVM without a root block device (is_root_device).")
        for drive in self.drives.values():
            self._existing_file(drive["path_on_host"], f"drive {drive['drive_id']!r} file")
        await self._boot_guest()
        self.state = RUNNING
        self.log("InstanceStart: the guest is running")

    async def patch_vm(self, body) -> None:
        if self.state == NOT_STARTED and not self.loaded:
            raise Fault("The microVM is not started: it cannot be paused or resumed.")
        if body["state"] == "Paused":
            if self.agent is not None and self.agent.returncode is None:
                self.agent.send_signal(signal.SIGSTOP)
            self.state = PAUSED
        else:
            if self.agent is None:
                await self._boot_guest()  # a VM loaded from a snapshot runs for the first time
            elif self.agent.returncode is None:
                self.agent.send_signal(signal.SIGCONT)
            self.state = RUNNING
        self.log(f"the VM is {self.state}")

    # ------------------------------------------------------------ snapshots

    async def put_snapshot_create(self, body) -> None:
        if self.state != PAUSED:
            raise Fault(f"Cannot create a snapshot: the microVM must be Paused, it is {self.state}.")
        if body.get("snapshot_type", "Full") == "Diff" and not self.machine_config.get("track_dirty_pages"):
            raise Fault("Diff snapshots need dirty page tracking (track_dirty_pages) enabled.")
        state_file = host_path(body["snapshot_path"])
        mem_file = host_path(body["mem_file_path"])
        for path, what in ((state_file, "snapshot_path"), (mem_file, "mem_file_path")):
            if not path.parent.is_dir():
                raise Fault(f"cannot create the {what} {body[what]!r}: {path.parent} is not a directory")
        snapshot = {
            "format": SNAPSHOT_MARKER, "version": SNAPSHOT_FORMAT,
            "note": ("written by the nimbus test stand-in for Firecracker: the VM's configuration only, "
                     "no guest memory or device state"),
            "vmm_version": VERSION, "id": self.id, "snapshot_type": body.get("snapshot_type", "Full"),
            "boot_source": self.boot_source, "drives": list(self.drives.values()),
            "machine_config": self.machine_config, "vsock": self.vsock,
            "network_interfaces": list(self.network_interfaces.values()),
        }
        try:
            state_file.write_text(json.dumps(snapshot, indent=1))
            with mem_file.open("wb") as f:
                f.truncate(self.machine_config["mem_size_mib"] * MIB)  # sparse: nothing of it is written
        except OSError as exc:
            raise Fault(f"cannot write the snapshot: {exc}") from None
        await self._reset_vsock_connections()
        self.log(f"snapshot written to {body['snapshot_path']} and {body['mem_file_path']}")

    async def put_snapshot_load(self, body) -> None:
        if self.state != NOT_STARTED or self.loaded:
            raise Fault(PRE_BOOT_REFUSED)
        if (self.boot_source is not None or self.drives or self.machine_config_set or self.vsock is not None
                or self.network_interfaces):
            raise Fault("Loading a microVM snapshot is not allowed after configuring boot-specific resources.")
        if ("mem_backend" in body) == ("mem_file_path" in body):
            raise Fault("Exactly one of mem_backend and mem_file_path must be given.")
        if body.get("enable_diff_snapshots") is not None and body.get("track_dirty_pages") is not None:
            raise Fault("enable_diff_snapshots and track_dirty_pages are mutually exclusive.")
        backend = body.get("mem_backend") or {"backend_type": "File", "backend_path": body["mem_file_path"]}
        if backend["backend_type"] != "File":
            raise Fault("mem_backend Uffd is not modelled by the nimbus test stand-in.")
        if body.get("network_overrides"):
            raise Fault("network_overrides are not modelled by the nimbus test stand-in.")
        # From here on a failure ends the process, as Firecracker's does.
        state_file = host_path(body["snapshot_path"])
        try:
            snapshot = json.loads(state_file.read_text())
        except (OSError, ValueError) as exc:
            raise LoadFailed(f"cannot load the snapshot {body['snapshot_path']!r}: {exc}") from None
        if not isinstance(snapshot, dict) or snapshot.get("format") != SNAPSHOT_MARKER:
            raise LoadFailed(f"{body['snapshot_path']!r} is not a snapshot written by the nimbus test stand-in")
        mem_file = host_path(backend["backend_path"])
        size = snapshot["machine_config"]["mem_size_mib"] * MIB
        if not mem_file.is_file():
            raise LoadFailed(f"cannot open the memory file {backend['backend_path']!r}: no such file")
        if mem_file.stat().st_size != size:
            raise LoadFailed(f"the memory file {backend['backend_path']!r} is {mem_file.stat().st_size} bytes, "
                             f"the snapshot's guest has {size}")
        for drive in snapshot["drives"]:
            if not host_path(drive["path_on_host"]).is_file():
                raise LoadFailed(f"cannot open drive {drive['drive_id']!r}: {drive['path_on_host']!r} is not "
                                 "at the path the snapshot was taken with")
        vsock = snapshot["vsock"]
        if vsock is not None:
            if "vsock_override" in body:
                vsock = {**vsock, "uds_path": body["vsock_override"]["uds_path"]}
            try:
                await self._open_vsock_device(vsock["uds_path"])
            except Fault as exc:
                raise LoadFailed(str(exc)) from None
        elif "vsock_override" in body:
            raise LoadFailed("vsock_override given, but the snapshot has no vsock device")
        self.boot_source = snapshot["boot_source"]
        self.drives = {d["drive_id"]: d for d in snapshot["drives"]}
        self.machine_config = dict(snapshot["machine_config"])
        self.machine_config["track_dirty_pages"] = bool(body.get("track_dirty_pages")
                                                        or body.get("enable_diff_snapshots"))
        self.network_interfaces = {n["iface_id"]: n for n in snapshot["network_interfaces"]}
        self.vsock = vsock
        self.loaded = True
        self.state = PAUSED
        self.log(f"snapshot {body['snapshot_path']} loaded (configuration only: the guest starts afresh)")
        if body.get("resume_vm"):
            await self._boot_guest()
            self.state = RUNNING
            self.log("the VM is Running")

    # ------------------------------------------------------------ the guest

    async def _boot_guest(self) -> None:
        """Start the agent process: the real agent in its ``--vsock-port`` mode, listening on a Unix socket."""
        # In the working directory (the jail's root under the jailer stand-in): if this process is killed
        # before it can remove the directory, it goes with the caller's scratch directory, not /tmp.
        task_dir = tempfile.mkdtemp(prefix=".nimbus-standin-task-", dir=os.getcwd())
        self.task_dirs.append(task_dir)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.guest_socket)  # left by a killed stand-in of the same pid: the agent binds afresh
        try:
            self.agent = await guest.start_listening_agent(self.guest_socket, task_dir, stderr=None,
                                                           die_with_parent=True, own_network=True)
        except (OSError, subprocess.SubprocessError) as exc:
            raise Fault(f"the stand-in could not start the guest agent: {exc}") from None
        self.log(f"guest agent started (pid {self.agent.pid}), to listen on guest port {AGENT_PORT} "
                 f"(a Unix socket at {self.guest_socket})")
        self.watchers.add(asyncio.get_running_loop().create_task(self._watch_agent(self.agent)))

    async def _watch_agent(self, proc: asyncio.subprocess.Process) -> None:
        code = await proc.wait()
        self.stop(0, f"the guest powered off (its agent exited with status {code})")

    async def _connect_agent(self) -> socket.socket | None:
        """A connection to the agent's listener, or None when it does not listen (yet, or any more)."""
        if self.agent is None or self.agent.returncode is not None:
            return None
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            await asyncio.get_running_loop().sock_connect(sock, self.guest_socket)
        except OSError:  # no socket file yet (the agent is starting), or nothing accepts on it
            sock.close()
            return None
        except BaseException:
            sock.close()
            raise
        return sock

    # ------------------------------------------------------------ the vsock device

    async def _open_vsock_device(self, uds_path: str) -> None:
        path = host_path(uds_path)
        if path.exists() or path.is_symlink():
            raise Fault(f"cannot bind the vsock socket {uds_path!r} ({path}): Address in use")
        name = bind_name(path)
        try:
            self.vsock_server = await asyncio.start_unix_server(self._vsock_connection, path=name)
        except OSError as exc:
            raise Fault(f"cannot bind the vsock socket {uds_path!r} ({path}): {exc}") from None
        self.vsock_name = name
        self.log(f"vsock device listening on {path}")

    async def _close_vsock_device(self) -> None:
        if self.vsock_server is not None:
            self.vsock_server.close()
            self.vsock_server = None
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.vsock_name)
        await self._reset_vsock_connections()

    async def _reset_vsock_connections(self) -> None:
        """Close every host connection, as Firecracker's vsock device reset does."""
        for task in list(self.vsock_tasks):
            task.cancel()
        await asyncio.gather(*self.vsock_tasks, return_exceptions=True)

    async def _vsock_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self.vsock_tasks.add(task)
        try:
            line = await muxer.read_connect(reader)
            port = muxer.parse_connect(line)
            why = None
            if port is None:
                why = f"not a CONNECT command: {line!r}"
            elif self.state != RUNNING:
                why = f"the guest is not running ({self.state})"
            elif port != AGENT_PORT:
                why = f"nothing listens on guest port {port}"
            else:
                agent_sock = await self._connect_agent()
                if agent_sock is None:
                    why = f"the guest agent does not listen on port {port} (not yet, or no more)"
            if why is not None:
                self.counters["vsock_refused"] += 1
                self.log(f"vsock: closing a host connection without answer: {why}")
                return
            self.counters["vsock_connections"] += 1
            host_port = self.next_host_port
            self.next_host_port += 1
            try:
                writer.write(muxer.ok_line(host_port))
                await writer.drain()
            except BaseException:
                agent_sock.close()  # the host hung up before its answer: the agent sees this connection end
                raise
            self.log(f"vsock: host port {host_port} connected to guest port {port}")
            await muxer.bridge(reader, writer, agent_sock)
            self.log(f"vsock: the connection of host port {host_port} ended")
        except (asyncio.CancelledError, ConnectionError):
            pass
        finally:
            self.vsock_tasks.discard(task)
            writer.close()


def _handler_name(method: str, template: str) -> str:
    return method.lower() + "_" + re.sub(r"[^a-z0-9]+", "_", template.lower()).strip("_")


def find_spec_file(spec_dir: str | os.PathLike | None) -> Path:
    if spec_dir is None:
        import firecracker_spec  # tests/firecracker_spec.py: env, beside the repository, or the fallback

        spec_dir = firecracker_spec.spec_dir()
    return Path(spec_dir) / "firecracker.yaml"


def main(argv: list[str] | None = None, *, spec_dir: str | os.PathLike | None = None) -> int:
    """Run the stand-in; returns its exit status. ``spec_dir`` holds firecracker.yaml (default: found)."""
    try:
        options = parse_args(sys.argv[1:] if argv is None else argv)
    except UsageError as exc:
        print(f"firecracker (nimbus test stand-in): {exc}\n{USAGE}", file=sys.stderr)
        return 1
    if options["version"]:
        print(VERSION_LINE)
        return 0
    if options["help"]:
        print(USAGE)
        return 0
    spec_file = find_spec_file(spec_dir)
    if not spec_file.is_file():
        print(f"firecracker (nimbus test stand-in): Firecracker's API schema not found at {spec_file} "
              "(set NIMBUS_FIRECRACKER_SPEC_DIR)", file=sys.stderr)
        return 1
    return asyncio.run(StandInVmm(options, schema.load_spec(spec_file)).run())


if __name__ == "__main__":
    sys.exit(main())
