"""What a child of a fork server does to become a machine of its own, shared by both kinds of server.

A runtime's template (:mod:`nimbus.agent.template`) and a function template (:mod:`nimbus.agent.forks`)
both answer fork requests on a control socket (:class:`Template`, the loop) and each child they fork
isolates itself with the same steps: join the machine's cgroup and close what it was not sent
(:func:`enter_child`), a fresh ``/proc`` and scratch file systems in new namespaces, loopback up, the
seccomp filter, an init that reaps orphans. Only what differs (privileged namespaces and ``/var/task``
for the first, a user namespace for the second) lives in each module. Stdlib only: this runs in machines.
"""

import ctypes
import fcntl
import json
import os
import signal
import socket
import struct

from nimbus.agent.contract import PROC_HIDDEN, TEMPLATE_MESSAGE_MAX

CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
NAMESPACES = CLONE_NEWNS | CLONE_NEWCGROUP | CLONE_NEWUTS | CLONE_NEWIPC | CLONE_NEWPID | CLONE_NEWNET
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 16384, 1 << 18
PR_SET_PDEATHSIG = 1
PR_SET_SECCOMP = 22
PR_SET_NO_NEW_PRIVS = 38
SECCOMP_MODE_FILTER = 2
SIOCGIFFLAGS, SIOCSIFFLAGS = 0x8913, 0x8914
IFF_UP = 0x1
IFREQ = "16sH22x"  # struct ifreq: the name, then ifr_flags in a 24-byte union (40 bytes in all)
PROC_READ_ONLY = ("sys", "sysrq-trigger", "irq", "bus")  # as bwrap's --proc leaves them
MAX_FDS = 8
CHANNEL_FD_MIN = 10
EXIT_SETUP = 71  # a child could not isolate itself (EX_OSERR); the reason is on its output


libc = ctypes.CDLL(None, use_errno=True)


def check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")



def mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    def enc(s: str | None) -> bytes | None:
        return None if s is None else s.encode()

    check(libc.mount(enc(source), target.encode(), enc(fstype), ctypes.c_ulong(flags), enc(data)),
           f"mount {target}")



def prctl(option: int, arg: int) -> None:
    check(libc.prctl(option, ctypes.c_ulong(arg), 0, 0, 0), f"prctl {option}")



class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]



