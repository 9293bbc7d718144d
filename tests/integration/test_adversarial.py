"""Hostile functions against a real node (HTTP, real bwrap machines): each is contained, then a normal call works.

Every case deploys a function whose code attacks the sandbox, the node or the host, checks that the attack
failed or only hurt the attacker's own call, and then makes a normal call to the same function, which must
succeed: the node, the pool and the host are still fine. Limits are kept small (``timeout_s=1``, small
``memory_mb``) so the whole file stays quick on two cores. The module prints
``adversarial: N cases tried, M contained`` at the end; a case counts as contained only when every one of
its assertions held.
"""

import contextlib
import errno
import os
import socket
import subprocess
import time
import uuid
from pathlib import Path

import pytest
from test_api import deploy, invoke, unique

pytestmark = pytest.mark.sandbox

MiB = 1 << 20
RESULT_MAX = 6 * MiB
LOG_TAIL_MAX = 64 * 1024
# A value only the node's process (and so only the host) holds: it must never show up inside a machine.
CANARY = f"nimbus-canary-{uuid.uuid4().hex}"
os.environ["NIMBUS_ADVERSARIAL_CANARY"] = CANARY

TALLY = {"tried": 0, "contained": 0, "shown": []}


@pytest.fixture(scope="module", autouse=True)
def summary(request):
    """Print the figure once the module is done (through the terminal reporter, past output capture)."""
    yield
    plugins = request.config.pluginmanager
    reporter, capture = plugins.get_plugin("terminalreporter"), plugins.get_plugin("capturemanager")
    lines = [""]
    if request.config.option.verbose > 0:  # what each case ran into, for the record
        lines += [f"  {name}: {shown}" for name, shown in TALLY["shown"]]
    lines.append(f"adversarial: {TALLY['tried']} cases tried, {TALLY['contained']} contained")
    with capture.global_and_fixture_disabled() if capture is not None else contextlib.nullcontext():
        for line in lines:
            reporter.write_line(line) if reporter is not None else print(line)


@pytest.fixture
def case(request):
    """Count the case as tried; the test calls ``contained(what it showed)`` after its last assertion."""
    TALLY["tried"] += 1
    done = []

    def contained(shown) -> None:
        assert not done
        done.append(True)
        TALLY["contained"] += 1
        TALLY["shown"].append((request.node.name, str(shown)[:300]))

    yield contained
    # a case that did not reach contained() has failed an assertion: pytest reports it


def call(api, name: str, event=None) -> dict:
    """An invocation that may fail (the hostile call): only the HTTP exchange itself must work."""
    resp = api.post(f"/api/v1/functions/{name}/invoke", json=event if event is not None else {})
    assert resp.status_code == 200, resp.text
    return resp.json()


def shown(result: dict) -> str:
    """One line on how the hostile call ended: its status, then its error or its output."""
    error = result.get("error")
    if error:
        return f"{result['status']}: {error['type']}: {error['message'][:160]}"
    return f"{result['status']}: {result['output']!r}"


def normal_call_works(api, name: str) -> dict:
    """The call that follows every attack: same function, harmless path, must succeed, logs captured.

    A function deployed with a short timeout (to cut its attack short) first gets a roomy one, so that a
    loaded host (two shared cores) cannot fail the normal call on time alone: no timing threshold here.
    """
    if api.get(f"/api/v1/functions/{name}").json()["timeout_s"] < 10:
        resp = api.put(f"/api/v1/functions/{name}", json={"timeout_s": 60})
        assert resp.status_code == 200, resp.text
    result = invoke(api, name, {"normal": True})
    assert result["status"] == "succeeded", result
    assert result["output"] == "fine", result
    assert "normal call" in logs_of(api, result["invocation_id"])
    return result


def hostile(body: str) -> str:
    """Python source whose handler runs ``body`` unless the event asks for the normal path."""
    indented = "\n".join("        " + line for line in body.strip("\n").splitlines())
    return f"""
import ctypes, errno, json, os, signal, socket, subprocess, sys, time
libc = ctypes.CDLL(None, use_errno=True)

def syscall(nr, *args):
    ctypes.set_errno(0)
    result = libc.syscall(ctypes.c_long(nr), *[ctypes.c_long(a) for a in args])
    return "ok" if result >= 0 else errno.errorcode.get(ctypes.get_errno(), str(ctypes.get_errno()))

def attempt(fn):
    try:
        value = fn()
        return ["done", value if isinstance(value, (str, int, list)) else repr(value)[:200]]
    except OSError as exc:
        return [type(exc).__name__, exc.errno]

def handler(event, context):
    if event.get("normal"):
        print("normal call")
        return "fine"
    if True:
{indented}
"""


