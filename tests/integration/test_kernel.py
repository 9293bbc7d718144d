"""Guest kernels (``nimbus.machines.firecracker.kernel``): registering a vmlinux, and the build from linux-source.

A real kernel build takes tens of minutes, so the pipeline (unpack with tar, ``make olddefconfig``,
``make -jN vmlinux``, ``make kernelversion``, copy out, cache, resume after a failure) runs here on a
stand-in source tarball made by the test: its Makefile has those targets and "builds" a vmlinux by
copying an ELF executable of this host. It is a stand-in for the kernel tree only; every command runs
for real. ``NIMBUS_TEST_KERNEL_BUILD=1`` runs the real build from Debian's linux-source with
Firecracker's reference configuration.
"""

from __future__ import annotations

import os
import shutil
import sys
import tarfile
from pathlib import Path

import pytest
from typer.testing import CliRunner

from firecracker_spec import spec_dir
from nimbus.cli import app
from nimbus.machines.firecracker import kernel

pytestmark = pytest.mark.firecracker

REFERENCE_CONFIG = "microvm-kernel-ci-x86_64-6.1.config"
GOOD_CONFIG = "".join(f"{option}=y\n" for option in kernel.REQUIRED_OPTIONS) + "# CONFIG_MODULES is not set\n"
# A stand-in kernel tree's Makefile: the targets build_kernel runs, each leaving a trace of its run.
STANDIN_MAKEFILE = """\
olddefconfig:
\techo "olddefconfig ran" >> steps.log
\techo "CONFIG_ADDED_BY_OLDDEFCONFIG=y" >> .config

vmlinux:
\techo "vmlinux $(MAKEFLAGS)" >> steps.log
\ttest -z "$(FAIL)" || exit 7
\t@echo "  LD      vmlinux"
\tcp {elf} vmlinux

kernelversion:
\t@echo 6.1.999
"""


def _elf64(banner: bytes = b"") -> bytes:
    """The first bytes of an x86-64 ELF64 executable header, then ``banner``."""
    header = bytearray(64)
    header[:4] = b"\x7fELF"
    header[4], header[5], header[6] = 2, 1, 1  # 64-bit, little-endian, version 1
    header[16:18] = (2).to_bytes(2, "little")  # ET_EXEC
    header[18:20] = (0x3E).to_bytes(2, "little")  # EM_X86_64
    return bytes(header) + b"\0" * 448 + banner


def _host_elf() -> Path:
    path = Path(os.path.realpath(sys.executable))
    kernel.check_vmlinux(path)  # the test's premise: this host's interpreter is an x86-64 ELF
    return path


def _standin_source(tmp_path: Path, name: str = "linux-source-6.1.tar.xz", fail: bool = False) -> Path:
    tree = tmp_path / "src-tree" / "linux-source-6.1"
    tree.mkdir(parents=True)
    makefile = STANDIN_MAKEFILE.format(elf=_host_elf())
    if fail:
        makefile = makefile.replace('test -z "$(FAIL)"', "false")
    (tree / "Makefile").write_text(makefile)
    tarball = tmp_path / name
    with tarfile.open(tarball, "w:xz") as archive:
        archive.add(tree, arcname="linux-source-6.1")
    return tarball


@pytest.fixture
def config(tmp_path) -> Path:
    path = tmp_path / "microvm.config"
    path.write_text(GOOD_CONFIG)
    return path


@pytest.fixture
def build_tools(monkeypatch):
    """Only what the stand-in build runs (no compiler needed); skips where even make is absent."""
    if shutil.which("make") is None or shutil.which("xz") is None:
        pytest.skip("make and xz are needed to run the stand-in kernel build")
    monkeypatch.setattr(kernel, "BUILD_TOOLS", {"make": "make", "tar": "tar", "xz": "xz-utils"})


def test_commands():
    assert kernel.build_commands(3) == [["make", "olddefconfig"], ["make", "-j3", "vmlinux"]]
    assert kernel.unpack_command(Path("/usr/src/linux-source-6.1.tar.xz"), Path("/h/t")) == [
        "tar", "-xJf", "/usr/src/linux-source-6.1.tar.xz", "-C", "/h/t", "--strip-components=1"]


def test_reference_config_is_accepted():
    reference = spec_dir() / REFERENCE_CONFIG
    if not reference.is_file():
        pytest.skip(f"Firecracker's reference kernel configuration is not at {reference}")
    assert kernel.read_config(reference) == reference.read_bytes()
    assert kernel.missing_options(reference.read_text()) == []


