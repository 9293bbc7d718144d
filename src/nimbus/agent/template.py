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
"tmp_bytes", "task_bytes", "rlimits": [[name, value], …], "layer": true, "snapshot": true}`` (the last
two optional) with the descriptors channel, output, one cgroup join file per controller, then (with
``"layer"``) the detached layer mount, then (with ``"snapshot"``) the control socket of a machine that
will become a function template (:mod:`nimbus.agent.forks`), whose forks are asked for in the same
messages. Template → host: ``{"op": "ready"}`` once,
``{"op": "forked", "id"}`` or ``{"op": "failed", "id", "error"}`` per fork, and
``{"op": "exited", "id", "status"}`` when a machine ends (a negative status: killed by that signal).
"""

import fcntl
import gc
import os
import resource
import signal
import socket
import sys

from nimbus.agent import forks, privileges
from nimbus.agent import main as agent_main
from nimbus.agent.contract import LAYER_DIR, SANDBOX_ENV, TASK_DIR
from nimbus.agent.isolation import (
    MS_BIND,
    MS_NODEV,
    MS_NOEXEC,
    MS_NOSUID,
    MS_PRIVATE,
    MS_RDONLY,
    MS_REC,
    MS_REMOUNT,
    NAMESPACES,
    PR_SET_NO_NEW_PRIVS,
    PR_SET_PDEATHSIG,
    Template,
    bind_read_only,
    check,
    enter_child,
    fresh_proc,
    fresh_scratch,
    install_seccomp,
    libc,
    loopback_up,
    mount,
    prctl,
    reap_until,
    report_setup_failure,
    stdin_null,
    wait_for,
)

SYS_MOVE_MOUNT = 429  # the same number on every architecture but alpha
AT_FDCWD = -100
MOVE_MOUNT_F_EMPTY_PATH = 0x4
MNT_DETACH = 2
ETC_FILES = ("passwd", "group")  # the machine's own, naming its uid; sent with the fork request
HIDDEN_PROC_PARENT = "/tmp/.nimbus"  # a function template's clean /proc (see _hidden_proc)
HIDDEN_PROC = f"{HIDDEN_PROC_PARENT}/proc"


def _attach(fd: int, target: str) -> None:
    """Attach the detached mount ``fd`` (an ``open_tree`` clone) at ``target`` in this mount namespace."""
    check(libc.syscall(SYS_MOVE_MOUNT, fd, b"", AT_FDCWD, target.encode(), MOVE_MOUNT_F_EMPTY_PATH),
           f"move_mount {target}")


def _own_etc_files(request: dict) -> None:
    """Bind the machine's own passwd and group (naming its uid) over the template's, read-only.

    They are written to a scratch tmpfs on /var/task, which is then detached (the binds keep their files)
    before the real /var/task is mounted: nothing of them stays reachable but the two read-only files.
    """
    files = request.get("etc") or {}
    if not files:
        return
    mount("tmpfs", TASK_DIR, "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, "size=65536,mode=0755")
    for name in ETC_FILES:
        text = files.get(name)
        if not isinstance(text, str):
            continue
        scratch = f"{TASK_DIR}/{name}"
        with open(scratch, "w") as f:
            f.write(text)
        os.chmod(scratch, 0o644)
        bind_read_only(scratch, f"/etc/{name}")
    check(libc.umount2(TASK_DIR.encode(), MNT_DETACH), f"umount {TASK_DIR}")


def _fresh_filesystems(request: dict, layer: int | None) -> None:
    """Step 2: this mount namespace's own /proc, /dev/pts, /tmp, /dev/shm and /var/task, and its layer.

    ``layer``: the detached read-only mount of the function's layer, attached at /opt/layer and closed.
    The tmpfs dirs belong to the machine's uid; its passwd and group name that uid.
    """
    mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing below propagates back to the template
    fresh_proc()
    _own_etc_files(request)
    uid = int(request["uid"])
    fresh_scratch(int(request["tmp_bytes"]), uid)
    mount("tmpfs", TASK_DIR, "tmpfs", MS_NOSUID | MS_NODEV,
           f"size={int(request['task_bytes'])},mode=1777,uid={uid},gid={uid}")
    if layer is not None:
        _attach(layer, LAYER_DIR)  # after "/" went private: the mount stays in this namespace
        os.close(layer)
    if request.get("snapshot"):
        _hidden_proc()


def _hidden_proc() -> None:
    """A second /proc with nothing mounted over it, where nothing unprivileged can reach it.

    A function template's forks (:mod:`nimbus.agent.forks`) mount a /proc of their own pid namespace from
    inside a user namespace, which the kernel allows only while some /proc of the mount namespace is fully
    visible (``mount_too_revealing``); the machine's own has files hidden under binds. This one sits in a
    root-owned 0700 directory the machine's uid cannot enter, and each fork mounts its /tmp over it.
    """
    os.mkdir(HIDDEN_PROC_PARENT, 0o700)
    os.mkdir(HIDDEN_PROC)
    mount("proc", HIDDEN_PROC, "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)


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
            mount(None, TASK_DIR, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)
            answer = agent_main.SEAL_DONE
        except OSError as exc:
            answer = str(exc).encode(errors="replace")[:200]
        try:
            os.write(fd, answer)
        except OSError:
            pass
    os.close(fd)


def _become_agent(request: dict, channel: int, template: "Template", seal: int, fork_control: int | None) -> None:
    """Step 3: drop to the sandbox user, install the filter, and run the agent (never returns).

    ``fork_control``: a function template's fork control socket (:mod:`nimbus.agent.forks`); such a
    machine runs under the snapshot filter, which also allows what its forks need to isolate themselves,
    and keeps the node's filter to install in each fork.
    """
    for name, value in request.get("rlimits", ()):
        resource.setrlimit(getattr(resource, name), (value, value))
    uid = int(request["uid"])
    privileges.drop(uid, uid)  # the machine's own uid; no capability left in any set
    prctl(PR_SET_NO_NEW_PRIVS, 1)  # bwrap set it already; a filter without it would need privilege
    install_seccomp(template.program if fork_control is None else template.snapshot_program)
    os.environ.clear()
    os.environ.update(SANDBOX_ENV)
    os.chdir(TASK_DIR)
    sys.argv = ["-c", "--fd", str(channel), "--task-dir", TASK_DIR, "--seal-fd", str(seal)]
    if fork_control is not None:
        sys.argv += ["--fork-fd", str(fork_control)]
    agent_main.main(sys.argv[1:], fork_program=template.program, fork_server=forks.serve)


def _machine(template: "Template", request: dict, fds: list[int]) -> None:
    """Run in C1, just forked: isolate, then become the machine's init and agent. Never returns."""
    channel, output, *joins = fds
    fork_control = joins.pop() if request.get("snapshot") else None
    layer = joins.pop() if request.get("layer") else None
    try:
        channel = enter_child(fds, channel, output, joins, template.pid)
        check(libc.unshare(NAMESPACES), "unshare")
    except BaseException as exc:
        report_setup_failure(output, exc)
    init = os.fork()
    if init:
        for fd in (channel, output, layer, fork_control):
            if fd is not None:
                os.close(fd)
        wait_for(init)
    try:  # C2: pid 1 here
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        _fresh_filesystems(request, layer)
        loopback_up()
        stdin_null()
        os.close(output)
    except BaseException as exc:
        report_setup_failure(2, exc)
    init_end, agent_end = (end.detach() for end in socket.socketpair())
    agent = os.fork()
    if agent == 0:
        try:
            prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
            os.close(init_end)
            # Above the channel, out of the way of the low fds the agent opens itself.
            seal = fcntl.fcntl(agent_end, fcntl.F_DUPFD_CLOEXEC, channel + 1)
            os.close(agent_end)
            _become_agent(request, channel, template, seal, fork_control)
        except BaseException as exc:
            report_setup_failure(2, exc)
    os.close(channel)
    os.close(agent_end)
    if fork_control is not None:
        os.close(fork_control)
    _serve_seal(init_end)
    reap_until(agent)


