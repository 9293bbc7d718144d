"""Firecracker's HTTP API over its Unix socket: the request bodies Nimbus sends, and a small async client.

Why a module of its own: this is the seam between Nimbus and a ``firecracker`` process. The driver
(``machines/firecracker/machine.py``) decides *what* to configure, step by step; this module knows how each step
is spelled on the wire and maps every failure into ``nimbus.errors`` at the boundary, so the driver never
sees an httpx exception. The body builders carry the names of the definitions in Firecracker's API
schema (``firecracker.yaml``: ``BootSource``, ``Drive``, ``MachineConfiguration``…), and each one's
``body()`` is the JSON object that definition describes, with unset optional fields left out.

Every failure is a :class:`~nimbus.errors.MachineStartError`: Firecracker answering with a fault (a
JSON ``{"fault_message": …}``, or something else) is a :class:`FirecrackerApiError`, which carries the
status, method, path and fault; a socket that is missing, refuses, hangs up or stays silent is a plain
``MachineStartError`` saying the socket is not answering. Either way the machine is not to be trusted.

No firecracker binary runs on the hosts where Nimbus is developed. ``tests/unit/test_firecracker_api.py``
checks every body against the schema's definitions and drives this client over a real Unix socket
against a stand-in server that validates each request against the same schema; what is not exercised
there is Firecracker's own behaviour (which calls it accepts in which state, the guest booting).
"""

import asyncio
import os
from dataclasses import dataclass
from typing import Literal
from urllib.parse import quote

import httpx

from nimbus.errors import MachineStartError

DEFAULT_API_TIMEOUT_S = 5.0
# Writing or mapping the guest's whole memory file takes longer than a configuration call.
DEFAULT_SNAPSHOT_TIMEOUT_S = 60.0
DEFAULT_READY_TIMEOUT_S = 5.0
# Firecracker makes its socket milliseconds after it starts, so waiting for it polls briskly.
READY_POLL_INTERVAL_S = 0.01
# The lowest guest CID there is (0-2 are reserved); each microVM has its own vsock device, so all share it.
DEFAULT_GUEST_CID = 3
BODY_EXCERPT_CHARS = 200

ActionType = Literal["InstanceStart", "SendCtrlAltDel", "FlushMetrics"]


