"""Whether KVM is *usable* on this host: what ``nimbus doctor`` reports for the firecracker driver.

Opening ``/dev/kvm`` proves little: a nested host may expose a KVM that creates VMs but never runs a
vCPU, or (PVM, the ``kvm_pvm`` backend) runs vCPUs but only PVM-aware guest kernels, so stock
Firecracker guest kernels hang early. ``probe()`` therefore goes all the way: KVM_CREATE_VM, a
4 KiB guest memory slot holding ``mov al, 0x42; out 0x10, al; hlt`` in real mode, KVM_CREATE_VCPU,
KVM_RUN, and expects an IO exit on port 0x10 carrying 0x42, then a HLT exit.

KVM_RUN can hang (or take the process down) on a broken nested host, so the probe runs in a child
process (``python -m nimbus.machines.firecracker.kvm``) that reports its progress as JSON lines on stdout; the
parent kills it after ``timeout_s``. Stdlib only (fcntl ioctls, mmap, ctypes), x86_64 layouts.

PVM is recognised by the ``kvm_pvm`` module in ``/sys/module`` (present whether built in or loaded;
it only exists when the PVM backend provides /dev/kvm); supporting evidence, reported in the detail:
``nested_pvm=1`` on the kernel command line and no ``vmx``/``svm`` flag in ``/proc/cpuinfo``.
"""

from __future__ import annotations

import ctypes
import fcntl
import json
import mmap
import os
import selectors
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

DEFAULT_DEVICE = "/dev/kvm"
KVM_API_VERSION = 12

# --- ioctl numbers (asm-generic/ioctl.h: dir << 30 | size << 16 | type << 8 | nr) -------------------
_IOC_NONE, _IOC_WRITE, _IOC_READ = 0, 1, 2
KVMIO = 0xAE


