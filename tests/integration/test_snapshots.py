"""Function templates: machines forked from one that ran Init share nothing with each other but what it loaded.

Driver level: each fork has its own pid, mount, network, IPC and cgroup namespaces, its own /tmp, a
read-only /var/task, fresh random state, no capability, the node's full seccomp filter and no descriptor
of the template beyond its channel; a fork that crashes leaves the template forking. Node level:
``isolation: "per-call"`` gives every call a new machine, a version update retires the old version's
template, a template whose Init fails is not kept, and the least recently used template is evicted.
"""

import asyncio
import errno
import json
import logging
import time
import uuid

import pytest
from test_bwrap import assert_quiet

from nimbus.errors import MachineDied
from nimbus.machines import bwrap
from nimbus.machines.base import MachineSpec

pytestmark = pytest.mark.sandbox

LONG = 60.0

FORKED_PY = r'''
import ctypes, os, random, socket, threading, time, uuid

libc = ctypes.CDLL(None, use_errno=True)
SECRET = os.urandom(8).hex()  # read at import: every fork of the template has the same one
CALLS = 0
held = []

def _status():
    fields = dict(line.split(":", 1) for line in open("/proc/self/status").read().splitlines())
    return {k: fields[k].strip() for k in ("CapEff", "CapPrm", "CapBnd", "NoNewPrivs", "Seccomp", "NSpid")}

def handler(event, context=None):
    global CALLS
    CALLS += 1
    what = event.get("what")
    if what == "crash":
        os._exit(3)
    found = {"calls": CALLS, "secret": SECRET, "tmp": sorted(os.listdir("/tmp")), "threads": threading.active_count(),
             "uuid": str(uuid.uuid4()), "random": random.random(), "pids": sorted(int(p) for p in os.listdir("/proc")
                                                                                if p.isdigit()),
             "status": _status(), "uid": os.getuid(), "cgroup": open("/proc/self/cgroup").read()}
    fds = {}
    for fd in os.listdir("/proc/self/fd"):
        try:
            fds[fd] = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            pass
    found["fds"] = fds
    try:
        open("/var/task/planted", "w")
        found["task_write"] = 0
    except OSError as exc:
        found["task_write"] = exc.errno
    found["unshare"] = [libc.unshare(0x10000000), ctypes.get_errno()]  # CLONE_NEWUSER
    found["mount"] = [libc.mount(b"none", b"/tmp", b"tmpfs", 0, None), ctypes.get_errno()]
    tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        tcp.bind(("127.0.0.1", 7777))  # every fork has a loopback of its own: the port is free in each
        tcp.listen()
        held.append(tcp)
        found["bound"] = True
    except OSError as exc:
        found["bound"] = exc.errno
    with open("/tmp/planted", "w") as f:
        f.write(str(os.getpid()))
    threading.Thread(target=time.sleep, args=(600,), daemon=True).start()
    return found
'''


@pytest.fixture
async def driver(tmp_path, caplog):
    d = bwrap.BwrapDriver(tmp_path / "home")
    if not d.snapshots_on:
        await d.close()
        pytest.skip(f"no function templates here: {d.snapshots_note}")
    caplog.set_level(logging.WARNING)
    try:
        yield d
    finally:
        await d.close()
    assert_quiet(caplog)


async def template_of(driver, source: str = FORKED_PY):
    machine = await driver.create(MachineSpec(runtime="python3"), forkable=True)
    header = {"type": "init", "runtime": "python3", "handler": "main.handler", "filename": "main.py", "env": {},
              "memory_mb": 128, "timeout_s": 30, "function_name": "t", "function_version": "1"}
    reply, _ = await machine.request(header, source.encode(), timeout=LONG)
    assert reply["type"] == "init_ok", reply
    return await driver.snapshot(machine)


async def call(machine, event) -> dict:
    header = {"type": "exec", "invocation_id": uuid.uuid4().hex, "deadline_ms": int(LONG * 1000)}
    reply, blob = await machine.request(header, json.dumps(event).encode(), timeout=LONG)
    assert reply["type"] == "result", reply
    return json.loads(blob)


