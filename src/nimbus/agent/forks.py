"""A function template: a machine that has run ``Init``, forked into each new machine of its version.

A runtime template (:mod:`nimbus.agent.template`) saves a cold start the interpreter and the agent's
imports; the function's own imports (FastAPI, pydantic, pandas...) are still paid by every machine at
``Init``. A function template pays them once: it is an ordinary machine of the version, made with a fork
control socket, that loaded the code and was then told ``snapshot``. From then on it runs no call; it
answers fork requests on that socket, in the runtime template's messages, and each child becomes a new,
already-initialised machine (Lambda's SnapStart, as a ``fork``).

The template runs the function's module code, so it holds no privilege, and a child of it must still get
namespaces of its own. It makes them inside a user namespace of its own (the one way to do it without
privilege), then gives up everything it gained:

1. (child K1) dies with the template, a new session, every descriptor but the ones it was sent replaced
   with /dev/null (the template's channel, its control socket, its log pipe and whatever its module opened),
   the fork's cgroup joined through descriptors the host opened (before anything else runs, so the fork
   and all it starts are counted against its own limits), then new user, pid, mount, network, IPC, UTS
   and cgroup namespaces, its uid and gid mapped to themselves. K1 stays behind only to wait.
2. (K2, pid 1 of the new pid namespace) mounts made private; a fresh ``/proc`` of its own pid namespace
   (with the kernel's files hidden as in every machine; the kernel allows the mount because the
   template's machine keeps one clean ``/proc`` where its uid cannot reach it:
   :func:`nimbus.agent.template._hidden_proc`),
   its own ``/dev/pts``, and fresh ``/tmp`` and ``/dev/shm`` (which also cover that clean ``/proc``);
   loopback up in its empty network namespace. ``/var/task`` is the template's: read-only since before
   any function code ran, so no fork can leave anything there for another.
3. (K3, the agent) every capability set emptied (bounding, ambient, inheritable, permitted, effective),
   not dumpable (from step 1 on), the node's own seccomp filter installed on top of the template's (which allowed the
   ``unshare`` and ``mount`` of steps 1-2, and nothing may allow them again), ``random`` (and numpy's
   global generator) reseeded, a new asyncio event loop if the module set one, new log capture, then the
   agent serves the fork's own channel with the function already loaded.

What does carry over is what the function computed at import: every fork of a version starts from the
same module state, secrets read at import included, as on SnapStart. ``os.urandom``, ``uuid.uuid4`` and
``secrets`` read the kernel and differ per fork. What the module opened does not carry over: step 1
puts /dev/null in place of every descriptor but the fork's own, so a connection made at import must be
made again (as after a SnapStart restore).
"""

import gc
import os
import signal
import socket
import sys

from nimbus.agent import isolation as iso
from nimbus.agent import privileges

CLONE_NEWUSER = 0x10000000
PR_SET_DUMPABLE = 4


def _map_ids(uid: int, gid: int) -> None:
    """Map this process's uid and gid to themselves in the user namespace it just made."""
    with open("/proc/self/setgroups", "w") as f:
        f.write("deny")  # the kernel's rule before an unprivileged gid_map: no setgroups in here
    with open("/proc/self/uid_map", "w") as f:
        f.write(f"{uid} {uid} 1")
    with open("/proc/self/gid_map", "w") as f:
        f.write(f"{gid} {gid} 1")


def _fresh_event_loop() -> None:
    """Give the fork a new asyncio event loop if its module set one at import (Mangum does).

    The template's loop polls an epoll descriptor the fork no longer has (it is /dev/null here).
    """
    asyncio = sys.modules.get("asyncio")
    if asyncio is None:
        return
    local = getattr(asyncio.get_event_loop_policy(), "_local", None)
    old = getattr(local, "_loop", None) if local is not None else None
    if local is not None and old is None:
        return  # none was set: the first call makes its own, as in any machine
    asyncio.set_event_loop(asyncio.new_event_loop())
    if old is not None and not old.is_running():
        try:
            old.close()
        except Exception:  # its descriptors are /dev/null: nothing of value is lost
            pass


def _reseed() -> None:
    """Forks of one template would otherwise draw the same "random" numbers from the copied state."""
    if "random" in sys.modules:
        sys.modules["random"].seed()
    numpy_random = sys.modules.get("numpy.random")
    if numpy_random is not None:
        try:
            numpy_random.seed()
        except Exception:  # a numpy without the legacy global generator: nothing was copied to reseed
            pass


def _fork(agent, template: iso.Template, request: dict, fds: list[int]) -> None:
    """Run in K1, just forked from the function template: steps 1-3 above. Never returns."""
    channel, output, *joins = fds
    uid, gid = os.getuid(), os.getgid()
    try:
        channel = iso.enter_child(fds, channel, output, joins, template.pid, blank_others=True)
        # Not dumpable (it changed uid), a process's /proc files are root's: the maps could not be written.
        iso.prctl(PR_SET_DUMPABLE, 1)
        iso.check(iso.libc.unshare(CLONE_NEWUSER | iso.NAMESPACES), "unshare")
        _map_ids(uid, gid)
        # Not dumpable again, for K1 and all it forks: K1 and K2 hold this namespace's capabilities, and a
        # process of the template's uid must not reach their memory through /proc/<pid>/mem.
        iso.prctl(PR_SET_DUMPABLE, 0)
    except BaseException as exc:
        iso.report_setup_failure(output, exc)
    init = os.fork()
    if init:
        os.close(channel)
        os.close(output)
        iso.wait_for(init)
    try:  # K2: pid 1 here
        iso.prctl(iso.PR_SET_PDEATHSIG, signal.SIGKILL)
        iso.mount(None, "/", None, iso.MS_REC | iso.MS_PRIVATE)
        iso.fresh_proc()
        iso.fresh_scratch(int(request["tmp_bytes"]), uid)
        iso.loopback_up()
        iso.stdin_null()
        os.close(output)
    except BaseException as exc:
        iso.report_setup_failure(2, exc)
    pid = os.fork()
    if pid == 0:
        try:
            iso.prctl(iso.PR_SET_PDEATHSIG, signal.SIGKILL)
            privileges.clear()
            iso.install_seccomp(template.program)
            _reseed()
            _fresh_event_loop()
        except BaseException as exc:
            iso.report_setup_failure(2, exc)
        agent.resume(channel)  # never returns
    os.close(channel)
    iso.reap_until(pid)


def serve(agent, control_fd: int, program: bytes) -> None:
    """Become the function template: answer fork requests on ``control_fd`` until the host closes it.

    ``program``: the node's seccomp filter, installed in each fork. Never returns.
    """
    # Forks share this heap copy-on-write; a collection in one would walk (and so copy) all of it.
    gc.collect()
    gc.freeze()
    control = socket.socket(fileno=control_fd)
    server = iso.Template(control, program, lambda t, request, fds: _fork(agent, t, request, fds))
    status = server.serve()
    os._exit(status)