def test_config_lacking_what_a_guest_needs_is_refused(tmp_path):
    path = tmp_path / "bad.config"
    text = GOOD_CONFIG.replace("CONFIG_VIRTIO_VSOCKETS=y", "CONFIG_VIRTIO_VSOCKETS=m")
    path.write_text(text.replace("CONFIG_EXT4_FS=y\n", "# CONFIG_EXT4_FS is not set\n"))
    with pytest.raises(kernel.KernelError, match="not set to y: CONFIG_EXT4_FS, CONFIG_VIRTIO_VSOCKETS"):
        kernel.read_config(path)
    with pytest.raises(kernel.KernelError, match="cannot read the kernel configuration"):
        kernel.read_config(tmp_path / "absent.config")


def test_build_hash_covers_tarball_and_config(tmp_path):
    tarball = tmp_path / "linux-source-6.1.tar.xz"
    tarball.write_bytes(b"x" * 100)
    first = kernel.build_hash(tarball, b"CONFIG_A=y\n")
    assert len(first) == 64 and kernel.build_hash(tarball, b"CONFIG_A=y\n") == first
    assert kernel.build_hash(tarball, b"CONFIG_A=n\n") != first
    renamed = tmp_path / "linux-source-6.2.tar.xz"
    shutil.copy(tarball, renamed)
    assert kernel.build_hash(renamed, b"CONFIG_A=y\n") != first
    tarball.write_bytes(b"x" * 101)
    assert kernel.build_hash(tarball, b"CONFIG_A=y\n") != first


def test_missing_linux_source_says_what_to_install(tmp_path, config, monkeypatch):
    with pytest.raises(kernel.KernelError, match="apt-get install linux-source"):
        kernel.find_source(tmp_path)
    monkeypatch.setattr(kernel, "SOURCE_DIR", tmp_path)
    with pytest.raises(kernel.KernelError, match="apt-get install linux-source"):
        kernel.build_kernel(tmp_path / "home", config)
    assert not (tmp_path / "home").exists()


def test_find_source_takes_the_newest(tmp_path):
    for name in ("linux-source-5.10.tar.xz", "linux-source-6.1.tar.xz", "linux-source-6.10.tar.xz"):
        (tmp_path / name).write_bytes(b"")
    assert kernel.find_source(tmp_path).name == "linux-source-6.10.tar.xz"


def test_register_an_elf_vmlinux(tmp_path):
    source = tmp_path / "vmlinux"
    source.write_bytes(_elf64(b"\0Linux version 6.1.141 (builder@host) (gcc 12) #1 SMP\0"))
    home = tmp_path / "home"
    assert kernel.find_kernel(home) is None
    messages: list[str] = []
    registered = kernel.register_kernel(home, source, progress=messages.append)
    assert registered.parent == home / "images"
    assert registered.name.startswith("vmlinux-6.1.141-") and len(registered.name.split("-")[-1]) == 12
    assert registered.read_bytes() == source.read_bytes()
    assert kernel.register_kernel(home, source, progress=messages.append) == registered
    assert any(m.startswith("already registered") for m in messages)
    assert kernel.list_kernels(home) == [registered]
    assert kernel.find_kernel(home) == registered
    bare = tmp_path / "bare"
    bare.write_bytes(_elf64())
    newer = kernel.register_kernel(home, bare)
    assert newer.name.startswith("vmlinux-unknown-")
    os.utime(registered, ns=(1, 1))  # older than the second one
    assert kernel.find_kernel(home) == newer


@pytest.mark.parametrize("content, message", [
    (b"#!/bin/sh\necho not a kernel\n", "not an ELF file"),
    (b"\0" * 0x202 + b"HdrS" + b"\0" * 64, "compressed bzImage"),
    (b"\x7fELF\x01" + b"\0" * 60, "not a 64-bit x86 one"),
])
def test_register_refuses_what_firecracker_cannot_boot(tmp_path, content, message):
    source = tmp_path / "kernel"
    source.write_bytes(content)
    with pytest.raises(kernel.KernelError, match=message):
        kernel.register_kernel(tmp_path / "home", source)
    assert kernel.list_kernels(tmp_path / "home") == []