def install_seccomp(program: bytes) -> None:
    """Load the node's seccomp BPF program (an array of 8-byte ``sock_filter``) on this process."""
    if not program:
        return
    buffer = ctypes.create_string_buffer(program, len(program))
    fprog = _SockFprog(len(program) // 8, ctypes.cast(buffer, ctypes.c_void_p))
    check(libc.prctl(PR_SET_SECCOMP, ctypes.c_ulong(SECCOMP_MODE_FILTER), ctypes.byref(fprog), 0, 0),
           "installing the seccomp filter")



def exit_status(status: int) -> int:
    """A wait status as the exit code bwrap would give: the code, or 128 + the signal."""
    if os.WIFSIGNALED(status):
        return 128 + os.WTERMSIG(status)
    return os.waitstatus_to_exitcode(status)



def bind_read_only(source: str, target: str) -> None:
    mount(source, target, None, MS_BIND | MS_REC)
    mount(None, target, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC)



def fresh_proc() -> None:
    """A /proc of this pid namespace, with the kernel's files hidden or read-only as bwrap leaves them."""
    mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    for name in PROC_READ_ONLY:
        path = f"/proc/{name}"
        if os.path.exists(path):
            bind_read_only(path, path)
    for name in PROC_HIDDEN:
        path = f"/proc/{name}"
        if os.path.exists(path):
            bind_read_only("/dev/null", path)



def fresh_scratch(tmp_bytes: int, uid: int) -> None:
    """This machine's own /dev/pts, /tmp and /dev/shm, owned by ``uid``.

    bwrap's /dev has its own devpts, the template's: one per child, or a pty opened by one function
    could be opened by its siblings. /dev/ptmx points into it.
    """
    mount("devpts", "/dev/pts", "devpts", MS_NOSUID | MS_NOEXEC, "newinstance,ptmxmode=0666,mode=620")
    tmp = f"size={tmp_bytes},mode=1777,uid={uid},gid={uid}"
    mount("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, tmp)
    mount("tmpfs", "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV, tmp)



def loopback_up() -> None:
    """``ip link set lo up``, by ioctl, in this network namespace (a new one's ``lo`` is down).

    Every machine needs it, not only for functions that talk to themselves: a ``provided`` function's
    bootstrap reaches the agent's Runtime API on 127.0.0.1. Shared by template children, function
    template forks and a Firecracker guest's init (which has no iproute2). Needs CAP_NET_ADMIN in the
    namespace: call it before privileges are dropped. Raises OSError.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        flags = struct.unpack(IFREQ, fcntl.ioctl(sock, SIOCGIFFLAGS, struct.pack(IFREQ, b"lo", 0)))[1]
        if not flags & IFF_UP:
            fcntl.ioctl(sock, SIOCSIFFLAGS, struct.pack(IFREQ, b"lo", flags | IFF_UP))



def enter_child(fds: list[int], channel: int, output: int, joins: list[int], parent_pid: int,
                blank_others: bool = False) -> int:
    """The start of step 1, shared with a function template's forks; returns where the channel now is.

    Dies with the parent, a new session, every descriptor closed but ``fds``, the channel moved up, the
    machine's cgroup joined through ``joins`` (closed after), and stdout and stderr sent to ``output``.

    ``blank_others`` (a fork of a function template): the others are not closed but replaced with
    /dev/null. The function's module may have kept some (a file, a socket, an event loop's epoll): their
    numbers stay taken, so what it kept fails cleanly instead of reaching whatever opens that number next.
    """
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_SETMASK, ())  # the template blocks SIGCHLD around fork()
    prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent_pid:  # the parent died before the line above
        os._exit(EXIT_SETUP)
    os.setsid()
    keep = sorted(set(fds))
    if blank_others:
        null = os.open("/dev/null", os.O_RDWR)
        for fd in sorted({int(name) for name in os.listdir("/proc/self/fd")} - set(keep) - {null}):
            os.dup2(null, fd)  # closes what was there, in one step
        os.close(null)
    else:
        low = 0
        for fd in keep:  # closes the control socket among others: a machine cannot ask for forks
            os.closerange(low, fd)
            low = fd + 1
        os.closerange(low, 1 << 16)
    # The channel where a booted agent finds it: above the low fds the agent itself opens (its
    # copy of stderr lands on 3, which functions may close; the channel must not be that one).
    moved = fcntl.fcntl(channel, fcntl.F_DUPFD, CHANNEL_FD_MIN)
    os.close(channel)
    for fd in joins:
        try:
            os.write(fd, b"0")  # moves this (single-threaded) process into the machine's cgroup
        except OSError as exc:
            raise OSError(exc.errno, f"joining the machine's cgroup: {exc.strerror}") from None
        os.close(fd)
    os.dup2(output, 1)
    os.dup2(output, 2)
    return moved



def wait_for(child: int) -> None:
    """Step 1's end: wait for the machine's init and exit as it did. Never returns."""
    _, status = os.waitpid(child, 0)
    os._exit(exit_status(status))



def stdin_null() -> None:
    null = os.open("/dev/null", os.O_RDONLY)  # lands on 0, which step 1 closed
    if null != 0:
        os.dup2(null, 0)
        os.close(null)



def reap_until(agent: int) -> None:
    """An init's work: reap orphans, and end with the agent. Never returns."""
    while True:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            os._exit(EXIT_SETUP)
        if pid == agent:
            os._exit(exit_status(status))



def report_setup_failure(fd: int, exc: BaseException) -> None:
    try:
        import traceback

        where = "".join(traceback.format_exception(exc, limit=-2))
        os.write(fd, f"nimbus-template: machine setup failed: {exc}\n{where}".encode(errors="replace"))
    finally:
        os._exit(EXIT_SETUP)



class Template:
    """The template's own loop: answer fork requests, report the machines that end.

    ``child(template, request, fds)`` runs in each forked child and never returns: a new machine of a
    runtime's template (:mod:`nimbus.agent.template`), or a fork of a loaded function
    (:mod:`nimbus.agent.forks`). ``program`` is the node's seccomp filter; ``snapshot_program`` that of a
    machine that will become a function template.
    """

    def __init__(self, control: socket.socket, program: bytes, child, snapshot_program: bytes = b"",
                 fds_needed: int = 2) -> None:
        self.control = control
        self.program = program
        self.snapshot_program = snapshot_program
        self.child = child
        self.fds_needed = fds_needed
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
        needed = self.fds_needed + bool(request.get("layer")) + bool(request.get("snapshot"))
        if len(fds) < needed:
            self.send({"op": "failed", "id": machine_id,
                       "error": f"{len(fds)} descriptors sent, {needed} or more needed"})
            return
        # SIGCHLD waits until the child is on record, or a machine that dies at once would go unreported.
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD})
        try:
            pid = os.fork()
            if pid == 0:
                self.child(self, request, fds)
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