def _ioc(direction: int, nr: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (KVMIO << 8) | nr


def _io(nr: int) -> int:
    return _ioc(_IOC_NONE, nr, 0)


def _ior(nr: int, struct: type) -> int:
    return _ioc(_IOC_READ, nr, ctypes.sizeof(struct))


def _iow(nr: int, struct: type) -> int:
    return _ioc(_IOC_WRITE, nr, ctypes.sizeof(struct))


# --- structures (linux/kvm.h, arch/x86/include/uapi/asm/kvm.h) ----------------------------------------
class KvmUserspaceMemoryRegion(ctypes.Structure):
    _fields_ = [("slot", ctypes.c_uint32), ("flags", ctypes.c_uint32), ("guest_phys_addr", ctypes.c_uint64),
                ("memory_size", ctypes.c_uint64), ("userspace_addr", ctypes.c_uint64)]


class KvmRegs(ctypes.Structure):
    _fields_ = [(name, ctypes.c_uint64) for name in (
        "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
        "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15", "rip", "rflags")]


class KvmSegment(ctypes.Structure):
    _fields_ = [("base", ctypes.c_uint64), ("limit", ctypes.c_uint32), ("selector", ctypes.c_uint16),
                *((name, ctypes.c_uint8) for name in (
                    "type", "present", "dpl", "db", "s", "l", "g", "avl", "unusable", "padding"))]


class KvmDtable(ctypes.Structure):
    _fields_ = [("base", ctypes.c_uint64), ("limit", ctypes.c_uint16), ("padding", ctypes.c_uint16 * 3)]


class KvmSregs(ctypes.Structure):
    _fields_ = [*((name, KvmSegment) for name in ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt")),
                ("gdt", KvmDtable), ("idt", KvmDtable),
                *((name, ctypes.c_uint64) for name in ("cr0", "cr2", "cr3", "cr4", "cr8", "efer", "apic_base")),
                ("interrupt_bitmap", ctypes.c_uint64 * 4)]


class KvmRunIo(ctypes.Structure):
    _fields_ = [("direction", ctypes.c_uint8), ("size", ctypes.c_uint8), ("port", ctypes.c_uint16),
                ("count", ctypes.c_uint32), ("data_offset", ctypes.c_uint64)]


class KvmRunHead(ctypes.Structure):
    """The head of ``struct kvm_run`` (the mmap'd page is larger; the exit union starts at 32)."""

    _fields_ = [("request_interrupt_window", ctypes.c_uint8), ("immediate_exit", ctypes.c_uint8),
                ("padding1", ctypes.c_uint8 * 6), ("exit_reason", ctypes.c_uint32),
                ("ready_for_interrupt_injection", ctypes.c_uint8), ("if_flag", ctypes.c_uint8),
                ("flags", ctypes.c_uint16), ("cr8", ctypes.c_uint64), ("apic_base", ctypes.c_uint64),
                ("exit", ctypes.c_uint64 * 4)]  # union head: io / fail_entry / internal...


KVM_GET_API_VERSION = _io(0x00)       # 0xAE00
KVM_CREATE_VM = _io(0x01)             # 0xAE01
KVM_CHECK_EXTENSION = _io(0x03)       # 0xAE03
KVM_GET_VCPU_MMAP_SIZE = _io(0x04)    # 0xAE04
KVM_CREATE_VCPU = _io(0x41)           # 0xAE41
KVM_SET_USER_MEMORY_REGION = _iow(0x46, KvmUserspaceMemoryRegion)  # 0x4020AE46
KVM_RUN = _io(0x80)                   # 0xAE80
KVM_GET_REGS = _ior(0x81, KvmRegs)    # 0x8090AE81
KVM_SET_REGS = _iow(0x82, KvmRegs)    # 0x4090AE82
KVM_GET_SREGS = _ior(0x83, KvmSregs)  # 0x8138AE83
KVM_SET_SREGS = _iow(0x84, KvmSregs)  # 0x4138AE84

KVM_EXIT_NAMES = {0: "UNKNOWN", 1: "EXCEPTION", 2: "IO", 3: "HYPERCALL", 4: "DEBUG", 5: "HLT", 6: "MMIO",
                  7: "IRQ_WINDOW_OPEN", 8: "SHUTDOWN", 9: "FAIL_ENTRY", 10: "INTR", 17: "INTERNAL_ERROR"}
KVM_EXIT_IO, KVM_EXIT_HLT = 2, 5
KVM_EXIT_IO_OUT = 1

GUEST_ADDR = 0x1000
GUEST_MEM = 0x1000
GUEST_PORT, GUEST_VALUE = 0x10, 0x42
GUEST_CODE = bytes([0xB0, GUEST_VALUE,   # mov al, 0x42
                    0xE6, GUEST_PORT,    # out 0x10, al
                    0xF4])               # hlt

HANG_HINT = "a nested/PVM host that cannot run this guest?"


@dataclass(frozen=True)
class KvmReport:
    usable: bool            # the test guest ran: KVM works on this host
    api_version: int | None
    detail: str
    pvm: bool               # /dev/kvm is PVM's (kvm_pvm): only PVM-aware guest kernels boot
    ran_guest: bool

    @property
    def firecracker_ok(self) -> bool:
        """Usable for the firecracker driver: a stock guest kernel would boot here."""
        return self.usable and not self.pvm


# --- PVM detection ------------------------------------------------------------------------------------
def detect_pvm(sys_module: str = "/sys/module", cmdline: str = "/proc/cmdline",
               cpuinfo: str = "/proc/cpuinfo") -> tuple[bool, list[str]]:
    """(is PVM, evidence). The decision is the ``kvm_pvm`` module; the rest is evidence for the detail."""
    evidence: list[str] = []
    pvm = Path(sys_module, "kvm_pvm").is_dir()
    if pvm:
        evidence.append("kvm_pvm module present")
    try:
        if "nested_pvm=1" in Path(cmdline).read_text().split():
            evidence.append("nested_pvm=1 on the kernel command line")
    except OSError:
        pass
    try:
        flags: set[str] = set()
        for line in Path(cpuinfo).read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
        if flags and not flags & {"vmx", "svm"}:
            evidence.append("no vmx/svm CPU flag" + (" (a VM itself)" if "hypervisor" in flags else ""))
    except OSError:
        pass
    return pvm, evidence


# --- the child: the actual ioctls ---------------------------------------------------------------------
def _emit(**record: object) -> None:
    sys.stdout.write(json.dumps(record) + "\n")
    sys.stdout.flush()


def _ioctl_int(fd: int, request: int, arg: int = 0) -> int:
    return fcntl.ioctl(fd, request, arg)


def run_guest(device: str = DEFAULT_DEVICE, stall_s: float = 0.0) -> None:
    """In the child: every step, reported as ``{"stage": ...}``; ends with ``{"result": ...}``.

    ``stall_s`` (a test hook) sleeps at the KVM_RUN stage, as a hanging KVM_RUN would.
    """
    fds: list[int] = []
    stage = "open"
    try:
        _emit(stage=stage)
        kvm = os.open(device, os.O_RDWR | os.O_CLOEXEC)
        fds.append(kvm)
        stage = "KVM_GET_API_VERSION"
        _emit(stage=stage)
        api = _ioctl_int(kvm, KVM_GET_API_VERSION)
        _emit(api_version=api)
        if api != KVM_API_VERSION:
            _emit(result={"ok": False, "error": f"KVM API version {api}, expected {KVM_API_VERSION}"})
            return
        stage = "KVM_CREATE_VM"
        _emit(stage=stage)
        vm = _ioctl_int(kvm, KVM_CREATE_VM, 0)
        fds.append(vm)

        stage = "KVM_SET_USER_MEMORY_REGION"
        _emit(stage=stage)
        mem = mmap.mmap(-1, GUEST_MEM, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS,
                        prot=mmap.PROT_READ | mmap.PROT_WRITE)
        mem[:len(GUEST_CODE)] = GUEST_CODE
        mem_addr = ctypes.addressof(ctypes.c_char.from_buffer(mem))
        region = KvmUserspaceMemoryRegion(slot=0, flags=0, guest_phys_addr=GUEST_ADDR,
                                          memory_size=GUEST_MEM, userspace_addr=mem_addr)
        fcntl.ioctl(vm, KVM_SET_USER_MEMORY_REGION, region)

        stage = "KVM_CREATE_VCPU"
        _emit(stage=stage)
        vcpu = _ioctl_int(vm, KVM_CREATE_VCPU, 0)
        fds.append(vcpu)
        stage = "KVM_GET_VCPU_MMAP_SIZE"
        run_size = _ioctl_int(kvm, KVM_GET_VCPU_MMAP_SIZE)
        run_map = mmap.mmap(vcpu, run_size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        run = KvmRunHead.from_buffer(run_map)

        stage = "KVM_SET_SREGS"
        _emit(stage=stage)
        sregs = KvmSregs()
        fcntl.ioctl(vcpu, KVM_GET_SREGS, sregs)
        sregs.cs.base, sregs.cs.selector = 0, 0
        fcntl.ioctl(vcpu, KVM_SET_SREGS, sregs)
        stage = "KVM_SET_REGS"
        regs = KvmRegs(rip=GUEST_ADDR, rflags=0x2)
        fcntl.ioctl(vcpu, KVM_SET_REGS, regs)

        stage = "KVM_RUN"
        exits: list[str] = []
        for _ in range(2):
            _emit(stage=stage)
            if stall_s:
                time.sleep(stall_s)
            _ioctl_int(vcpu, KVM_RUN, 0)
            reason = run.exit_reason
            exits.append(KVM_EXIT_NAMES.get(reason, str(reason)))
            if reason == KVM_EXIT_IO:
                io = KvmRunIo.from_buffer(run_map, 32)
                value = run_map[io.data_offset] if io.data_offset < run_size else None
                if (io.direction, io.port, io.size, value) != (KVM_EXIT_IO_OUT, GUEST_PORT, 1, GUEST_VALUE):
                    _emit(result={"ok": False, "exits": exits,
                                  "error": f"unexpected IO exit: direction {io.direction} port {io.port:#x} "
                                           f"size {io.size} data {value}"})
                    return
                continue
            if reason == KVM_EXIT_HLT and exits == ["IO", "HLT"]:
                _emit(result={"ok": True, "exits": exits})
                return
            extra = f" (hardware reason {run.exit[0]:#x})" if reason in (9, 17) else ""
            _emit(result={"ok": False, "exits": exits,
                          "error": f"unexpected exit KVM_EXIT_{exits[-1]}{extra}, expected IO then HLT"})
            return
        _emit(result={"ok": False, "exits": exits, "error": "the guest did not halt after its IO"})
    except OSError as exc:
        _emit(result={"ok": False, "stage": stage, "errno": exc.errno,
                      "error": f"{stage}: {exc.strerror or exc}"})
    except Exception as exc:  # report, whatever happened: the parent turns it into the detail
        _emit(result={"ok": False, "stage": stage, "error": f"{stage}: {type(exc).__name__}: {exc}"})
    finally:
        for fd in reversed(fds):
            try:
                os.close(fd)
            except OSError:
                pass


# --- the parent ---------------------------------------------------------------------------------------
def _child_argv(device: str, stall_s: float) -> list[str]:
    argv = [sys.executable, "-m", "nimbus.machines.firecracker.kvm", "--device", device]
    return argv + (["--stall", str(stall_s)] if stall_s else [])


def _run_child(argv: list[str], timeout_s: float) -> tuple[list[dict], list[str], int | None]:
    """(JSON records, other output lines, exit code or None when killed at the deadline)."""
    env = dict(os.environ)
    src = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env=env, close_fds=True)
    assert proc.stdout is not None
    buf = b""
    deadline = time.monotonic() + timeout_s
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        eof = False
        while not eof:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            for _key, _ in sel.select(left):
                chunk = os.read(proc.stdout.fileno(), 65536)
                if not chunk:
                    eof = True
                buf += chunk
    code: int | None
    if eof:
        try:
            code = proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            code = None
    else:
        code = None
    if code is None:
        proc.kill()
        try:
            proc.wait(timeout=2)
        except subprocess.TimeoutExpired:
            pass  # stuck in the kernel (D state): abandon it rather than hang the caller
    proc.stdout.close()
    records, other = [], []
    for line in buf.decode(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if isinstance(record, dict):
            records.append(record)
        elif line.strip():
            other.append(line.strip())
    return records, other, code


def probe(timeout_s: float = 5.0, device: str = DEFAULT_DEVICE, *, stall_s: float = 0.0,
          sys_module: str = "/sys/module") -> KvmReport:
    """Whether KVM at ``device`` runs a real-mode test guest, within ``timeout_s`` whatever happens."""
    pvm, evidence = detect_pvm(sys_module)
    def report(usable: bool, api: int | None, detail: str, ran: bool = False) -> KvmReport:
        if pvm:
            detail = (f"PVM nested KVM (kvm_pvm): {detail}; but only PVM-aware guest kernels boot on it, stock "
                      "Firecracker guest kernels hang early, so the firecracker driver cannot run here "
                      f"(evidence: {', '.join(evidence)})")
        return KvmReport(usable=usable, api_version=api, detail=detail, pvm=pvm, ran_guest=ran)

    path = Path(device)
    if not path.exists():
        return report(False, None, f"{device} missing (no KVM: the firecracker driver cannot run here)")
    if not path.is_char_device():
        return report(False, None, f"{device} is not a character device (not a KVM device node: "
                                   "the firecracker driver cannot run here)")
    try:
        os.close(os.open(device, os.O_RDWR | os.O_CLOEXEC))
    except PermissionError:
        return report(False, None, f"no permission to open {device} (add the node's user to the kvm group)")
    except OSError as exc:
        return report(False, None, f"{device} does not open read-write: {exc.strerror or exc}")

    records, other, code = _run_child(_child_argv(device, stall_s), timeout_s)
    api = next((r["api_version"] for r in records if "api_version" in r), None)
    stages = [r["stage"] for r in records if "stage" in r]
    result = next((r["result"] for r in records if "result" in r), None)
    stage = stages[-1] if stages else "start"
    if result is None:
        if code is None:
            what = "KVM_RUN" if stage == "KVM_RUN" else f"the probe (at {stage})"
            return report(False, api, f"{what} did not return within {timeout_s:g} s ({HANG_HINT})")
        how = f"signal {-code}" if code < 0 else f"exit {code}"
        tail = f": {other[-1]}" if other else ""
        return report(False, api, f"the probe died ({how}) at {stage}{tail} ({HANG_HINT})")
    if result.get("ok"):
        return report(True, api, f"KVM usable: ran a real-mode test guest (API {api})", ran=True)
    if result.get("errno") == 25 and result.get("stage") == "KVM_GET_API_VERSION":  # ENOTTY
        return report(False, None, f"{device} is not a KVM device (KVM_GET_API_VERSION: not supported)")
    return report(False, api, f"KVM does not run a test guest: {result.get('error')}",
                  ran=False)


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m nimbus.machines.firecracker.kvm",
                                     description="probe KVM (child mode with --device; --report for a summary)")
    parser.add_argument("--device", default=None)
    parser.add_argument("--stall", type=float, default=0.0, help=argparse.SUPPRESS)
    parser.add_argument("--timeout", type=float, default=5.0)
    args = parser.parse_args(argv)
    if args.device is not None:  # child mode: the parent reads JSON lines
        run_guest(args.device, args.stall)
        return 0
    print(json.dumps(asdict(probe(args.timeout)), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
