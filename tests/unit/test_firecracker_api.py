"""The Firecracker API client against Firecracker's own API schema (firecracker.yaml), over a real Unix socket.

No firecracker binary exists on this host, so the contract is the schema: every body the client can send
is validated against the schema's definitions, and every call goes over a Unix socket to
``StandInFirecracker``, a test stand-in (not Firecracker) that checks the method and path against the
schema's ``paths`` and the body against that operation's body schema, answering ``204`` or a ``400``
fault as Firecracker does. Reading the schema and the HTTP wire format are shared with the stand-in
Firecracker executable, in ``tests/standin``. The schema is read where ``firecracker_spec.spec_dir()`` finds it (env, or
``../shared/firecracker`` beside the repository), never copied here.
"""

import asyncio
import contextlib
import inspect
import json
import os
import shutil
import socket
import tempfile
from pathlib import Path

import pytest

import firecracker_spec
from nimbus.errors import MachineError, MachineStartError
from nimbus.machines.firecracker import api as fcapi
from standin import wire
from standin.schema import body_error, body_schema, definition, load_spec, operation, validator

SPEC_DIR = firecracker_spec.spec_dir()
SPEC_FILE = SPEC_DIR / "firecracker.yaml"

pytestmark = [
    pytest.mark.firecracker,
    pytest.mark.skipif(not SPEC_FILE.is_file(),
                       reason=f"Firecracker's API schema not found at {SPEC_FILE} (set NIMBUS_FIRECRACKER_SPEC_DIR)"),
]

SHORT_TIMEOUT_S = 0.2  # for the tries meant to fail; no assertion is made on how long anything took


# ---------------------------------------------------------------- the schema (read by tests/standin/schema.py)


@pytest.fixture(scope="module")
def spec() -> dict:
    return load_spec(SPEC_FILE)


# ---------------------------------------------------------------- a test stand-in for Firecracker's API server


class StandInFirecracker:
    """A TEST STAND-IN for Firecracker's API server on a Unix socket: it is not Firecracker.

    It answers what the schema allows and nothing else: an unknown method or path, a body that is not
    JSON or fails the operation's schema is a ``400`` fault; a valid call is ``204`` (a ``GET`` answers
    with the canned JSON in :attr:`GET_ANSWERS`). It keeps no state: Firecracker's ordering rules are not
    modelled. ``answer`` replaces the whole behaviour: an async callable ``(method, path, body) ->`` raw
    response bytes, or None to hang up without answering.
    """

    GET_ANSWERS = {
        "/": {"app_name": "Firecracker", "id": "stand-in", "state": "Not started", "vmm_version": "0.0.0-stand-in"},
        "/version": {"firecracker_version": "0.0.0-stand-in"},
    }

    def __init__(self, spec: dict, socket_path: Path, answer=None) -> None:
        self.spec = spec
        self.socket_path = socket_path
        self.answer = answer or self.validate
        self.requests: list[tuple[str, str, bytes]] = []
        self._tasks: set[asyncio.Task] = set()

    async def __aenter__(self) -> "StandInFirecracker":
        self.server = await asyncio.start_unix_server(self._serve, path=os.fspath(self.socket_path))
        return self

    async def __aexit__(self, *exc) -> None:
        self.server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.server.wait_closed()

    async def validate(self, method: str, path: str, raw: bytes) -> bytes:
        found = operation(self.spec, method, path)
        if found is None:
            return wire.fault(400, f"invalid request method and/or path: {method} {path}")
        _, op = found
        schema = body_schema(op)
        if schema is None:
            if raw:
                return wire.fault(400, f"{method} {path} takes no body")
            if method == "GET" and path in self.GET_ANSWERS:
                return wire.json_response(200, self.GET_ANSWERS[path])
            return wire.response(204)
        try:
            body = json.loads(raw)
        except ValueError as exc:
            return wire.fault(400, f"body is not JSON: {exc}")
        error = body_error(self.spec, schema, body)
        if error is not None:
            return wire.fault(400, error)
        return wire.response(204)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._tasks.add(asyncio.current_task())
        try:
            while (request := await wire.read_request(reader)) is not None:
                self.requests.append((request.method, request.target, request.body))
                reply = await self.answer(request.method, request.target, request.body)
                if reply is None:
                    return
                writer.write(reply)
                await writer.drain()
        finally:
            self._tasks.discard(asyncio.current_task())
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()


