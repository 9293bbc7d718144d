"""A template machine (a "zygote", as in SOCK): the agent imported once, forked into each new machine.

A cold start through bwrap pays for a new interpreter, its imports and the sandbox's namespaces every
time. A template is one bwrap sandbox per runtime whose process has already imported the agent (and
the runtime's module); the host asks it over a control socket to fork a machine, and the child
re-isolates itself before it accepts any code:

1. (child C1, root, in the template's namespaces) a new session; every descriptor closed but the ones
   it was sent; the machine's cgroup joined through descriptors the host opened (so every later
   process is counted against the machine's own limits); then new pid, mount, network, IPC, UTS and
   cgroup namespaces. C1 stays behind only to wait and report how the machine ended.
2. (C2, pid 1 of the new pid namespace) mounts made private, then a fresh ``/proc`` and
   ``/dev/pts``, and fresh size-capped tmpfs on ``/tmp``, ``/dev/shm`` and ``/var/task``, so no file
   or pty of a sibling or of the template is reachable; the function's dependency layer, when it has
   one, attached read-only at ``/opt/layer`` (the host cloned it, since the template's sandbox cannot
   see it: :mod:`nimbus.machines.mounts`); loopback brought up in the empty network namespace; stdout
   and stderr sent to the machine's own output pipe. C2 then waits for the agent's one request to make
   ``/var/task`` read-only (sent once the function's code is written there, before any of it runs), and
   after that only reaps orphans, as bwrap's init does.
3. (C3, the agent) the machine's own host uid and gid (the host picks it) with no groups and no
   capability in any set (:mod:`nimbus.agent.privileges`); the seccomp
   filter installed (``no_new_privs`` is inherited from bwrap); a clean environment; then
   :func:`nimbus.agent.main.main` on the channel it was sent.

Each step dies with its parent (``PR_SET_PDEATHSIG``), so killing C1, the template, or the node ends
the machine. The template itself runs only this module, never function code; it holds the
capabilities (``CAP_SYS_ADMIN``) that steps 1-2 need, and no child keeps them past step 3.

Control messages are JSON in ``SOCK_SEQPACKET`` datagrams. Host → template: ``{"op": "fork", "id",
"tmp_bytes", "task_bytes", "rlimits": [[name, value], …], "layer": true (optional)}`` with the
descriptors channel, output, one cgroup join file per controller, then (with ``"layer"``) the detached
layer mount. Template → host: ``{"op": "ready"}`` once,
``{"op": "forked", "id"}`` or ``{"op": "failed", "id", "error"}`` per fork, and
``{"op": "exited", "id", "status"}`` when a machine ends (a negative status: killed by that signal).
"""

import ctypes
import fcntl
import gc
import json
import os
import resource
import signal
import socket
import struct
import sys

from nimbus.agent import main as agent_main
from nimbus.agent import privileges
from nimbus.agent.contract import LAYER_DIR, PROC_HIDDEN, SANDBOX_ENV, TASK_DIR, TEMPLATE_MESSAGE_MAX

CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
NAMESPACES = CLONE_NEWNS | CLONE_NEWCGROUP | CLONE_NEWUTS | CLONE_NEWIPC | CLONE_NEWPID | CLONE_NEWNET
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 16384, 1 << 18
SYS_MOVE_MOUNT = 429  # the same number on every architecture but alpha
AT_FDCWD = -100
MOVE_MOUNT_F_EMPTY_PATH = 0x4
PR_SET_PDEATHSIG = 1
PR_SET_SECCOMP = 22
PR_SET_NO_NEW_PRIVS = 38
SECCOMP_MODE_FILTER = 2
SIOCSIFFLAGS = 0x8914
IFF_UP, IFF_LOOPBACK, IFF_RUNNING = 0x1, 0x8, 0x40
PROC_READ_ONLY = ("sys", "sysrq-trigger", "irq", "bus")  # as bwrap's --proc leaves them
MNT_DETACH = 2
ETC_FILES = ("passwd", "group")  # the machine's own, naming its uid; sent with the fork request
MAX_FDS = 8
CHANNEL_FD_MIN = 10
EXIT_SETUP = 71  # a child could not isolate itself (EX_OSERR); the reason is on its output