def _read_program(arg: str | None) -> bytes:
    if arg in (None, "-"):
        return b""
    with open(int(arg), "rb") as f:
        return f.read()


def main(argv: list[str]) -> None:
    """``--control FD --seccomp FD|- [--seccomp-snapshot FD|-] --runtime NAME``: preload, then serve.

    ``--seccomp-snapshot``: the filter of function templates (:func:`nimbus.machines.seccomp.build` with
    ``snapshot=True``); without it, no machine of this template can become one.
    """
    args = dict(zip(argv[::2], argv[1::2], strict=True))
    control = socket.socket(fileno=int(args["--control"]))
    program = _read_program(args.get("--seccomp"))
    snapshot_program = _read_program(args.get("--seccomp-snapshot"))
    runtime = args.get("--runtime")
    if runtime in agent_main.RUNTIMES:  # what a machine of this runtime imports at Init, imported once here
        import importlib

        importlib.import_module(f"nimbus.agent.{agent_main.RUNTIMES[runtime]}")
    # Children share the template's heap copy-on-write; a collection in one would walk (and so copy)
    # every object. Frozen objects are never scanned: measured here, a child's first millisecond of
    # work went from 3.0 to 1.2 ms.
    gc.freeze()
    sys.exit(Template(control, program, _machine, snapshot_program).serve())
