"""The guest's /sbin/init: PID 1 of a Firecracker microVM, whose one real job is the agent.

Why an init at all: the kernel starts exactly one process and gives it duties no ordinary program
does. It must mount the pseudo file systems everything else assumes (/proc, /sys, /dev) and the
writable scratch space a function gets (tmpfs on /tmp and /var/task); bring up ``lo``; reap every
orphan (a handler's double-forked grandchild is reparented to PID 1, and unreaped it stays a zombie
for the life of the VM); and handle signals, since the kernel delivers none to PID 1 it has no
handler for. Above all PID 1 must never simply exit: the kernel panics instead, and a VM whose agent
has ended would otherwise sit there. So when the agent exits, init stops what is left, syncs and
powers the machine off, which makes Firecracker exit and lets the host see the machine is gone. Any
setup failure is logged to the console (stderr) and also ends in a power-off, never in a hang.

Command line (flags first, the agent's own arguments after ``--``)::

    init [--no-mounts] [--no-poweroff] [--report-pid] [--tmp-size SIZE] [--task-size SIZE] [--layer DEVICE]
         [-- AGENT ARGS]

``--layer /dev/vdb`` mounts that block device (an ext4 image of the function's dependency layer, which
the Firecracker driver attaches as a second, read-only drive) read-only, nosuid and nodev at
``/opt/layer``. The kernel hands init every word after ``--`` on its command line, so the driver puts
the flag there. Without ``--`` the agent gets ``--vsock-port 9999 --task-dir /var/task``. ``--no-mounts`` skips the
privileged setup (mounts and ``lo``) and ``--no-poweroff`` makes init exit with the agent's status
instead of powering off, so the reaping and signal duties can be exercised without a VM.

Tested in ``tests/integration/test_guest_init.py`` as PID 1 of a bwrap pid namespace (``--as-pid-1``),
the agent talking over an inherited socketpair; it is booted for real only on KVM hosts.

Stdlib only; like the agent it imports nothing of nimbus but the agent itself (after the fork).
"""

import ctypes
import errno
import importlib
import os
import signal
import sys
import time

from nimbus.agent import isolation
from nimbus.agent.contract import LAYER_DIR, TASK_DIR, TASK_DIR_MB, VSOCK_PORT

DEFAULT_AGENT_ARGS = ("--vsock-port", str(VSOCK_PORT), "--task-dir", TASK_DIR)
DEFAULT_TMP_SIZE = "512m"  # Lambda's /tmp default; tmpfs only takes memory for what is written
DEFAULT_TASK_SIZE = f"{TASK_DIR_MB}m"
DEFAULT_STOP_GRACE_S = 5.0  # how long the agent, then the leftovers, get between SIGTERM and SIGKILL
REAP_POLL_S = 0.02
EXIT_USAGE = 64  # sysexits' EX_USAGE
EXIT_SETUP = 71  # a mount, lo or the fork failed (EX_OSERR)
USAGE = ("usage: init [--no-mounts] [--no-poweroff] [--report-pid] [--tmp-size SIZE] [--task-size SIZE]"
         " [--layer DEVICE] [-- AGENT ARGS]")

# <sys/mount.h>, <sys/reboot.h>, <sys/prctl.h>
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 0x1, 0x2, 0x4, 0x8
RB_POWER_OFF = 0x4321FEDC
RB_AUTOBOOT = 0x01234567  # a "reboot": Firecracker exits on it too (i8042 reset) where power-off is unsupported
RB_DISABLE_CAD = 0  # Ctrl-Alt-Del (Firecracker's SendCtrlAltDel) then sends SIGINT to init instead of rebooting
PR_SET_CHILD_SUBREAPER = 36
FORWARDED = (signal.SIGTERM, signal.SIGINT)