_libc = ctypes.CDLL(None, use_errno=True)


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    def enc(s: str | None) -> bytes | None:
        return None if s is None else s.encode()

    _check(_libc.mount(enc(source), target.encode(), enc(fstype), ctypes.c_ulong(flags), enc(data)),
           f"mount {target}")


def _attach(fd: int, target: str) -> None:
    """Attach the detached mount ``fd`` (an ``open_tree`` clone) at ``target`` in this mount namespace."""
    _check(_libc.syscall(SYS_MOVE_MOUNT, fd, b"", AT_FDCWD, target.encode(), MOVE_MOUNT_F_EMPTY_PATH),
           f"move_mount {target}")


def _prctl(option: int, arg: int) -> None:
    _check(_libc.prctl(option, ctypes.c_ulong(arg), 0, 0, 0), f"prctl {option}")


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def _install_seccomp(program: bytes) -> None:
    """Load the node's seccomp BPF program (an array of 8-byte ``sock_filter``) on this process."""
    if not program:
        return
    buffer = ctypes.create_string_buffer(program, len(program))
    fprog = _SockFprog(len(program) // 8, ctypes.cast(buffer, ctypes.c_void_p))
    _check(_libc.prctl(PR_SET_SECCOMP, ctypes.c_ulong(SECCOMP_MODE_FILTER), ctypes.byref(fprog), 0, 0),
           "installing the seccomp filter")


def _exit_status(status: int) -> int:
    """A wait status as the exit code bwrap would give: the code, or 128 + the signal."""
    if os.WIFSIGNALED(status):
        return 128 + os.WTERMSIG(status)
    return os.waitstatus_to_exitcode(status)


def _bind_read_only(source: str, target: str) -> None:
    _mount(source, target, None, MS_BIND | MS_REC)
    _mount(None, target, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC)


def _own_etc_files(request: dict) -> None:
    """Bind the machine's own passwd and group (naming its uid) over the template's, read-only.

    They are written to a scratch tmpfs on /var/task, which is then detached (the binds keep their files)
    before the real /var/task is mounted: nothing of them stays reachable but the two read-only files.
    """
    files = request.get("etc") or {}
    if not files:
        return
    _mount("tmpfs", TASK_DIR, "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, "size=65536,mode=0755")
    for name in ETC_FILES:
        text = files.get(name)
        if not isinstance(text, str):
            continue
        scratch = f"{TASK_DIR}/{name}"
        with open(scratch, "w") as f:
            f.write(text)
        os.chmod(scratch, 0o644)
        _bind_read_only(scratch, f"/etc/{name}")
    _check(_libc.umount2(TASK_DIR.encode(), MNT_DETACH), f"umount {TASK_DIR}")


def _fresh_filesystems(request: dict, layer: int | None) -> None:
    """Step 2: this mount namespace's own /proc, /dev/pts, /tmp, /dev/shm and /var/task, and its layer.

    ``layer``: the detached read-only mount of the function's layer, attached at /opt/layer and closed.
    The tmpfs dirs belong to the machine's uid; its passwd and group name that uid.
    """
    _mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing below propagates back to the template
    _mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    for name in PROC_READ_ONLY:
        path = f"/proc/{name}"
        if os.path.exists(path):
            _bind_read_only(path, path)
    for name in PROC_HIDDEN:
        path = f"/proc/{name}"
        if os.path.exists(path):
            _bind_read_only("/dev/null", path)
    _own_etc_files(request)
    uid = int(request["uid"])
    # bwrap's /dev has its own devpts, the template's: one per child, or a pty opened by one function
    # could be opened by its siblings. /dev/ptmx points into it.
    _mount("devpts", "/dev/pts", "devpts", MS_NOSUID | MS_NOEXEC, "newinstance,ptmxmode=0666,mode=620")
    tmp = f"size={int(request['tmp_bytes'])},mode=1777,uid={uid},gid={uid}"
    _mount("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, tmp)
    _mount("tmpfs", "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV, tmp)
    _mount("tmpfs", TASK_DIR, "tmpfs", MS_NOSUID | MS_NODEV,
           f"size={int(request['task_bytes'])},mode=1777,uid={uid},gid={uid}")
    if layer is not None:
        _attach(layer, LAYER_DIR)  # after "/" went private: the mount stays in this namespace
        os.close(layer)


def _loopback_up() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        fcntl.ioctl(sock, SIOCSIFFLAGS, struct.pack("16sh", b"lo", IFF_UP | IFF_LOOPBACK | IFF_RUNNING))


def _serve_seal(fd: int) -> None:
    """Step 4, in the init: wait for the agent's one request to make /var/task read-only, and do it.

    The agent asks once the function's code is written and before any of it runs (``nimbus.agent.main``);
    no other process exists in the machine until then, so the init has no orphans to reap meanwhile. An
    agent that dies first closes its end: nothing to do.
    """
    try:
        asked = os.read(fd, 1)
    except OSError:
        asked = b""
    if asked == agent_main.SEAL_REQUEST:
        try:
            _mount(None, TASK_DIR, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)
            answer = agent_main.SEAL_DONE
        except OSError as exc:
            answer = str(exc).encode(errors="replace")[:200]
        try:
            os.write(fd, answer)
        except OSError:
            pass
    os.close(fd)


def _become_agent(request: dict, channel: int, program: bytes, seal: int) -> None:
    """Step 3: drop to the sandbox user, install the filter, and run the agent (never returns)."""
    for name, value in request.get("rlimits", ()):
        resource.setrlimit(getattr(resource, name), (value, value))
    uid = int(request["uid"])
    privileges.drop(uid, uid)  # the machine's own uid; no capability left in any set
    _prctl(PR_SET_NO_NEW_PRIVS, 1)  # bwrap set it already; a filter without it would need privilege
    _install_seccomp(program)
    os.environ.clear()
    os.environ.update(SANDBOX_ENV)
    os.chdir(TASK_DIR)
    sys.argv = ["-c", "--fd", str(channel), "--task-dir", TASK_DIR, "--seal-fd", str(seal)]
    agent_main.main(sys.argv[1:])


def _machine(request: dict, fds: list[int], program: bytes, template_pid: int) -> None:
    """Run in C1, just forked: isolate, then become the machine's init and agent. Never returns."""
    channel, output, *joins = fds
    layer = joins.pop() if request.get("layer") else None
    try:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_SETMASK, ())  # the template blocks SIGCHLD around fork()
        _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != template_pid:  # the template died before the line above
            os._exit(EXIT_SETUP)
        os.setsid()
        keep = sorted(set(fds))
        low = 0
        for fd in keep:  # closes the control socket among others: a machine cannot ask for forks
            os.closerange(low, fd)
            low = fd + 1
        os.closerange(low, 1 << 16)
        # The channel where a booted agent finds it: above the low fds the agent itself opens (its
        # copy of stderr lands on 3, which functions may close; the channel must not be that one).
        moved = fcntl.fcntl(channel, fcntl.F_DUPFD, CHANNEL_FD_MIN)
        os.close(channel)
        channel = moved
        for fd in joins:
            try:
                os.write(fd, b"0")  # moves this (single-threaded) process into the machine's cgroup
            except OSError as exc:
                raise OSError(exc.errno, f"joining the machine's cgroup: {exc.strerror}") from None
            os.close(fd)
        os.dup2(output, 1)
        os.dup2(output, 2)
        _check(_libc.unshare(NAMESPACES), "unshare")
    except BaseException as exc:
        _report_setup_failure(output, exc)
    init = os.fork()
    if init:
        os.close(channel)
        os.close(output)
        if layer is not None:
            os.close(layer)
        _, status = os.waitpid(init, 0)
        os._exit(_exit_status(status))
    try:  # C2: pid 1 here
        _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        _fresh_filesystems(request, layer)
        _loopback_up()
        null = os.open("/dev/null", os.O_RDONLY)  # lands on 0, which step 1 closed
        if null != 0:
            os.dup2(null, 0)
            os.close(null)
        os.close(output)
    except BaseException as exc:
        _report_setup_failure(2, exc)
    init_end, agent_end = (end.detach() for end in socket.socketpair())
    agent = os.fork()
    if agent == 0:
        try:
            _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
            os.close(init_end)
            # Above the channel, out of the way of the low fds the agent opens itself.
            seal = fcntl.fcntl(agent_end, fcntl.F_DUPFD_CLOEXEC, channel + 1)
            os.close(agent_end)
            _become_agent(request, channel, program, seal)
        except BaseException as exc:
            _report_setup_failure(2, exc)
    os.close(channel)
    os.close(agent_end)
    _serve_seal(init_end)
    while True:  # an init's work: reap orphans, and end with the agent
        try:
            pid, status = os.wait()
        except ChildProcessError:
            os._exit(EXIT_SETUP)
        if pid == agent:
            os._exit(_exit_status(status))


def _report_setup_failure(fd: int, exc: BaseException) -> None:
    try:
        import traceback

        where = "".join(traceback.format_exception(exc, limit=-2))
        os.write(fd, f"nimbus-template: machine setup failed: {exc}\n{where}".encode(errors="replace"))
    finally:
        os._exit(EXIT_SETUP)


class Template:
    """The template's own loop: answer fork requests, report the machines that end."""

    def __init__(self, control: socket.socket, program: bytes) -> None:
        self.control = control
        self.program = program
        self.children: dict[int, str] = {}  # C1 pid → machine id
        self.pid = os.getpid()

    def send(self, message: dict) -> None:
        self.control.send(json.dumps(message).encode())

    def on_sigchld(self, signum, frame) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            machine_id = self.children.pop(pid, None)
            if machine_id is not None:
                code = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.waitstatus_to_exitcode(status)
                self.send({"op": "exited", "id": machine_id, "status": code})

    def fork(self, request: dict, fds: list[int]) -> None:
        machine_id = str(request.get("id"))
        needed = 3 if request.get("layer") else 2
        if len(fds) < needed:
            self.send({"op": "failed", "id": machine_id,
                       "error": f"{len(fds)} descriptors sent, {needed} or more needed"})
            return
        # SIGCHLD waits until the child is on record, or a machine that dies at once would go unreported.
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD})
        try:
            pid = os.fork()
            if pid == 0:
                _machine(request, fds, self.program, self.pid)
            self.children[pid] = machine_id
            self.send({"op": "forked", "id": machine_id, "pid": pid})
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGCHLD})

    def serve(self) -> int:
        signal.signal(signal.SIGCHLD, self.on_sigchld)
        self.send({"op": "ready"})
        while True:
            try:
                data, fds, flags, _ = socket.recv_fds(self.control, TEMPLATE_MESSAGE_MAX, MAX_FDS)
            except ConnectionError:
                return 0
            if not data:
                return 0  # the host closed the control socket: the template is done
            try:
                request = json.loads(data)
                if request.get("op") != "fork":
                    raise ValueError(f"unknown op {request.get('op')!r}")
                if flags & socket.MSG_CTRUNC:  # some descriptors were dropped: which is which is unknown
                    raise ValueError(f"more than {MAX_FDS} descriptors sent")
                self.fork(request, fds)
            except (ValueError, TypeError, OSError) as exc:
                self.send({"op": "failed", "id": str(locals().get("request", {}).get("id")), "error": str(exc)})
            finally:
                for fd in fds:
                    os.close(fd)


def main(argv: list[str]) -> None:
    """``--control FD --seccomp FD|-- --runtime NAME``: preload, then serve the control socket."""
    args = dict(zip(argv[::2], argv[1::2], strict=True))
    control = socket.socket(fileno=int(args["--control"]))
    program = b""
    if args.get("--seccomp", "-") != "-":
        with open(int(args["--seccomp"]), "rb") as f:
            program = f.read()
    runtime = args.get("--runtime")
    if runtime in agent_main.RUNTIMES:  # what a machine of this runtime imports at Init, imported once here
        import importlib

        importlib.import_module(f"nimbus.agent.{agent_main.RUNTIMES[runtime]}")
    # Children share the template's heap copy-on-write; a collection in one would walk (and so copy)
    # every object. Frozen objects are never scanned: measured here, a child's first millisecond of
    # work went from 3.0 to 1.2 ms.
    gc.freeze()
    sys.exit(Template(control, program).serve())