def python_prefixes() -> tuple[Path, ...]:
    """The host directories of the base Python installation, which every machine has read-only."""
    from nimbus.machines.layout import base_python

    return base_python()[1]


def logs_of(api, invocation_id: str) -> str:
    return api.get(f"/api/v1/invocations/{invocation_id}").json()["logs"] or ""


def driver_of(node):
    return node.node.pool.driver


def host_processes_with(marker: str) -> list[int]:
    """Host pids whose command line carries ``marker``."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                if marker.encode() in f.read():
                    found.append(int(entry))
        except OSError:
            continue
    return found


def wait_until_gone(marker: str, seconds: float = 30.0) -> list[int]:
    deadline = time.monotonic() + seconds
    while (left := host_processes_with(marker)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


# ---------------------------------------------------------------- resources


def test_fork_bomb(api, node, case):
    enforcement = driver_of(node).enforcement
    if enforcement["pids"].startswith("none"):
        pytest.skip(f"no per-machine pids limit on this host ({enforcement['pids']}): a fork bomb would reach it")
    fn = deploy(api, hostile("""
made = 0
try:
    while made < 100000:
        pid = os.fork()
        if pid == 0:  # every child forks on, forever: the classic bomb
            while True:
                try:
                    os.fork()
                except OSError:
                    time.sleep(0.05)
        made += 1
except OSError as exc:
    return {"made": made, "errno": exc.errno}
return {"made": made, "errno": None}
"""), timeout_s=2, memory_mb=128)
    result = call(api, fn["name"])
    if result["status"] == "succeeded":  # the agent itself got EAGAIN back from fork
        assert result["output"]["errno"] == errno.EAGAIN, result
        assert result["output"]["made"] < 1000, result
    else:
        assert result["status"] in ("failed", "timed_out"), result
    # The host can still start processes, and the node still serves.
    assert subprocess.run(["true"]).returncode == 0
    normal_call_works(api, fn["name"])
    api.delete(f"/api/v1/functions/{fn['name']}")  # retire the machine with its spinning children
    case(shown(result))


def test_memory_hog_past_memory_mb(api, case):
    fn = deploy(api, hostile("""
hoard = []
for _ in range(1024):
    hoard.append(bytearray(1 << 20))  # touched: really resident
    hoard[-1][::4096] = b"x" * 256
return len(hoard)
"""), memory_mb=64, timeout_s=30)
    result = call(api, fn["name"])
    assert result["status"] == "failed", result  # the kernel's OOM killer, or MemoryError under RLIMIT_DATA
    assert result["output"] is None
    normal_call_works(api, fn["name"])
    case(shown(result))


def test_cpu_spin_past_timeout(api, case):
    fn = deploy(api, hostile("""
while True:
    pass
"""), timeout_s=1)
    result = call(api, fn["name"])
    assert result["status"] == "timed_out", result
    assert result["error"]["type"] == "TimeoutError"
    normal_call_works(api, fn["name"])
    case(shown(result))


def test_100_mb_of_stdout(api, case):
    fn = deploy(api, hostile("""
chunk = b"x" * (1 << 20)
for _ in range(100):
    os.write(1, chunk)
print("the end")
return "flooded"
"""), memory_mb=64, timeout_s=60)
    result = call(api, fn["name"])
    # 100 MB of output in a 64 MiB machine: only the 64 KiB tail is ever held, so the call itself succeeds.
    assert result["status"] == "succeeded" and result["output"] == "flooded", result
    logs = logs_of(api, result["invocation_id"])
    assert logs.endswith("the end\n") and len(logs.encode()) <= LOG_TAIL_MAX, len(logs)
    normal_call_works(api, fn["name"])
    case(shown(result))


def test_50_mb_result(api, case):
    fn = deploy(api, hostile("return 'r' * (50 << 20)"), memory_mb=256, timeout_s=60)
    result = call(api, fn["name"])
    assert result["status"] == "failed" and result["error"]["type"] == "ResultTooLarge", result
    assert result["output"] is None
    normal_call_works(api, fn["name"])
    case(shown(result))


def test_forged_oversized_result_frame_on_the_channel(api, case):
    """Code in the agent's process can write frames itself, past the agent's 6 MiB check: the host refuses."""
    fn = deploy(api, hostile("""
