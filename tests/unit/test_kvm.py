"""The KVM probe behind ``nimbus doctor``: ioctl layouts, the real probe on this host, and its failure paths."""

from __future__ import annotations

import ctypes
import os
import sys
from pathlib import Path

import pytest

from nimbus.machines.firecracker import kvm

pytestmark = pytest.mark.firecracker

HOST_IS_PVM = Path("/sys/module/kvm_pvm").is_dir()
HAVE_KVM = os.path.exists("/dev/kvm") and os.access("/dev/kvm", os.R_OK | os.W_OK)


def _size_field(request: int) -> int:
    return (request >> 16) & 0x3FFF


def test_struct_sizes_match_the_ioctl_size_fields():
    assert ctypes.sizeof(kvm.KvmSegment) == 24
    assert ctypes.sizeof(kvm.KvmDtable) == 16
    assert ctypes.sizeof(kvm.KvmRegs) == 18 * 8 == _size_field(kvm.KVM_GET_REGS) == _size_field(kvm.KVM_SET_REGS)
    assert ctypes.sizeof(kvm.KvmSregs) == 312 == _size_field(kvm.KVM_GET_SREGS) == _size_field(kvm.KVM_SET_SREGS)
    assert ctypes.sizeof(kvm.KvmUserspaceMemoryRegion) == 32 == _size_field(kvm.KVM_SET_USER_MEMORY_REGION)
    assert ctypes.sizeof(kvm.KvmRunIo) == 16
    assert kvm.KvmRunHead.exit.offset == 32
    # the values linux/kvm.h gives for x86_64
    assert (kvm.KVM_GET_API_VERSION, kvm.KVM_CREATE_VM, kvm.KVM_GET_VCPU_MMAP_SIZE, kvm.KVM_CREATE_VCPU,
            kvm.KVM_RUN) == (0xAE00, 0xAE01, 0xAE04, 0xAE41, 0xAE80)
    assert (kvm.KVM_SET_USER_MEMORY_REGION, kvm.KVM_GET_REGS, kvm.KVM_SET_REGS, kvm.KVM_GET_SREGS,
            kvm.KVM_SET_SREGS) == (0x4020AE46, 0x8090AE81, 0x4090AE82, 0x8138AE83, 0x4138AE84)


def test_real_probe_reports_this_host():
    report = kvm.probe(timeout_s=10)
    assert isinstance(report, kvm.KvmReport)
    assert report.detail
    assert report.pvm == HOST_IS_PVM
    if HOST_IS_PVM:
        assert report.detail.startswith("PVM nested KVM (kvm_pvm)")
        assert not report.firecracker_ok
    if report.ran_guest:  # the kernel accepted every ioctl number, so the layouts are the kernel's
        assert report.usable and report.api_version == kvm.KVM_API_VERSION
        assert "ran a real-mode test guest (API 12)" in report.detail
    if not HAVE_KVM:
        assert not report.usable


def test_missing_device(tmp_path):
    report = kvm.probe(timeout_s=5, device=str(tmp_path / "kvm"))
    assert not report.usable and not report.ran_guest and report.api_version is None
    assert "missing (no KVM: the firecracker driver cannot run here)" in report.detail


def test_regular_file_is_not_a_kvm_device(tmp_path):
    fake = tmp_path / "kvm"
    fake.write_bytes(b"")
    report = kvm.probe(timeout_s=5, device=str(fake))
    assert not report.usable and not report.ran_guest
    assert "is not a character device" in report.detail


def test_child_on_a_non_kvm_device_reports_the_ioctl_error(capsys):
    kvm.run_guest("/dev/null")
    out = capsys.readouterr().out
    assert '"stage": "KVM_GET_API_VERSION"' in out and '"ok": false' in out


def test_non_kvm_character_device_is_a_clear_error():
    report = kvm.probe(timeout_s=5, device="/dev/null")
    assert not report.usable and not report.ran_guest
    assert "/dev/null is not a KVM device" in report.detail


def test_no_permission(tmp_path, monkeypatch):
    def deny(*_args, **_kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(kvm.os, "open", deny)
    report = kvm.probe(timeout_s=5, device="/dev/null")
    assert not report.usable
    assert "no permission to open /dev/null (add the node's user to the kvm group)" in report.detail


@pytest.mark.skipif(not HAVE_KVM, reason="the stall hook sits at KVM_RUN, which needs a working /dev/kvm")
def test_a_hanging_kvm_run_is_killed_and_reported():
    report = kvm.probe(timeout_s=1, stall_s=60)
    assert not report.usable and not report.ran_guest
    assert "KVM_RUN did not return within 1 s (a nested/PVM host that cannot run this guest?)" in report.detail


def test_a_hanging_child_is_killed_whatever_the_stage():
    records, _other, code = kvm._run_child([sys.executable, "-c", "import time; print('{\"stage\": \"x\"}', "
                                                             "flush=True); time.sleep(60)"], timeout_s=1)
    assert code is None and records == [{"stage": "x"}]


def test_detect_pvm_reads_sys_module(tmp_path):
    (tmp_path / "kvm_pvm").mkdir()
    cmdline = tmp_path / "cmdline"
    cmdline.write_text("quiet nested_pvm=1\n")
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("flags\t\t: fpu hypervisor lm\n")
    pvm, evidence = kvm.detect_pvm(str(tmp_path), str(cmdline), str(cpuinfo))
    assert pvm and "kvm_pvm module present" in evidence and "nested_pvm=1 on the kernel command line" in evidence
    (tmp_path / "kvm_pvm").rmdir()
    cpuinfo.write_text("flags\t\t: fpu vmx lm\n")
    pvm, evidence = kvm.detect_pvm(str(tmp_path), str(tmp_path / "none"), str(cpuinfo))
    assert not pvm and evidence == []
