"""The seccomp filter: what it denies, what it must keep working, and that the build sandbox runs under it.

The filter is loaded for real (libseccomp through pyseccomp) in a child process, which then tries each
call; nothing here is mocked. The last test runs a job in the real bwrap build sandbox.
"""

import json
import os
import platform
import subprocess
import sys
import textwrap

import pytest

from nimbus.machines import seccomp

pytestmark = pytest.mark.skipif(not seccomp.describe()[0], reason=f"no libseccomp here: {seccomp.describe()[1]}")

# Runs in a child: loads the filter, then reports how each call ends (an errno name, or "ok").
UNDER_FILTER = textwrap.dedent("""
    import ctypes, errno, json, os, subprocess, sys, threading
    from nimbus.machines import seccomp
    seccomp.build().load()
    libc = ctypes.CDLL(None, use_errno=True)
    def sc(nr, *args):
        ctypes.set_errno(0)
        r = libc.syscall(ctypes.c_long(nr), *[ctypes.c_long(a) for a in args])
        return "ok" if r >= 0 else errno.errorcode[ctypes.get_errno()]
    out = {
        "unshare_user": sc(272, 0x10000000),
        "unshare_net": sc(272, 0x40000000),
        "setns": sc(308, 0, 0),
        "mount": sc(165, 0, 0, 0, 0, 0),
        "umount2": sc(166, 0, 0),
        "pivot_root": sc(155, 0, 0),
        "ptrace": sc(101, 0, 0, 0, 0),
        "process_vm_writev": sc(311, 1, 0, 0, 0, 0, 0),
        "keyctl": sc(250, 0, 0, 0, 0, 0),
        "request_key": sc(249, 0, 0, 0, 0),
        "bpf": sc(321, 0, 0, 0),
        "perf_event_open": sc(298, 0, 0, 0, 0, 0),
        "userfaultfd": sc(323, 0),
        "kexec_file_load": sc(320, 0, 0, 0, 0, 0),
        "finit_module": sc(313, 0, 0, 0),
        "delete_module": sc(176, 0, 0),
        "reboot": sc(169, 0, 0, 0, 0),
        "swapoff": sc(168, 0),
        "open_by_handle_at": sc(304, 0, 0, 0),
        "iopl": sc(172, 3),
        "io_uring_setup": sc(425, 1, 0),
        "clone_newpid": sc(56, 0x20000000 | 17, 0, 0, 0, 0),
        "clone_newnet": sc(56, 0x40000000 | 17, 0, 0, 0, 0),
        "clone_newcgroup": sc(56, 0x02000000 | 17, 0, 0, 0, 0),
        "clone3": sc(435, 0, 0),
        "getpid": sc(39),
    }
    pid = os.fork()
    if pid == 0:
        os._exit(5)
    out["fork"] = os.waitpid(pid, 0)[1] >> 8
    box = []
    t = threading.Thread(target=lambda: box.append(1)); t.start(); t.join()
    out["thread"] = box == [1]
    out["subprocess"] = subprocess.run(["/bin/sh", "-c", "echo hi"], capture_output=True, text=True).stdout
    wanted = ("Seccomp:", "NoNewPrivs:")
    out["status"] = [l.split(":")[1].strip() for l in open("/proc/self/status") if l.startswith(wanted)]
    print(json.dumps(out))
""")