fd = int(sys.argv[sys.argv.index("--fd") + 1])
frame = sys._getframe()
while frame.f_code.co_name != "on_exec":  # the agent's frame holds the request id the host waits for
    frame = frame.f_back
request_id = frame.f_locals["header"]["id"]
head = json.dumps({"type": "result", "id": request_id, "duration_ms": 1, "logs": "", "logs_truncated": False})
head = head.encode()
blob = b'"' + b"z" * (40 << 20) + b'"'
os.write(fd, len(head).to_bytes(4, "big") + len(blob).to_bytes(4, "big") + head)
view = memoryview(blob)
while view:
    view = view[os.write(fd, view[:1 << 20]):]
time.sleep(5)
"""), memory_mb=256, timeout_s=30)
    result = call(api, fn["name"])
    assert result["status"] != "succeeded", result
    assert result["output"] is None
    normal_call_works(api, fn["name"])
    case(shown(result))


def test_tmp_is_size_capped(api, case):
    fn = deploy(api, hostile("""
written = 0
try:
    with open("/tmp/fill", "wb") as f:
        while written < (1 << 30):
            f.write(b"z" * (1 << 20))
            f.flush()
            written += 1 << 20
except OSError as exc:
    return {"written_mib": written >> 20, "errno": exc.errno}
return {"written_mib": written >> 20, "errno": None}
"""), memory_mb=64, timeout_s=30)
    result = call(api, fn["name"])
    if result["status"] == "succeeded":  # ENOSPC from the tmpfs size cap
        assert result["output"]["errno"] is not None and result["output"]["written_mib"] <= 64, result
    else:  # tmpfs pages count against the memory cgroup: the OOM killer came first
        assert result["status"] == "failed", result
    normal_call_works(api, fn["name"])
    case(shown(result))


# ---------------------------------------------------------------- the filesystem


def test_writes_to_usr_etc_and_root(api, case):
    fn = deploy(api, hostile("""
out = {}
for path in ["/usr/evil", "/usr/bin/python3", "/etc/evil", "/etc/passwd", "/evil", "/opt/nimbus/nimbus/evil.py"]:
    out[path] = attempt(lambda: open(path, "ab").write(b"x"))
out["mkdir /"] = attempt(lambda: os.mkdir("/newdir"))
out["chmod /etc/passwd"] = attempt(lambda: os.chmod("/etc/passwd", 0o777))
return out
"""))
    result = invoke(api, fn["name"])
    assert result["status"] == "succeeded", result
    for path, (outcome, _) in result["output"].items():
        assert outcome != "done", (path, result["output"])
    normal_call_works(api, fn["name"])
    case(shown(result))


def test_reading_host_files_database_and_node_home(api, node, case):
    home = node.settings.home.resolve()
    db = home / "nimbus.db"
    assert db.exists() or "postgres" in str(node.settings.database_url)
    targets = ["/etc/shadow", "/etc/gshadow", str(db), str(home), "/root", "/home", "/work",
               "/proc/1/environ", "/proc/1/root/etc/shadow", "/sys/fs/cgroup", "/var/run/docker.sock"]
    fn = deploy(api, hostile(f"""
out = {{}}
for path in {targets!r}:
    def read():
        return sorted(os.listdir(path)) if os.path.isdir(path) else open(path, "rb").read(64).hex()
    out[path] = attempt(read)
environs = ""
for pid in os.listdir("/proc"):
    if pid.isdigit():
        try:
            environs += open(f"/proc/{{pid}}/environ", "rb").read().decode(errors="replace")
        except OSError:
            pass