async def test_forks_of_one_template_share_nothing_but_what_it_loaded(driver):
    template = await template_of(driver)
    a, b = await template.fork(), await template.fork()
    assert template.children == 2
    first, again = await call(a, {}), await call(a, {})
    other = await call(b, {})
    # Within one fork, state carries over from call to call, as on any machine: the controls.
    assert again["calls"] == 2 and again["tmp"] == ["planted"] and again["threads"] > first["threads"]
    # Across forks nothing does: globals, /tmp, threads, loopback ports, randomness.
    assert first["calls"] == other["calls"] == 1
    assert first["tmp"] == other["tmp"] == [], (first["tmp"], other["tmp"])
    assert other["threads"] == first["threads"]
    assert first["bound"] is True and other["bound"] is True
    assert first["uuid"] != other["uuid"] and first["random"] != other["random"]
    # What the module computed at import is the template's, in every fork (documented, as on SnapStart).
    assert first["secret"] == other["secret"]
    # Each fork is pid 2 under its own init and sees no other process.
    for seen in (first, other):
        assert seen["pids"] == [1, 2], seen["pids"]
        status = seen["status"]
        assert status["NSpid"] == "2", status
        assert int(status["CapEff"], 16) == int(status["CapPrm"], 16) == int(status["CapBnd"], 16) == 0, status
        assert status["NoNewPrivs"] == "1" and status["Seccomp"] == "2", status
        assert seen["unshare"] == [-1, errno.EPERM] and seen["mount"] == [-1, errno.EPERM], seen
        assert seen["task_write"] == errno.EROFS
        assert seen["uid"] == template.machine.uid
        assert all(line.endswith(":/") for line in seen["cgroup"].split()), seen["cgroup"]  # its own cgroup root
        sockets = [target for target in seen["fds"].values() if target.startswith("socket:")]
        # The channel alone: no control socket of the template.
        assert len(sockets) == 1, seen["fds"]
        assert seen["fds"]["0"] == "/dev/null" and seen["fds"]["1"] == seen["fds"]["2"], seen["fds"]
    # Each fork is counted in a cgroup of its own, on the host.
    assert a._cgroup is not None and b._cgroup is not None and a._cgroup.name != b._cgroup.name
    assert a.pid in a._cgroup.pids() and a.pid not in b._cgroup.pids()
    await asyncio.gather(a.stop(), b.stop())
    await template.close()


LOOP_AT_IMPORT_PY = r'''
import asyncio, os, socket

LOOP = asyncio.new_event_loop()  # as Mangum does at import
asyncio.set_event_loop(LOOP)
KEPT = open("/var/task/main.py")  # a file the module keeps open
PAIR = socket.socketpair()  # and a connection

async def answer():
    await asyncio.sleep(0)
    return "ok"

def handler(event, context=None):
    extra = {}
    for number in ("/tmp/a", "/tmp/b"):
        extra[number] = os.open(number, os.O_CREAT | os.O_WRONLY)  # may land on a number the template used
    try:
        kept = KEPT.read()
    except OSError as exc:
        kept = f"error {exc.errno}"
    try:
        PAIR[0].send(b"x")
        sent = "sent"
    except OSError as exc:
        sent = f"error {exc.errno}"
    return {"loop": asyncio.get_event_loop().run_until_complete(answer()), "kept": kept, "sent": sent,
            "fds": sorted(extra.values())}
'''


async def test_what_the_module_opened_at_import_is_dev_null_in_a_fork_and_its_loop_is_new(driver):
    template = await template_of(driver, LOOP_AT_IMPORT_PY)
    fork = await template.fork()
    seen = await call(fork, {})
    assert seen["loop"] == "ok", seen  # the template's loop polled an epoll descriptor the fork lacks
    # The file and the socket kept at import fail cleanly, never touching what the fork opens later.
    assert seen["kept"] == "" and seen["sent"].startswith("error"), seen
    await fork.stop()
    await template.close()


async def test_a_fork_that_crashes_leaves_the_template_forking(driver):
    template = await template_of(driver)
    doomed = await template.fork()
    header = {"type": "exec", "invocation_id": uuid.uuid4().hex, "deadline_ms": 10_000}
    with pytest.raises(MachineDied):
        await doomed.request(header, b'{"what": "crash"}', timeout=LONG)
    await doomed.kill()
    assert template.alive
    after = await template.fork()
    assert (await call(after, {}))["calls"] == 1
    await after.stop()
    await template.close()


async def test_retiring_a_template_waits_for_its_forks_and_closing_ends_them(driver):
    template = await template_of(driver)
    busy = await template.fork()
    await template.retire()
    assert not template.alive
    with pytest.raises(Exception, match="not running"):
        await template.fork()
    assert template.machine.alive  # its fork still runs, in its pid namespace
    assert (await call(busy, {}))["calls"] == 1
    await busy.stop()
    for _ in range(100):
        if not template.machine.alive:
            break
        await asyncio.sleep(0.05)
    assert not template.machine.alive  # ended with its last fork