class FirecrackerApiError(MachineStartError):
    """Firecracker answered a call with an error status; ``fault_message`` is its reason, when it gave one."""

    def __init__(self, message: str, *, status: int, method: str, path: str,
                 fault_message: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.method = method
        self.path = path
        self.fault_message = fault_message


# ---------------------------------------------------------------- request bodies (schema definitions)


@dataclass(frozen=True, slots=True)
class BootSource:
    """The guest kernel and its command line; without ``boot_args`` Firecracker uses its own defaults."""

    kernel_image_path: str
    boot_args: str | None = None
    initrd_path: str | None = None

    def body(self) -> dict:
        return _without_none(kernel_image_path=self.kernel_image_path, boot_args=self.boot_args,
                             initrd_path=self.initrd_path)


@dataclass(frozen=True, slots=True)
class Drive:
    """A virtio-block drive backed by a host file (the schema allows vhost-user drives too; we never use them).

    ``path_on_host`` and ``is_read_only`` are optional in the schema only because vhost-user drives omit
    them; a virtio-block drive needs both, so both are always sent.
    """

    drive_id: str
    path_on_host: str
    is_root_device: bool = False
    is_read_only: bool = True
    cache_type: Literal["Unsafe", "Writeback"] | None = None
    io_engine: Literal["Sync", "Async"] | None = None

    def body(self) -> dict:
        return _without_none(drive_id=self.drive_id, path_on_host=self.path_on_host,
                             is_root_device=self.is_root_device, is_read_only=self.is_read_only,
                             cache_type=self.cache_type, io_engine=self.io_engine)


@dataclass(frozen=True, slots=True)
class MachineConfiguration:
    """vCPUs and memory. ``track_dirty_pages`` lets a machine be the source of diff snapshots."""

    vcpu_count: int
    mem_size_mib: int
    smt: bool = False
    track_dirty_pages: bool = False

    def body(self) -> dict:
        return {"vcpu_count": self.vcpu_count, "mem_size_mib": self.mem_size_mib, "smt": self.smt,
                "track_dirty_pages": self.track_dirty_pages}


@dataclass(frozen=True, slots=True)
class Vsock:
    """The vsock device: the host reaches the guest agent through the Unix socket at ``uds_path``.

    The schema's ``vsock_id`` is deprecated and not required, so it is never sent.
    """

    uds_path: str
    guest_cid: int = DEFAULT_GUEST_CID

    def body(self) -> dict:
        return {"guest_cid": self.guest_cid, "uds_path": self.uds_path}


@dataclass(frozen=True, slots=True)
class InstanceActionInfo:
    """A synchronous action: boot the configured machine, send Ctrl+Alt+Del, or flush the metrics file."""

    action_type: ActionType

    def body(self) -> dict:
        return {"action_type": self.action_type}


@dataclass(frozen=True, slots=True)
class Vm:
    """The running state asked for with ``PATCH /vm``: a machine is paused before it is snapshotted."""

    state: Literal["Paused", "Resumed"]

    def body(self) -> dict:
        return {"state": self.state}


@dataclass(frozen=True, slots=True)
class SnapshotCreateParams:
    """Where a paused machine's state and memory are written; a ``Diff`` needs ``track_dirty_pages``."""

    snapshot_path: str
    mem_file_path: str
    snapshot_type: Literal["Full", "Diff"] = "Full"

    def body(self) -> dict:
        return {"snapshot_type": self.snapshot_type, "snapshot_path": self.snapshot_path,
                "mem_file_path": self.mem_file_path}


@dataclass(frozen=True, slots=True)
class SnapshotLoadParams:
    """A snapshot to restore into a fresh, unconfigured Firecracker.

    Memory comes through ``mem_backend`` (type ``File``), not the deprecated ``mem_file_path``; dirty-page
    tracking is asked for with ``track_dirty_pages``, not the deprecated ``enable_diff_snapshots``.
    ``vsock_uds_path`` gives the restored machine its own vsock socket instead of the one it was
    snapshotted with, so one per-runtime snapshot can seed many machines.
    """

    snapshot_path: str
    mem_file_path: str
    resume_vm: bool = False
    track_dirty_pages: bool = False
    vsock_uds_path: str | None = None

    def body(self) -> dict:
        body = {"snapshot_path": self.snapshot_path,
                "mem_backend": {"backend_type": "File", "backend_path": self.mem_file_path},
                "track_dirty_pages": self.track_dirty_pages, "resume_vm": self.resume_vm}
        if self.vsock_uds_path is not None:
            body["vsock_override"] = {"uds_path": self.vsock_uds_path}
        return body


@dataclass(frozen=True, slots=True)
class Logger:
    """Where Firecracker writes its own log (a file or named pipe), so a failed boot can be explained."""

    log_path: str
    level: Literal["Error", "Warning", "Info", "Debug", "Trace", "Off"] = "Warning"
    show_level: bool = True
    show_log_origin: bool = False

    def body(self) -> dict:
        return {"log_path": self.log_path, "level": self.level, "show_level": self.show_level,
                "show_log_origin": self.show_log_origin}


@dataclass(frozen=True, slots=True)
class Metrics:
    """Where Firecracker flushes its JSON metrics lines."""

    metrics_path: str

    def body(self) -> dict:
        return {"metrics_path": self.metrics_path}


def _without_none(**fields) -> dict:
    # The schema types optional fields as strings, never null: an unset one must be absent.
    return {key: value for key, value in fields.items() if value is not None}


# ---------------------------------------------------------------- the client


class FirecrackerApi:
    """One Firecracker process's API, over its Unix socket. Use as ``async with`` or call :meth:`close`.

    Every call returns the answer's JSON (None for Firecracker's usual ``204``) or raises a
    ``MachineStartError``: :class:`FirecrackerApiError` when Firecracker answered with an error.
    """

    def __init__(self, socket_path: str | os.PathLike, timeout: float = DEFAULT_API_TIMEOUT_S) -> None:
        self.socket_path = os.fspath(socket_path)
        self.timeout = timeout
        self._client = httpx.AsyncClient(transport=httpx.AsyncHTTPTransport(uds=self.socket_path),
                                         base_url="http://localhost", headers={"Accept": "application/json"})

    async def __aenter__(self) -> "FirecrackerApi":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the connection to the socket; the Firecracker process is left as it is."""
        await self._client.aclose()

    # Configuration, before the machine boots.

    async def put_logger(self, logger: Logger) -> None:
        """Send Firecracker's own log to a file; allowed before a snapshot load, like the metrics."""
        await self._request("PUT", "/logger", logger.body())

    async def put_metrics(self, metrics: Metrics) -> None:
        """Send Firecracker's metrics to a file."""
        await self._request("PUT", "/metrics", metrics.body())

    async def put_boot_source(self, boot_source: BootSource) -> None:
        """Set the guest kernel, its command line and initrd."""
        await self._request("PUT", "/boot-source", boot_source.body())

    async def put_drive(self, drive: Drive) -> None:
        """Attach a block device; the path names the drive, so it always matches the body."""
        await self._request("PUT", f"/drives/{quote(drive.drive_id, safe='')}", drive.body())

    async def put_machine_config(self, config: MachineConfiguration) -> None:
        """Set vCPUs and memory."""
        await self._request("PUT", "/machine-config", config.body())

    async def put_vsock(self, vsock: Vsock) -> None:
        """Add the vsock device the host talks to the guest agent through."""
        await self._request("PUT", "/vsock", vsock.body())

    # Actions and state.

    async def instance_start(self) -> None:
        """Boot the configured machine; Firecracker answers once the vCPUs run, not when the guest is up."""
        await self._request("PUT", "/actions", InstanceActionInfo("InstanceStart").body())

    async def send_ctrl_alt_del(self) -> None:
        """Ask the guest to shut down (x86 only); the driver still kills the process if it lingers."""
        await self._request("PUT", "/actions", InstanceActionInfo("SendCtrlAltDel").body())

    async def flush_metrics(self) -> None:
        """Write the current metrics to the metrics file now."""
        await self._request("PUT", "/actions", InstanceActionInfo("FlushMetrics").body())

    async def pause(self) -> None:
        """Pause the vCPUs: a snapshot is taken of a paused machine."""
        await self._request("PATCH", "/vm", Vm("Paused").body())

    async def resume(self) -> None:
        """Resume a paused or freshly restored machine."""
        await self._request("PATCH", "/vm", Vm("Resumed").body())

    async def create_snapshot(self, params: SnapshotCreateParams) -> None:
        """Write a paused machine's state and memory to files."""
        await self._request("PUT", "/snapshot/create", params.body(),
                            timeout=max(self.timeout, DEFAULT_SNAPSHOT_TIMEOUT_S))

    async def load_snapshot(self, params: SnapshotLoadParams) -> None:
        """Restore a snapshot; only the logger and metrics may be configured before this."""
        await self._request("PUT", "/snapshot/load", params.body(),
                            timeout=max(self.timeout, DEFAULT_SNAPSHOT_TIMEOUT_S))

    # Questions.

    async def describe_instance(self) -> dict:
        """``GET /``: the instance's id, state (``Not started``, ``Running``, ``Paused``) and version."""
        return await self._request("GET", "/")

    async def vm_config(self) -> dict:
        """``GET /vm/config``: the whole configuration (boot source, drives, machine config, vsock…)."""
        return await self._request("GET", "/vm/config")

    async def version(self) -> str:
        """The Firecracker version this process runs."""
        answer = await self._request("GET", "/version")
        version = answer.get("firecracker_version") if isinstance(answer, dict) else None
        if not isinstance(version, str):
            raise FirecrackerApiError(f"firecracker GET /version answered without a firecracker_version: {answer!r}",
                                      status=200, method="GET", path="/version")
        return version

    async def wait_ready(self, timeout: float = DEFAULT_READY_TIMEOUT_S) -> dict:
        """Wait until the socket exists and ``GET /`` answers; return the instance's description.

        A socket not there yet, refusing or silent is tried again every :data:`READY_POLL_INTERVAL_S`
        until ``timeout``, then ``MachineStartError``. A fault answer is raised at once: Firecracker is up
        and has said what is wrong.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            left = deadline - loop.time()
            try:
                return await self._request("GET", "/", timeout=max(min(left, self.timeout), READY_POLL_INTERVAL_S))
            except FirecrackerApiError:
                raise
            except MachineStartError as exc:
                last = exc
            if loop.time() + READY_POLL_INTERVAL_S >= deadline:
                raise MachineStartError(f"firecracker API socket {self.socket_path} not answering after "
                                        f"{timeout:g}s: {_why(last.__cause__)}") from last
            await asyncio.sleep(READY_POLL_INTERVAL_S)

    async def _request(self, method: str, path: str, body: dict | None = None,
                       timeout: float | None = None) -> dict | None:
        """Send one call; the answer's JSON, None when empty. httpx's errors never leave this method."""
        timeout = self.timeout if timeout is None else timeout
        try:
            response = await self._client.request(method, path, json=body, timeout=timeout)
        except httpx.TransportError as exc:
            raise MachineStartError(f"firecracker API socket {self.socket_path} not answering: "
                                    f"{method} {path}: {_why(exc, timeout)}") from exc
        where = f"firecracker {method} {path} answered {response.status_code}"
        try:
            answer = response.json() if response.content else None
        except ValueError:
            answer = _NOT_JSON
        if response.is_success:
            if answer is _NOT_JSON:
                raise FirecrackerApiError(f"{where} with a body that is not JSON: {_excerpt(response)}",
                                          status=response.status_code, method=method, path=path)
            return answer
        fault = answer.get("fault_message") if isinstance(answer, dict) else None
        if isinstance(fault, str):
            message = f"{where}: {fault}"
        else:
            fault = None
            message = f"{where} without a fault_message; body: {_excerpt(response)}"
        raise FirecrackerApiError(message, status=response.status_code, method=method, path=path,
                                  fault_message=fault)


_NOT_JSON = object()


def _why(exc: BaseException | None, timeout: float | None = None) -> str:
    # httpx's timeouts often have an empty message; say what happened in words.
    if isinstance(exc, httpx.TimeoutException):
        after = f" after {timeout:g}s" if timeout is not None else ""
        return f"timed out{after} ({type(exc).__name__})"
    return f"{type(exc).__name__}: {exc}" if exc is not None else "no answer"


def _excerpt(response: httpx.Response) -> str:
    if not response.content:
        return "(empty)"
    text = response.text
    cut = "…" if len(text) > BODY_EXCERPT_CHARS else ""
    return f"{text[:BODY_EXCERPT_CHARS]!r}{cut}"


__all__ = [
    "DEFAULT_API_TIMEOUT_S", "DEFAULT_GUEST_CID", "DEFAULT_READY_TIMEOUT_S", "DEFAULT_SNAPSHOT_TIMEOUT_S",
    "READY_POLL_INTERVAL_S", "BootSource", "Drive", "FirecrackerApi", "FirecrackerApiError",
    "InstanceActionInfo", "Logger", "MachineConfiguration", "Metrics",
    "SnapshotCreateParams", "SnapshotLoadParams", "Vm", "Vsock",
]