out["environs"] = environs + json.dumps(dict(os.environ))
out["pids"] = sorted(int(p) for p in os.listdir("/proc") if p.isdigit())
return out
"""))
    result = invoke(api, fn["name"])
    assert result["status"] == "succeeded", result
    seen = result["output"]
    for path in targets:
        outcome, value = seen[path]
        if outcome != "done":
            continue
        # Only the sandbox's own things may be there: its init's environment, and the directories bwrap
        # made on the way to the base Python installation (bound read-only at its own path, e.g. /root/.pyenv).
        assert "nimbus.db" not in str(value) and CANARY not in str(value), (path, value)
        if path == "/proc/1/environ":
            continue
        on_the_way = {p.relative_to(path).parts[0] for p in python_prefixes()
                      if p.is_relative_to(path) and p != Path(path)}
        assert isinstance(value, list) and set(value) <= on_the_way, (path, value)
    assert CANARY not in seen["environs"], "the node's environment leaked into a machine"
    assert max(seen["pids"]) < 100, seen["pids"]  # its own pid namespace: no host process is visible
    normal_call_works(api, fn["name"])
    case(shown(result))


def test_scrubbed_environment_and_no_new_privileges(api, case):
    fn = deploy(api, hostile("""
status = dict(line.split(":", 1) for line in open("/proc/self/status").read().splitlines())
return {"env": dict(os.environ), "nnp": status["NoNewPrivs"].strip(), "seccomp": status["Seccomp"].strip(),
        "caps": status["CapEff"].strip(), "uid": os.getuid(), "setuid0": attempt(lambda: os.setuid(0))}
"""), env={"MY_SETTING": "mine"})
    result = invoke(api, fn["name"])
    assert result["status"] == "succeeded", result
    out = result["output"]
    assert out["nnp"] == "1" and out["seccomp"] == "2" and int(out["caps"], 16) == 0, out
    assert out["uid"] != 0 and out["setuid0"][0] == "PermissionError", out
    allowed = {"PATH", "HOME", "LANG", "MY_SETTING", "AWS_LAMBDA_FUNCTION_NAME", "AWS_LAMBDA_FUNCTION_VERSION",
               "AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "NIMBUS_FUNCTION_NAME", "LAMBDA_TASK_ROOT",
               # Lambda's own names: what the function runs in, never the node's
               "AWS_LAMBDA_LOG_GROUP_NAME", "AWS_LAMBDA_LOG_STREAM_NAME", "AWS_LAMBDA_INITIALIZATION_TYPE",
               "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_EXECUTION_ENV", "LAMBDA_RUNTIME_DIR", "TZ", "_HANDLER",
               "_X_AMZN_TRACE_ID", "AWS_XRAY_CONTEXT_MISSING"}
    assert set(out["env"]) <= allowed, sorted(set(out["env"]) - allowed)
    assert out["env"]["MY_SETTING"] == "mine"
    normal_call_works(api, fn["name"])
    case(shown(result))


def test_another_machines_tmp_is_invisible(api, case):
    secret = uuid.uuid4().hex
    writer = deploy(api, hostile(f"""
open("/tmp/secret-{secret}", "w").write({secret!r})
return sorted(os.listdir("/tmp"))
"""))
    assert f"secret-{secret}" in invoke(api, writer["name"])["output"]
    reader = deploy(api, hostile(f"""
found = []
for root in ["/tmp", "/var/tmp", "/dev/shm", "/var/task"]:
    for dirpath, _, files in os.walk(root):
        found += [os.path.join(dirpath, f) for f in files if {secret!r} in f]
return {{"found": found, "open": attempt(lambda: open("/tmp/secret-{secret}").read())}}
"""))
    result = invoke(api, reader["name"])
    assert result["status"] == "succeeded", result
    assert result["output"]["found"] == [] and result["output"]["open"][0] == "FileNotFoundError", result
    normal_call_works(api, reader["name"])
    normal_call_works(api, writer["name"])
    case(shown(result))


def test_a_new_version_gets_a_fresh_machine(api, case):
    fn = deploy(api, hostile("""
global LEFT
LEFT = "planted"
open("/tmp/planted", "w").write("v1 was here")
return "planted"
"""))
    assert invoke(api, fn["name"])["output"] == "planted"
    resp = api.put(f"/api/v1/functions/{fn['name']}", json={"code": hostile("""