def test_build_with_a_standin_source(tmp_path, config, build_tools):
    tarball = _standin_source(tmp_path)
    home = tmp_path / "home"
    messages: list[str] = []
    built = kernel.build_kernel(home, config, source=tarball, jobs=3, progress=messages.append)
    digest = kernel.build_hash(tarball, config.read_bytes())
    assert built == home / "images" / f"vmlinux-6.1.999-{digest[:12]}"
    assert built.read_bytes() == _host_elf().read_bytes()
    assert "$ make olddefconfig" in messages and "$ make -j3 vmlinux" in messages
    assert "  LD      vmlinux" in messages  # make's own output streamed line by line
    assert not kernel.scratch_dir(home, digest).exists()  # removed after a success
    assert kernel.find_kernel(home) == built
    again: list[str] = []
    assert kernel.build_kernel(home, config, source=tarball, progress=again.append) == built
    assert again == [f"cached: {built}"]


def test_failed_build_keeps_the_tree_and_resumes(tmp_path, config, build_tools):
    tarball = _standin_source(tmp_path, fail=True)
    home = tmp_path / "home"
    with pytest.raises(kernel.KernelError, match=r"make -j1 vmlinux exited with 2[\s\S]*\] Error 7"):
        kernel.build_kernel(home, config, source=tarball, jobs=1)
    tree = kernel.scratch_dir(home, kernel.build_hash(tarball, config.read_bytes()))
    assert (tree / "Makefile").is_file() and (tree / ".config").is_file()
    assert (tree / "steps.log").read_text().count("olddefconfig ran") == 1
    messages: list[str] = []
    with pytest.raises(kernel.KernelError):
        kernel.build_kernel(home, config, source=tarball, jobs=1, progress=messages.append)
    assert any(m.startswith("resuming the build in") for m in messages)
    assert not any(m.startswith("unpacking") for m in messages)
    assert kernel.list_kernels(home) == []


def test_build_needs_its_tools(tmp_path, config, monkeypatch):
    tarball = tmp_path / "linux-source-6.1.tar.xz"
    tarball.write_bytes(b"")
    monkeypatch.setattr(kernel, "BUILD_TOOLS", {"nimbus-no-such-tool": "nimbus-tools"})
    with pytest.raises(kernel.KernelError, match="needs nimbus-tools: apt-get install build-essential"):
        kernel.build_kernel(tmp_path / "home", config, source=tarball)


def test_cli_kernel(tmp_path):
    runner = CliRunner()
    home = tmp_path / "home"
    missing = runner.invoke(app, ["images", "kernel", "--home", str(home)])
    assert missing.exit_code != 0
    assert "--config PATH is required" in str(missing.exception)
    assert "microvm-kernel-ci-x86_64-6.1.config" in str(missing.exception)
    script = tmp_path / "script"
    script.write_text("#!/bin/sh\n")
    refused = runner.invoke(app, ["images", "kernel", "--from", str(script), "--home", str(home)])
    assert refused.exit_code != 0 and "not an ELF file" in str(refused.exception)
    vmlinux = tmp_path / "vmlinux"
    vmlinux.write_bytes(_elf64(b"Linux version 6.1.2 (x)"))
    done = runner.invoke(app, ["images", "kernel", "--from", str(vmlinux), "--home", str(home)])
    assert done.exit_code == 0, done.output
    [path] = kernel.list_kernels(home)
    assert str(path) in done.output and path.name.startswith("vmlinux-6.1.2-")
    listed = runner.invoke(app, ["images", "ls", "--home", str(home)])
    assert "kernel" in listed.output and "6.1.2" in listed.output


@pytest.mark.skipif(os.environ.get("NIMBUS_TEST_KERNEL_BUILD") != "1",
                    reason="builds a real kernel (tens of minutes): set NIMBUS_TEST_KERNEL_BUILD=1")
def test_real_kernel_build(tmp_path):
    reference = spec_dir() / REFERENCE_CONFIG
    if not reference.is_file():
        pytest.skip(f"Firecracker's reference kernel configuration is not at {reference}")
    try:
        kernel.find_source()
    except kernel.KernelError as exc:
        pytest.skip(str(exc))
    built = kernel.build_kernel(tmp_path, reference)
    kernel.check_vmlinux(built)
    version = kernel.kernel_version(built)
    assert version is not None and built.name.startswith(f"vmlinux-{version.split('-')[0]}")