async def test_only_a_machine_made_forkable_and_not_yet_called_becomes_a_template(driver):
    plain = await driver.create(MachineSpec(runtime="python3"))
    with pytest.raises(Exception, match="not created forkable"):
        await driver.snapshot(plain)
    await plain.stop()
    machine = await driver.create(MachineSpec(runtime="python3"), forkable=True)
    header = {"type": "init", "runtime": "python3", "handler": "main.handler", "filename": "main.py", "env": {},
              "memory_mb": 128, "timeout_s": 30, "function_name": "t", "function_version": "1"}
    await machine.request(header, FORKED_PY.encode(), timeout=LONG)
    await call(machine, {})  # it served a call: its state is no longer the version's as loaded
    with pytest.raises(Exception, match="served a call"):
        await driver.snapshot(machine)
    assert not machine.alive


# ---------------------------------------------------------------- through a node


PER_CALL_PY = r'''
import os, threading, time
CALLS = 0

def handler(event, context):
    global CALLS
    CALLS += 1
    seen = {"calls": CALLS, "tmp": sorted(os.listdir("/tmp")), "threads": threading.active_count(),
            "code": "v1"}
    open("/tmp/left-behind", "w").write(context.aws_request_id)
    threading.Thread(target=time.sleep, args=(600,), daemon=True).start()
    return seen
'''


@pytest.fixture(scope="module")
def snap_node(make_module_node, tmp_path_factory):
    home = tmp_path_factory.mktemp("snaps")
    with make_module_node(home, f"sqlite:///{home / 'nimbus.db'}", function_templates="auto", max_function_templates=2,
                          function_template_min_init_ms=0, per_call_spares=1) as running:
        if not running.node.pool.snapshots.enabled:
            pytest.skip(f"no function templates here: {running.node.pool.snapshots.note}")
        yield running


def _deploy(api, code: str, **settings) -> str:
    name = f"snap-{uuid.uuid4().hex[:8]}"
    resp = api.post("/api/v1/functions", json={"name": name, "runtime": "python3", "code": code, **settings})
    assert resp.status_code == 201, resp.text
    return name


def _invoke(api, name: str, event=None) -> dict:
    resp = api.post(f"/api/v1/functions/{name}/invoke", json=event or {})
    assert resp.status_code == 200, resp.text
    return resp.json()