return {"tmp": os.path.exists("/tmp/planted"), "global": "LEFT" in globals()}
""")})
    assert resp.status_code == 200, resp.text
    result = invoke(api, fn["name"])
    assert result["status"] == "succeeded" and result["output"] == {"tmp": False, "global": False}, result
    normal_call_works(api, fn["name"])
    case(shown(result))


# ---------------------------------------------------------------- the network


@pytest.fixture
def host_listeners():
    """A TCP port, a Unix socket path and an abstract Unix socket on the host, all accepting connections."""
    tcp = socket.socket()
    tcp.bind(("0.0.0.0", 0))
    tcp.listen()
    path = f"/tmp/nimbus-adv-{uuid.uuid4().hex[:8]}.sock"
    unix = socket.socket(socket.AF_UNIX)
    unix.bind(path)
    os.chmod(path, 0o777)
    unix.listen()
    abstract_name = f"nimbus-adv-{uuid.uuid4().hex[:8]}"
    abstract = socket.socket(socket.AF_UNIX)
    abstract.bind("\0" + abstract_name)
    abstract.listen()
    try:
        yield {"tcp_port": tcp.getsockname()[1], "unix": path, "abstract": abstract_name}
    finally:
        for sock in (tcp, unix, abstract):
            sock.close()
        os.unlink(path)


def host_addresses() -> list[str]:
    """The host's own non-loopback IPv4 addresses (reachable from the host itself)."""
    found = set()
    try:
        for info in socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET):
            found.add(info[4][0])
    except OSError:
        pass
    return sorted(a for a in found if not a.startswith("127."))


def test_tcp_and_unix_sockets_to_the_host(api, node, host_listeners, case):
    port = int(node.url.rsplit(":", 1)[1])
    targets = [("127.0.0.1", 5432), ("127.0.0.1", port), ("127.0.0.1", host_listeners["tcp_port"])]
    targets += [(address, host_listeners["tcp_port"]) for address in host_addresses()]
    fn = deploy(api, hostile(f"""
out = {{}}
for host, port in {targets!r}:
    out[f"{{host}}:{{port}}"] = attempt(lambda: socket.create_connection((host, port), timeout=1).close())
def unix(address):
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(1)
        s.connect(address)
out["unix"] = attempt(lambda: unix({host_listeners["unix"]!r}))
out["abstract"] = attempt(lambda: unix("\\0" + {host_listeners["abstract"]!r}))
out["docker"] = attempt(lambda: unix("/var/run/docker.sock"))
out["interfaces"] = sorted(name for _, name in socket.if_nameindex())
out["udp"] = attempt(lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b"x", ("8.8.8.8", 53)))
return out
"""), timeout_s=30)
    result = invoke(api, fn["name"])
    assert result["status"] == "succeeded", result
    out = result["output"]
    assert out.pop("interfaces") == ["lo"], result
    for target, (outcome, _) in out.items():
        assert outcome != "done", (target, out)
    normal_call_works(api, fn["name"])
    case(shown(result))


# ---------------------------------------------------------------- the kernel


SYSCALLS = {  # x86_64 numbers
    "mount": (165, 0, 0, 0, 0, 0),
    "umount2": (166, 0, 0),
    "pivot_root": (155, 0, 0),
    "ptrace": (101, 16, 1, 0, 0),  # PTRACE_ATTACH to pid 1
    "process_vm_readv": (310, 1, 0, 0, 0, 0, 0),
    "unshare": (272, 0x10000000),  # CLONE_NEWUSER: the way to regain capabilities
    "unshare_mount": (272, 0x00020000),
    "setns": (308, 0, 0),
    "keyctl": (250, 0, 0, 0, 0, 0),
    "add_key": (248, 0, 0, 0, 0, 0),
    "bpf": (321, 0, 0, 0),
    "perf_event_open": (298, 0, 0, 0, 0, 0),
    "userfaultfd": (323, 0),
    "kexec_load": (246, 0, 0, 0, 0),
    "init_module": (175, 0, 0, 0),
    "reboot": (169, 0, 0, 0, 0),
    "swapon": (167, 0, 0),
    "clone_newns": (56, 0x00020000 | 17, 0, 0, 0, 0),
    "clone_newuser": (56, 0x10000000 | 17, 0, 0, 0, 0),
}