def run_under_filter() -> dict:
    done = subprocess.run([sys.executable, "-c", UNDER_FILTER], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.mark.skipif(platform.machine() != "x86_64", reason="the syscall numbers are x86_64's")
def test_the_filter_denies_what_a_function_has_no_business_calling():
    out = run_under_filter()
    denied = [name for name in out if name not in ("clone3", "getpid", "fork", "thread", "subprocess", "status")]
    for name in denied:
        assert out[name] == "EPERM", (name, out[name])
    assert out["clone3"] == "ENOSYS"  # libc, Go and libuv then fall back to clone, whose flags it can read


@pytest.mark.skipif(platform.machine() != "x86_64", reason="the syscall numbers are x86_64's")
def test_ordinary_processes_threads_and_subprocesses_still_work():
    out = run_under_filter()
    assert out["getpid"] == "ok" and out["fork"] == 5 and out["thread"] is True and out["subprocess"] == "hi\n"
    assert out["status"] == ["1", "2"]  # NoNewPrivs set, seccomp in filter mode


def test_the_program_is_exported_once_and_each_reader_gets_all_of_it(tmp_path):
    first = seccomp.program_file(tmp_path)
    stamp = first.stat().st_mtime_ns
    assert seccomp.program_file(tmp_path) == first and first.stat().st_mtime_ns == stamp
    data = first.read_bytes()
    assert data == seccomp.program() and len(data) % 8 == 0  # struct sock_filter: 8 bytes each
    one, two = seccomp.open_program(first), seccomp.open_program(first)
    try:
        assert os.read(one, len(data) + 1) == data
        assert os.read(two, len(data) + 1) == data  # its own offset: bwrap reads each to the end
        assert os.get_inheritable(one)
    finally:
        os.close(one)
        os.close(two)


def test_a_damaged_program_file_is_rewritten(tmp_path):
    path = seccomp.program_file(tmp_path)
    path.write_bytes(b"garbage")
    assert seccomp.program_file(tmp_path).read_bytes() == seccomp.program()


def test_every_denied_name_is_known_to_libseccomp():
    """A typo in the deny list would silently deny nothing."""
    import pyseccomp

    for name in seccomp.DENIED:
        known = any(pyseccomp.resolve_syscall(arch, name) != -1
                    for arch in (pyseccomp.Arch.X86_64, pyseccomp.Arch.X86, pyseccomp.Arch.AARCH64,
                                 pyseccomp.Arch.ARM))
        assert known, name


def test_doctor_line_says_what_is_denied():
    ok, detail = seccomp.describe()
    assert ok and "EPERM" in detail and "clone3" in detail and "BPF instructions" in detail


@pytest.mark.sandbox
async def test_build_jobs_run_under_the_filter(tmp_path):
    from nimbus.compiler.base import Job
    from nimbus.compiler.sandbox import SandboxBuilder

    builder = SandboxBuilder(tmp_path / "home", timeout_s=60)
    ok, why = builder.available()
    if not ok:
        pytest.skip(why)
    probe = ("import ctypes, json; libc = ctypes.CDLL(None, use_errno=True);"
             "s = dict(l.split(':', 1) for l in open('/proc/self/status').read().splitlines());"
             "print(json.dumps([libc.unshare(0x10000000), ctypes.get_errno(), s['Seccomp'].strip(),"
             " s['NoNewPrivs'].strip(), sorted(__import__('os').listdir('/proc/self/fd'))]))")
    job = Job(runtime="test", tool="/usr/bin/python3", args=("-I", "-S", "-c", probe), timeout_s=60)
    try:
        result = await builder.run(job)
    finally:
        await builder.close()
    assert result.status == 0, result.output
    rc, err, mode, nnp, fds = json.loads(result.output.strip().splitlines()[-1])
    assert (rc, err, mode, nnp) == (-1, 1, "2", "1"), result.output  # unshare: EPERM
    assert str(9) not in fds  # bwrap read the program and closed its descriptor
    assert builder.enforcement["syscalls"] == "seccomp filter"


SOCKETS_UNDER_FILTER = textwrap.dedent("""
    import ctypes, errno, json, socket
    from nimbus.machines import seccomp
    seccomp.build().load()
    libc = ctypes.CDLL(None, use_errno=True)
    def sc(nr, *args):
        ctypes.set_errno(0)
        r = libc.syscall(ctypes.c_long(nr), *[ctypes.c_long(a) for a in args])
        return "ok" if r >= 0 else errno.errorcode[ctypes.get_errno()]
    # socket(family, SOCK_STREAM|SOCK_DGRAM, proto); socketpair; personality
    out = {f"socket {family}": sc(41, family, 1 if family != 16 else 3, 0) for family in (0, 1, 2, 10, 16, 17, 38, 40, 45, 63, 64, 1000)}
    out["netlink audit"] = sc(41, 16, 3, 9)
    out["socketpair unix"] = "ok" if socket.socketpair() else "?"
    out["socketpair vsock"] = sc(53, 40, 1, 0, 0)
    out["personality query"] = sc(135, 0xFFFFFFFF)
    out["personality set"] = sc(135, 0x0040000)
    print(json.dumps(out))
""")


@pytest.mark.skipif(platform.machine() != "x86_64", reason="the syscall numbers are x86_64's")
def test_f12_only_unix_inet_and_route_netlink_sockets_and_no_personality_changes():
    done = subprocess.run([sys.executable, "-c", SOCKETS_UNDER_FILTER], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    allowed = {"socket 1", "socket 2", "socket 10", "socket 16", "socketpair unix", "personality query"}
    for name, how in out.items():
        if name in allowed:
            assert how == "ok", (name, how)
        elif name.startswith("personality"):
            assert how == "EPERM", (name, how)
        else:
            assert how == "EAFNOSUPPORT", (name, how)