def _wait_for(predicate, what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _templates(node) -> dict:
    return {key: entry for key, entry in node.node.pool.snapshots._entries.items() if entry.snapshot is not None}


def test_per_call_calls_each_run_on_a_new_machine_that_shares_nothing(snap_node):
    with snap_node.client() as api:
        name = _deploy(api, PER_CALL_PY, isolation="per-call")
        results = [_invoke(api, name) for _ in range(2)]
        _wait_for(lambda: any(e.dep.function_name == name for e in _templates(snap_node).values()), "a template")
        results += [_invoke(api, name) for _ in range(3)]
    for result in results:
        assert result["status"] == "succeeded", result
        out = result["output"]
        # No file, global or thread of an earlier call is there.
        assert out["calls"] == 1 and out["tmp"] == [] and out["threads"] == 1, out
    assert [r["start"] for r in results[2:]] == ["forked"] * 3, [r["start"] for r in results]


HOOKS_PY = r'''
import os
from snapshot_restore_py import register_after_restore, register_before_snapshot

SEEN = []

@register_before_snapshot
def prime():
    SEEN.append("before-snapshot")  # in the template: every fork starts with it done

def reconnect(label):
    SEEN.append(label)
    print("restored as", os.getpid())

register_after_restore(reconnect, "after-restore")

def handler(event, context):
    if event.get("fail_after_restore"):
        raise RuntimeError("not reached")
    return {"seen": SEEN}
'''


def test_snapstart_runtime_hooks_run_around_the_template(snap_node):
    """snapshot_restore_py, which Lambda's python runtimes include, comes with the bundled SDK; a
    function template runs its before-snapshot hooks once and its after-restore hooks in each fork."""
    if not snap_node.node.pool._sdk.get("python3"):
        pytest.skip("no bundled SDK on this node (NIMBUS_SDK_LAYER)")
    with snap_node.client() as api:
        name = _deploy(api, HOOKS_PY, isolation="per-call")
        first = _invoke(api, name)
        assert first["output"]["seen"] == [], first  # a machine that was not forked runs no hook
        _wait_for(lambda: any(e.dep.function_name == name for e in _templates(snap_node).values()), "a template")
        forked = _invoke(api, name)
        assert forked["start"] == "forked", forked
        assert forked["output"]["seen"] == ["before-snapshot", "after-restore"], forked
        logs = api.get(f"/api/v1/invocations/{forked['invocation_id']}").json()["logs"]
        assert "restored as 2" in logs, logs  # the hook's output opens the fork's first call's logs


def test_a_failing_snapstart_hook_keeps_no_template_or_fails_the_fork(snap_node):
    if not snap_node.node.pool._sdk.get("python3"):
        pytest.skip("no bundled SDK on this node (NIMBUS_SDK_LAYER)")
    pool = snap_node.node.pool
    with snap_node.client() as api:
        before = _deploy(api, HOOKS_PY.replace('SEEN.append("before-snapshot")', 'raise ValueError("no snapshot")'),
                         isolation="per-call")
        _invoke(api, before)
        _wait_for(lambda: not any(e.dep.function_name == before for e in pool.snapshots._entries.values()),
                  "the failed template to be dropped")
        again = _invoke(api, before)  # served by a machine that was not forked, and it works
        assert again["status"] == "succeeded" and again["start"] in ("warm", "cold"), again

        after = _deploy(api, HOOKS_PY.replace('SEEN.append(label)', 'raise ValueError("cannot reconnect")'),
                        isolation="per-call")
        _invoke(api, after)
        _wait_for(lambda: any(e.dep.function_name == after for e in _templates(snap_node).values()), "a template")
        failed = api.post(f"/api/v1/functions/{after}/invoke", json={}).json()
        assert failed["status"] == "failed" and failed["start"] == "forked", failed
        assert failed["error"]["type"] == "AfterRestoreHookError" and "cannot reconnect" in failed["error"]["message"]


def test_a_version_update_retires_its_template(snap_node):
    with snap_node.client() as api:
        name = _deploy(api, PER_CALL_PY, isolation="per-call")
        _invoke(api, name)
        _wait_for(lambda: any(e.dep.function_name == name for e in _templates(snap_node).values()), "a template")
        old = next(e for e in _templates(snap_node).values() if e.dep.function_name == name)
        resp = api.put(f"/api/v1/functions/{name}", json={"code": PER_CALL_PY.replace('"v1"', '"v2"')})
        assert resp.status_code == 200, resp.text
        _wait_for(lambda: old.key not in snap_node.node.pool.snapshots._entries, "the old template to go")
        _wait_for(lambda: not old.snapshot.machine.alive, "the old template machine to end")
        assert _invoke(api, name)["output"]["code"] == "v2"


def test_a_template_whose_init_fails_is_not_kept(snap_node):
    with snap_node.client() as api:
        name = _deploy(api, "raise RuntimeError('no import for you')\n", isolation="per-call")
        for _ in range(2):
            result = api.post(f"/api/v1/functions/{name}/invoke", json={}).json()
            assert result["status"] == "failed" and "no import for you" in json.dumps(result["error"]), result
    pool = snap_node.node.pool
    assert not any(e.dep.function_name == name for e in pool.snapshots._entries.values())


def test_the_least_recently_used_template_is_evicted(snap_node):
    pool = snap_node.node.pool
    with snap_node.client() as api:
        names = [_deploy(api, PER_CALL_PY) for _ in range(3)]  # shared isolation, Init always "slow" here
        for name in names:
            _invoke(api, name)
            _wait_for(lambda n=name: any(e.dep.function_name == n for e in _templates(snap_node).values()),
                      f"a template for {name}")
        # Two templates at most: the first went when the third came (its idle machine went first, by LRU).
        held = {e.dep.function_name for e in pool.snapshots._entries.values()}
        assert len(pool.snapshots._entries) <= 2 and names[-1] in held and names[0] not in held, (held, names)
        for name in names:
            assert api.delete(f"/api/v1/functions/{name}").status_code == 204
    # Every slot the pool counts is a machine the driver runs, and no template outlives its function.
    driver = snap_node.node.driver
    _wait_for(lambda: not any(e.dep.function_name in names for e in pool.snapshots._entries.values())
              and pool.total == len(driver.machines), "the node to settle")


def test_eager_templates_are_made_at_deploy_so_the_first_call_is_forked(make_node, tmp_path):
    with make_node(tmp_path / "home", f"sqlite:///{tmp_path / 'nimbus.db'}", function_templates="eager") as running:
        if not running.node.pool.snapshots.enabled:
            pytest.skip(f"no function templates here: {running.node.pool.snapshots.note}")
        with running.client() as api:
            name = _deploy(api, PER_CALL_PY)  # shared, and its Init is quick: auto would make no template
            _wait_for(lambda: any(e.dep.function_name == name for e in _templates(running).values()), "a template")
            first = _invoke(api, name)
            assert first["start"] == "forked" and first["output"]["calls"] == 1, first
            assert _invoke(api, name)["start"] == "hot"  # shared: the fork stays for the next call
            api.put(f"/api/v1/functions/{name}", json={"code": PER_CALL_PY.replace('"v1"', '"v2"')})
            _wait_for(lambda: any(e.dep.function_name == name and e.dep.version == 2
                                  for e in _templates(running).values()), "the new version's template")
            assert _invoke(api, name)["output"]["code"] == "v2"