def test_mount_ptrace_unshare_keyctl_bpf_are_denied(api, case):
    import platform

    if platform.machine() != "x86_64":
        pytest.skip("the syscall numbers below are x86_64's")
    fn = deploy(api, hostile(f"""
out = {{name: syscall(*args) for name, args in {SYSCALLS!r}.items()}}
out["clone3"] = syscall(435, 0, 0)
out["unshare_cmd"] = subprocess.run(["/usr/bin/unshare", "-Ur", "true"], capture_output=True).returncode
return out
"""))
    result = invoke(api, fn["name"])
    assert result["status"] == "succeeded", result
    out = result["output"]
    for name in SYSCALLS:
        assert out[name] == "EPERM", (name, out)
    assert out["clone3"] == "ENOSYS", out  # so that libc falls back to clone, whose flags the filter reads
    assert out["unshare_cmd"] != 0, out
    normal_call_works(api, fn["name"])
    case(shown(result))


@pytest.mark.parametrize("how", ["own pid", "parent", "pid 1", "every process"])
def test_killing_the_agent_or_the_sandbox_init(api, case, how):
    # A host process of the sandbox's uid: kill(-1) inside must not reach it (the pid namespace holds).
    bystander = subprocess.Popen(["sleep", "60"], user=65534 if os.geteuid() == 0 else None)
    target = {"own pid": "os.getpid()", "parent": "os.getppid()", "pid 1": "1", "every process": "-1"}[how]
    fn = deploy(api, hostile(f"""
sent = attempt(lambda: os.kill({target}, signal.SIGKILL))
time.sleep(0.2)
os.kill(os.getpid(), signal.SIGKILL) if {how!r} == "every process" else None
return {{"sent": sent, "ppid": os.getppid()}}
"""), timeout_s=30)
    try:
        result = call(api, fn["name"])
        assert result["status"] in ("failed", "succeeded"), result
        if result["status"] == "succeeded":  # pid 1 ignores signals from inside its namespace
            assert how in ("parent", "pid 1"), result
        assert bystander.poll() is None, "a process outside the sandbox was killed"
        normal_call_works(api, fn["name"])
    finally:
        bystander.kill()
        bystander.wait()
    case(shown(result))


def test_a_handler_that_never_returns_and_ignores_sigterm(api, case):
    marker = unique("immortal")
    fn = deploy(api, hostile(f"""
signal.signal(signal.SIGTERM, signal.SIG_IGN)
child = subprocess.Popen(["/bin/sh", "-c", "trap '' TERM; while :; do sleep 1; done", {marker!r}])
while True:
    try:
        time.sleep(1)
    except BaseException:
        pass
"""), timeout_s=1)
    result = call(api, fn["name"])
    assert result["status"] == "timed_out", result
    assert wait_until_gone(marker) == [], "processes of a timed-out machine survived it"
    normal_call_works(api, fn["name"])
    case(shown(result))


@pytest.mark.parametrize("which", ["fd 3", "every agent fd but the channel"])
def test_a_function_that_closes_fd_3(api, case, which):
    fn = deploy(api, hostile(f"""
print("before")
if {which!r} == "fd 3":
    os.close(3)
else:
    channel = int(sys.argv[sys.argv.index("--fd") + 1])
    os.closerange(3, channel)
    os.closerange(channel + 1, 1024)
print("after")
return "closed"
"""))
    result = call(api, fn["name"])
    assert result["status"] == "succeeded" and result["output"] == "closed", result
    logs = logs_of(api, result["invocation_id"])
    if which == "fd 3":  # the agent's diagnostics copy of stderr: the logs do not depend on it
        assert logs == "before\nafter\n", logs
    else:  # the log pipe's read end went too: the agent says so and makes a new pipe
        assert "closed the agent's log pipe" in logs, logs
    again = normal_call_works(api, fn["name"])  # same machine, hot: its logs are captured again
    assert again["start"] == "hot", again
    case(shown(result))


def test_a_function_that_closes_the_agent_channel(api, case):
    fn = deploy(api, hostile("""
os.close(int(sys.argv[sys.argv.index("--fd") + 1]))
return "closed"
"""))
    result = call(api, fn["name"])
    assert result["status"] == "failed", result
    normal_call_works(api, fn["name"])
    case(shown(result))


def test_signals_to_the_node_process_do_not_arrive(api, case):
    """The node's pid is not in the sandbox's pid namespace: a guess at it hits nothing of the host."""
    node_pid = os.getpid()
    fn = deploy(api, hostile(f"""
return attempt(lambda: os.kill({node_pid}, signal.SIGKILL))
"""))
    result = invoke(api, fn["name"])
    assert result["status"] == "succeeded" and result["output"][0] != "done", result
    normal_call_works(api, fn["name"])
    case(shown(result))