# (source, target, fstype, flags, data); the tmpfs sizes are filled in from the options.
MOUNTS = (
    ("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, ""),
    ("sysfs", "/sys", "sysfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, ""),
    ("devtmpfs", "/dev", "devtmpfs", MS_NOSUID, "mode=0755"),
    ("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777,size={tmp_size}"),
    ("tmpfs", "/var/task", "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755,size={task_size}"),
)


class SetupError(Exception):
    """A step before the agent could start failed; init logs it and powers off."""


class Options:
    """The parsed command line."""

    __slots__ = ("mounts", "poweroff", "report_pid", "tmp_size", "task_size", "layer", "agent_args")

    def __init__(self) -> None:
        self.mounts = True
        self.poweroff = True
        self.report_pid = False
        self.tmp_size = DEFAULT_TMP_SIZE
        self.task_size = DEFAULT_TASK_SIZE
        self.layer: str | None = None  # a block device to mount read-only at LAYER_DIR
        self.agent_args = list(DEFAULT_AGENT_ARGS)


def _valid_size(value: str) -> bool:
    """A tmpfs ``size=``: digits with an optional k/m/g suffix, or a percentage of RAM."""
    digits = value[:-1] if value[-1:].lower() in ("k", "m", "g", "%") else value
    return digits.isascii() and digits.isdigit()


def parse_args(argv: list[str]) -> Options:
    """Parse by hand (argparse is slow to import, and this runs on every boot). ValueError on misuse."""
    options = Options()
    args = list(argv)
    while args:
        arg = args.pop(0)
        if arg == "--":
            options.agent_args = args
            break
        name, eq, value = arg.partition("=")
        if name == "--no-mounts" and not eq:
            options.mounts = False
        elif name == "--no-poweroff" and not eq:
            options.poweroff = False
        elif name == "--report-pid" and not eq:
            options.report_pid = True
        elif name in ("--layer", "--tmp-size", "--task-size") and not eq:
            if not args:
                raise ValueError(f"{name} needs a value")
            args.insert(0, f"{name}={args.pop(0)}")  # parsed as the --name=value form, next round
        elif name == "--layer":
            if not value.startswith("/dev/") or "/../" in value or "\0" in value:
                raise ValueError(f"--layer must name a device under /dev, not {value!r}")
            options.layer = value
        elif name in ("--tmp-size", "--task-size"):
            if not _valid_size(value):
                raise ValueError(f"{name} must be a size such as 64m, 1g or 50%, not {value!r}")
            if name == "--tmp-size":
                options.tmp_size = value
            else:
                options.task_size = value
        else:
            raise ValueError(f"unknown argument {arg!r}")
    return options


def log(message: str) -> None:
    """One line on the console: at boot it is the only place anyone can read what went wrong."""
    try:
        os.write(2, f"nimbus-init: {message}\n".encode(errors="replace"))
    except OSError:
        pass  # no console at all: nothing better to do


def _libc():
    return ctypes.CDLL(None, use_errno=True)


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def mount_all(options: Options) -> None:
    """Mount the pseudo file systems and the two tmpfs; something already mounted there is fine."""
    libc = _libc()
    for source, target, fstype, flags, data in MOUNTS:
        data = data.format(tmp_size=options.tmp_size, task_size=options.task_size)
        try:
            os.makedirs(target, exist_ok=True)
            result = libc.mount(source.encode(), target.encode(), fstype.encode(), flags, data.encode() or None)
            if result != 0 and ctypes.get_errno() == errno.EBUSY:
                continue  # the kernel (CONFIG_DEVTMPFS_MOUNT) or the image mounted it already
            _check(result, f"mount {fstype} on {target}")
        except OSError as exc:
            raise SetupError(f"cannot mount {fstype} on {target}: {exc.strerror or exc}") from None


def mount_layer(device: str, target: str = LAYER_DIR) -> None:
    """Mount the function's dependency layer read-only: code in the machine may read it, never change it."""
    libc = _libc()
    try:
        os.makedirs(target, exist_ok=True)
        _check(libc.mount(device.encode(), target.encode(), b"ext4", MS_RDONLY | MS_NOSUID | MS_NODEV, None),
               f"mount {device} on {target}")
    except OSError as exc:
        raise SetupError(f"cannot mount the layer {device} on {target}: {exc.strerror or exc}") from None


def ensure_stdio() -> None:
    """Give fds 0-2 a home: booted without /dev/console in the image, the kernel leaves them closed,
    and the agent's channel must not end up on fd 1 where a print would write into it."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            for path in ("/dev/console", "/dev/null"):
                try:
                    opened = os.open(path, os.O_RDWR | os.O_NOCTTY)
                except OSError:
                    continue
                if opened != fd:
                    os.dup2(opened, fd)
                    os.close(opened)
                break


def loopback_up() -> None:
    """``lo`` up (:func:`nimbus.agent.isolation.loopback_up`): a function may talk to itself, and a
    ``provided`` bootstrap reaches the Runtime API on 127.0.0.1."""
    try:
        isolation.loopback_up()
    except OSError as exc:
        raise SetupError(f"cannot bring up lo: {exc}") from None


def power_off() -> None:
    """Sync and power off; should the kernel refuse, fall back to a reboot (Firecracker exits on both).

    Only ever as PID 1: run by mistake as root on a host, anything else would power the host off. (PID 1
    of a pid namespace is safe: there reboot(2) ends the namespace, not the machine.)
    """
    if os.getpid() != 1:
        log("not PID 1: exiting instead of powering off")
        return
    os.sync()
    libc = _libc()
    for command, name in ((RB_POWER_OFF, "power off"), (RB_AUTOBOOT, "reboot")):
        if libc.reboot(command) != 0:
            log(f"cannot {name}: {os.strerror(ctypes.get_errno())}")


class Init:
    """Starts the agent, reaps every child, forwards the stop signals, and says how it all ended."""

    def __init__(self, options: Options, grace_s: float = DEFAULT_STOP_GRACE_S) -> None:
        self.options = options
        self.grace_s = grace_s
        self.agent_pid: int | None = None
        self.stop_signal: int | None = None  # the signal someone asked us to stop with
        self.pending: list[int] = []  # signals that came before the agent existed

    # ------------------------------------------------------------------ signals

    def install_signals(self) -> None:
        for signum in FORWARDED:
            signal.signal(signum, self.on_stop_signal)
        signal.signal(signal.SIGALRM, self.on_grace_over)

    def on_stop_signal(self, signum: int, frame) -> None:
        """Pass SIGTERM/SIGINT to the agent, and give it a bounded time to end."""
        if self.stop_signal is None:
            self.stop_signal = signum
        if self.agent_pid is None:
            self.pending.append(signum)
            return
        log(f"forwarding {signal.Signals(signum).name} to the agent (pid {self.agent_pid})")
        self._signal_agent(signum)
        signal.setitimer(signal.ITIMER_REAL, self.grace_s)

    def on_grace_over(self, signum: int, frame) -> None:
        if self.agent_pid is not None:
            log(f"the agent did not stop within {self.grace_s:g}s: killing it")
            self._signal_agent(signal.SIGKILL)

    def _signal_agent(self, signum: int) -> None:
        try:
            os.kill(self.agent_pid, signum)
        except ProcessLookupError:
            pass  # exited already; the reaping loop will see it

    # ------------------------------------------------------------------ the agent and its reaping

    def start_agent(self) -> None:
        """Fork the agent, with the stop signals blocked so none lands between fork and handlers."""
        blocked = set(FORWARDED)
        signal.pthread_sigmask(signal.SIG_BLOCK, blocked)
        try:
            pid = os.fork()
        except OSError as exc:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, blocked)
            raise SetupError(f"cannot fork the agent: {exc}") from None
        if pid == 0:
            self._run_agent(blocked)  # never returns
        self.agent_pid = pid
        signal.pthread_sigmask(signal.SIG_UNBLOCK, blocked)
        for signum in self.pending:
            self.on_stop_signal(signum, None)
        self.pending.clear()

    def _run_agent(self, blocked: set) -> None:
        status = 70  # EX_SOFTWARE: the agent failed to import or crashed past its own handler
        try:
            for signum in (*FORWARDED, signal.SIGALRM):
                signal.signal(signum, signal.SIG_DFL)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, blocked)
            from nimbus.agent import main as agent_main

            agent_main.main(self.options.agent_args)
            status = 0
        except SystemExit as exc:
            status = exc.code if isinstance(exc.code, int) else 1
        except BaseException:
            import traceback

            log(f"the agent crashed:\n{traceback.format_exc()}")
        finally:
            os._exit(status)

    def reap_until_agent_exits(self) -> int:
        """Reap every child (orphans included) until the agent is one of them; its wait status."""
        while True:
            pid, status = os.waitpid(-1, 0)  # EINTR is retried after the signal handler ran (PEP 475)
            if pid == self.agent_pid:
                self.agent_pid = None
                signal.setitimer(signal.ITIMER_REAL, 0)
                return status

    def stop_the_rest(self) -> None:
        """SIGTERM what is left, SIGKILL it after the grace period, and reap until no child remains."""
        if self._leftovers(signal.SIGTERM):
            deadline = time.monotonic() + self.grace_s
            while time.monotonic() < deadline:
                if not self._reap_ready():
                    return
                time.sleep(REAP_POLL_S)
            log("processes left after the agent did not stop: killing them")
            self._leftovers(signal.SIGKILL)
        while True:
            try:
                os.waitpid(-1, 0)
            except ChildProcessError:
                return

    def _reap_ready(self) -> bool:
        """Reap whatever has exited; False once there are no children at all."""
        while True:
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return False
            if pid == 0:
                return True

    def _leftovers(self, signum: int) -> bool:
        """Signal every process left; True if there may be some. As PID 1 that is everyone in the
        namespace (kill(-1) spares init itself); otherwise only our own children, never the caller's."""
        if os.getpid() == 1:
            try:
                os.kill(-1, signum)
            except ProcessLookupError:
                return False
            return True
        found = False
        me = str(os.getpid())
        for name in os.listdir("/proc"):
            if not name.isdigit():
                continue
            try:
                with open(f"/proc/{name}/stat", "rb") as file:
                    stat = file.read().decode(errors="replace")
                if stat.rsplit(")", 1)[1].split()[1] == me:
                    os.kill(int(name), signum)
                    found = True
            except (OSError, IndexError):
                continue  # gone meanwhile
        return found

    def exit_code(self, status: int) -> int:
        """The agent's exit code; a stop we were asked for counts as clean, other deaths as 128+signal."""
        if os.WIFEXITED(status):
            return os.WEXITSTATUS(status)
        signum = os.WTERMSIG(status)
        if signum == self.stop_signal:
            return 0
        return 128 + signum


def _describe(status: int) -> str:
    if os.WIFEXITED(status):
        return f"exited with status {os.WEXITSTATUS(status)}"
    return f"was killed by {signal.Signals(os.WTERMSIG(status)).name}"


def _finish(poweroff: bool, code: int) -> None:
    """Power off (the normal end of a VM), or with --no-poweroff exit with ``code``."""
    if poweroff:
        power_off()
    os._exit(code)  # reached when power-off is disabled, or the kernel refused it


def main(argv: list[str] | None = None) -> None:
    """Run as the guest's init until the agent exits; then power off (or exit, with --no-poweroff)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        options = parse_args(argv)
    except ValueError as exc:
        log(f"{exc}\n{USAGE}")
        # Cannot trust the parse, but --no-poweroff before any "--" still means "this is a test".
        flags = argv[:argv.index("--")] if "--" in argv else argv
        _finish("--no-poweroff" not in flags, EXIT_USAGE)
    if options.report_pid:
        log(f"running as pid {os.getpid()}")
    try:
        # Now, before the mounts below: they may cover where it lives (a tmpfs over /tmp), and the forked
        # agent then starts with it imported.
        importlib.import_module("nimbus.agent.main")
    except ImportError as exc:
        log(f"cannot import the agent: {exc}")
        _finish(options.poweroff, EXIT_SETUP)
    init = Init(options)
    init.install_signals()
    try:
        if options.mounts:
            mount_all(options)
            ensure_stdio()
            loopback_up()
        if options.layer is not None:
            mount_layer(options.layer)
        if options.poweroff and os.getpid() == 1:
            if _libc().reboot(RB_DISABLE_CAD) != 0:
                log(f"cannot take Ctrl-Alt-Del as SIGINT: {os.strerror(ctypes.get_errno())}")
        if os.getpid() != 1:
            # Not the namespace's init (a plain run): still collect the orphans below us.
            _libc().prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
        init.start_agent()
    except SetupError as exc:
        log(f"{exc}; giving up")
        _finish(options.poweroff, EXIT_SETUP)
    status = init.reap_until_agent_exits()
    log(f"the agent {_describe(status)}")
    init.stop_the_rest()
    code = init.exit_code(status)
    if options.poweroff:
        log("powering off")
    _finish(options.poweroff, code)