@pytest.fixture
def sock_dir():
    # Not tmp_path: a Unix socket path must fit in 108 bytes, and pytest's test-named directories may not.
    path = Path(tempfile.mkdtemp(prefix="nfc-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


# ---------------------------------------------------------------- request bodies against the definitions

BODIES = [
    pytest.param(fcapi.BootSource("/img/vmlinux"), id="BootSource-minimal"),
    pytest.param(fcapi.BootSource("/img/vmlinux", "console=ttyS0 reboot=k panic=1", "/img/initrd"), id="BootSource"),
    pytest.param(fcapi.Drive("rootfs", "/img/rootfs.ext4", is_root_device=True), id="Drive-root"),
    pytest.param(fcapi.Drive("code", "/run/code.ext4", is_read_only=False, cache_type="Writeback", io_engine="Async"),
                 id="Drive-options"),
    pytest.param(fcapi.MachineConfiguration(vcpu_count=2, mem_size_mib=256, track_dirty_pages=True),
                 id="MachineConfiguration"),
    pytest.param(fcapi.Vsock("/run/v.sock"), id="Vsock"),
    pytest.param(fcapi.InstanceActionInfo("InstanceStart"), id="InstanceActionInfo-start"),
    pytest.param(fcapi.InstanceActionInfo("SendCtrlAltDel"), id="InstanceActionInfo-ctrlaltdel"),
    pytest.param(fcapi.InstanceActionInfo("FlushMetrics"), id="InstanceActionInfo-flush"),
    pytest.param(fcapi.Vm("Paused"), id="Vm-paused"),
    pytest.param(fcapi.Vm("Resumed"), id="Vm-resumed"),
    pytest.param(fcapi.SnapshotCreateParams("/snap/vm.state", "/snap/vm.mem"), id="SnapshotCreateParams-full"),
    pytest.param(fcapi.SnapshotCreateParams("/snap/vm.state", "/snap/vm.mem", "Diff"), id="SnapshotCreateParams-diff"),
    pytest.param(fcapi.SnapshotLoadParams("/snap/vm.state", "/snap/vm.mem"), id="SnapshotLoadParams"),
    pytest.param(fcapi.SnapshotLoadParams("/snap/vm.state", "/snap/vm.mem", resume_vm=True, track_dirty_pages=True,
                                          vsock_uds_path="/run/v2.sock"), id="SnapshotLoadParams-override"),
    pytest.param(fcapi.Logger("/run/fc.log"), id="Logger"),
    pytest.param(fcapi.Logger("/run/fc.log", level="Off"), id="Logger-off"),
    pytest.param(fcapi.Metrics("/run/fc.metrics"), id="Metrics"),
]


@pytest.mark.parametrize("builder", BODIES)
def test_body_matches_its_definition(spec, builder):
    body = builder.body()
    errors = [e.message for e in definition(spec, type(builder).__name__).iter_errors(body)]
    assert errors == [], body
    assert None not in body.values()


@pytest.mark.parametrize("builder", BODIES)
def test_body_without_a_required_field_is_refused(spec, builder):
    """The validator can fail: dropping any field the definition requires makes the body invalid."""
    name = type(builder).__name__
    required = spec["definitions"][name].get("required", [])
    check = definition(spec, name)
    for field in required:
        body = builder.body()
        del body[field]
        assert not check.is_valid(body), f"{name} without {field!r} was accepted"


@pytest.mark.parametrize(("name", "body"), [
    ("MachineConfiguration", {"vcpu_count": 0, "mem_size_mib": 128}),
    ("MachineConfiguration", {"vcpu_count": 1, "mem_size_mib": "128"}),
    ("MachineConfiguration", {"vcpus": 1, "vcpu_count": 1, "mem_size_mib": 128}),  # unknown key
    ("Vsock", {"guest_cid": 2, "uds_path": "/run/v.sock"}),
    ("InstanceActionInfo", {"action_type": "Reboot"}),
    ("Vm", {"state": "Stopped"}),
    ("SnapshotCreateParams", {"snapshot_type": "Incremental", "snapshot_path": "/s", "mem_file_path": "/m"}),
    ("SnapshotLoadParams", {"snapshot_path": "/s", "mem_backend": {"backend_type": "Disk", "backend_path": "/m"}}),
    ("Drive", {"drive_id": "rootfs", "is_root_device": "yes"}),
    ("BootSource", {"kernel_image_path": None}),
])
def test_invalid_bodies_are_refused(spec, name, body):
    assert not definition(spec, name).is_valid(body)


@pytest.mark.parametrize("builder", BODIES)
def test_bodies_use_no_deprecated_field(spec, builder):
    """Fields the schema marks deprecated (vsock_id, mem_file_path on load, enable_diff_snapshots) stay out."""
    properties = spec["definitions"][type(builder).__name__].get("properties", {})
    for field in builder.body():
        assert "deprecated" not in properties[field].get("description", "").lower(), field


def test_snapshot_load_names_exactly_one_memory_source():
    """The rule the schema states only in prose: exactly one of mem_file_path and mem_backend."""
    body = fcapi.SnapshotLoadParams("/snap/vm.state", "/snap/vm.mem").body()
    assert [key for key in body if key.startswith("mem_")] == ["mem_backend"]
    assert body["mem_backend"] == {"backend_type": "File", "backend_path": "/snap/vm.mem"}


# ---------------------------------------------------------------- every client call against the schema's paths

CALLS = [
    ("put_logger", (fcapi.Logger("/run/fc.log"),), "PUT", "/logger"),
    ("put_metrics", (fcapi.Metrics("/run/fc.metrics"),), "PUT", "/metrics"),
    ("put_boot_source", (fcapi.BootSource("/img/vmlinux", "console=ttyS0"),), "PUT", "/boot-source"),
    ("put_drive", (fcapi.Drive("rootfs", "/img/rootfs.ext4", is_root_device=True),), "PUT", "/drives/rootfs"),
    ("put_machine_config", (fcapi.MachineConfiguration(1, 128),), "PUT", "/machine-config"),
    ("put_vsock", (fcapi.Vsock("/run/v.sock"),), "PUT", "/vsock"),
    ("instance_start", (), "PUT", "/actions"),
    ("send_ctrl_alt_del", (), "PUT", "/actions"),
    ("flush_metrics", (), "PUT", "/actions"),
    ("pause", (), "PATCH", "/vm"),
    ("resume", (), "PATCH", "/vm"),
    ("create_snapshot", (fcapi.SnapshotCreateParams("/snap/s", "/snap/m", "Diff"),), "PUT", "/snapshot/create"),
    ("load_snapshot", (fcapi.SnapshotLoadParams("/snap/s", "/snap/m", resume_vm=True),), "PUT", "/snapshot/load"),
    ("describe_instance", (), "GET", "/"),
    ("vm_config", (), "GET", "/vm/config"),
    ("version", (), "GET", "/version"),
]


def test_every_public_call_is_covered():
    public = {name for name, fn in inspect.getmembers(fcapi.FirecrackerApi, inspect.iscoroutinefunction)
              if not name.startswith("_")}
    assert public - {"close", "wait_ready"} == {name for name, *_ in CALLS}


@pytest.mark.parametrize(("method_name", "args", "http_method", "path"), CALLS, ids=[c[0] for c in CALLS])
async def test_call_is_an_operation_of_the_schema(spec, sock_dir, method_name, args, http_method, path):
    async with StandInFirecracker(spec, sock_dir / "api.sock") as server, \
            fcapi.FirecrackerApi(sock_dir / "api.sock") as api:
        await getattr(api, method_name)(*args)
    [(method, target, raw)] = server.requests
    assert (method, target) == (http_method, path)
    found = operation(spec, method, target)
    assert found is not None, f"{method} {target} is not in firecracker.yaml"
    schema = body_schema(found[1])
    if schema is None:
        assert raw == b""
    else:
        body = json.loads(raw)
        assert validator(spec, schema).is_valid(body), body
        if "{" in found[0]:  # the id in the path is the id in the body, as Firecracker demands
            assert target.rsplit("/", 1)[1] in body.values()


async def test_questions_return_the_answers(spec, sock_dir):
    async with StandInFirecracker(spec, sock_dir / "api.sock"), fcapi.FirecrackerApi(sock_dir / "api.sock") as api:
        info = await api.describe_instance()
        version = await api.version()
    assert definition(spec, "InstanceInfo").is_valid(info)  # the stand-in's canned answers are the schema's shape
    assert info["state"] == "Not started"
    assert version == StandInFirecracker.GET_ANSWERS["/version"]["firecracker_version"]


# ---------------------------------------------------------------- errors, mapped into nimbus.errors


async def test_refused_body_is_a_fault_with_firecrackers_message(spec, sock_dir):
    async with StandInFirecracker(spec, sock_dir / "api.sock"), fcapi.FirecrackerApi(sock_dir / "api.sock") as api:
        with pytest.raises(fcapi.FirecrackerApiError) as caught:
            await api.put_machine_config(fcapi.MachineConfiguration(vcpu_count=0, mem_size_mib=128))
    error = caught.value
    assert isinstance(error, MachineStartError) and isinstance(error, MachineError)
    assert (error.status, error.method, error.path) == (400, "PUT", "/machine-config")
    assert "vcpu_count" in error.fault_message
    assert str(error) == f"firecracker PUT /machine-config answered 400: {error.fault_message}"


@pytest.mark.parametrize(("reply", "said"), [
    (wire.response(500, b"internal oops", "text/plain"), "without a fault_message; body: 'internal oops'"),
    (wire.response(400, b""), "without a fault_message; body: (empty)"),
    (wire.response(400, b'{"error": "no"}'), "without a fault_message; body: '{\"error\": \"no\"}'"),
    (wire.response(400, b'{"fault_message": 7}'), "without a fault_message"),
], ids=["500-text", "400-empty", "400-other-json", "400-fault-not-a-string"])
async def test_fault_without_a_message_says_so(spec, sock_dir, reply, said):
    async def answer(method, path, raw):
        return reply

    async with StandInFirecracker(spec, sock_dir / "api.sock", answer), \
            fcapi.FirecrackerApi(sock_dir / "api.sock") as api:
        with pytest.raises(fcapi.FirecrackerApiError) as caught:
            await api.put_boot_source(fcapi.BootSource("/img/vmlinux"))
    assert caught.value.fault_message is None
    assert str(caught.value).startswith(f"firecracker PUT /boot-source answered {reply[9:12].decode()} ")
    assert said in str(caught.value)


async def test_success_that_is_not_json_is_an_error(spec, sock_dir):
    async def answer(method, path, raw):
        return wire.response(200, b"<html>", "text/html")

    async with StandInFirecracker(spec, sock_dir / "api.sock", answer), \
            fcapi.FirecrackerApi(sock_dir / "api.sock") as api:
        with pytest.raises(fcapi.FirecrackerApiError, match=r"GET / answered 200 with a body that is not JSON"):
            await api.describe_instance()


async def test_missing_socket_is_not_answering(sock_dir):
    async with fcapi.FirecrackerApi(sock_dir / "absent.sock") as api:
        with pytest.raises(MachineStartError, match=r"absent\.sock not answering: PUT /actions: ConnectError") as c:
            await api.instance_start()
    assert not isinstance(c.value, fcapi.FirecrackerApiError)


async def test_socket_nobody_listens_on_is_not_answering(sock_dir):
    # A socket file left by a dead process: connecting is refused.
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(os.fspath(sock_dir / "stale.sock"))
    stale.close()
    async with fcapi.FirecrackerApi(sock_dir / "stale.sock") as api:
        with pytest.raises(MachineStartError, match=r"stale\.sock not answering: GET /: ConnectError"):
            await api.describe_instance()


async def test_silent_server_times_out(spec, sock_dir):
    async def answer(method, path, raw):
        await asyncio.Event().wait()  # never answers; cancelled when the stand-in closes

    async with StandInFirecracker(spec, sock_dir / "api.sock", answer), \
            fcapi.FirecrackerApi(sock_dir / "api.sock", timeout=SHORT_TIMEOUT_S) as api:
        with pytest.raises(MachineStartError, match=r"PUT /vsock: timed out after 0\.2s \(ReadTimeout\)"):
            await api.put_vsock(fcapi.Vsock("/run/v.sock"))


async def test_server_hanging_up_is_not_answering(spec, sock_dir):
    async def answer(method, path, raw):
        return None

    async with StandInFirecracker(spec, sock_dir / "api.sock", answer), \
            fcapi.FirecrackerApi(sock_dir / "api.sock") as api:
        with pytest.raises(MachineStartError, match=r"not answering: PATCH /vm: RemoteProtocolError"):
            await api.pause()


# ---------------------------------------------------------------- wait_ready


async def test_wait_ready_waits_for_a_late_socket(spec, sock_dir):
    path = sock_dir / "api.sock"
    started = asyncio.Event()

    async def start_late():
        await asyncio.sleep(SHORT_TIMEOUT_S / 2)
        async with StandInFirecracker(spec, path):
            started.set()
            await asyncio.Event().wait()  # serve until cancelled

    late = asyncio.create_task(start_late())
    try:
        async with fcapi.FirecrackerApi(path) as api:
            info = await api.wait_ready(timeout=30)
        assert started.is_set()
        assert info["id"] == "stand-in"
    finally:
        late.cancel()
        await asyncio.gather(late, return_exceptions=True)


async def test_wait_ready_gives_up_on_a_socket_that_never_appears(sock_dir):
    async with fcapi.FirecrackerApi(sock_dir / "never.sock") as api:
        with pytest.raises(MachineStartError, match=r"never\.sock not answering after 0\.2s: ConnectError"):
            await api.wait_ready(timeout=SHORT_TIMEOUT_S)


async def test_wait_ready_raises_a_fault_at_once(spec, sock_dir):
    async def answer(method, path, raw):
        return wire.fault(500, "instance info unavailable")

    async with StandInFirecracker(spec, sock_dir / "api.sock", answer) as server, \
            fcapi.FirecrackerApi(sock_dir / "api.sock") as api:
        with pytest.raises(fcapi.FirecrackerApiError, match="answered 500: instance info unavailable"):
            await api.wait_ready(timeout=30)
    assert len(server.requests) == 1


async def test_stand_in_refuses_calls_outside_the_schema(spec, sock_dir):
    """The stand-in itself: a path the schema lacks is a fault, so a client typo cannot pass unseen."""
    async with StandInFirecracker(spec, sock_dir / "api.sock"), fcapi.FirecrackerApi(sock_dir / "api.sock") as api:
        with pytest.raises(fcapi.FirecrackerApiError, match="invalid request method and/or path: PUT /boot-sources"):
            await api._request("PUT", "/boot-sources", {"kernel_image_path": "/img/vmlinux"})
        with pytest.raises(fcapi.FirecrackerApiError, match="invalid request method and/or path: POST /actions"):
            await api._request("POST", "/actions", {"action_type": "InstanceStart"})
