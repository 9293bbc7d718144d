"""Guest kernels for the Firecracker driver: built from Debian's ``linux-source``, or registered as given.

Firecracker on x86_64 boots an uncompressed ELF ``vmlinux`` (a ``bzImage`` works too but costs boot time
and guest memory to decompress itself), so that is the only format kept here. Two ways in:

* ``build_kernel`` unpacks ``/usr/src/linux-source-X.Y.tar.xz`` (the ``linux-source`` Debian package)
  into ``$NIMBUS_HOME/images/.kernel-build-<hash12>/``, copies the given configuration to ``.config``
  (Firecracker publishes the one its CI boots as ``resources/guest_configs/microvm-kernel-ci-x86_64-6.1.config``
  in the firecracker-microvm/firecracker repository), runs ``make olddefconfig`` (the config names a
  slightly different 6.1 point release and compiler: new symbols take their defaults) and
  ``make -jN vmlinux``, and copies ``vmlinux`` out. The scratch directory is removed after a success and
  kept after a failure, so running the command again resumes where ``make`` stopped instead of starting a
  twenty-minute build over.
* ``register_kernel`` copies a ``vmlinux`` the user already has, after checking it is a 64-bit x86 ELF.

Kernels are kept as ``$NIMBUS_HOME/images/vmlinux-<kernelversion>-<hash12>``. For a built kernel the
hash covers the recipe version, the source tarball's name and size and the configuration's bytes, so a
second ``build_kernel`` with the same inputs is a cache hit found before anything is unpacked; for a
registered one it is the file's own sha256.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

from nimbus.errors import NimbusError
from nimbus.machines.firecracker import images

RECIPE_VERSION = 1  # bump when the build steps change: every built kernel gets a new name
IMAGES_DIR = images.IMAGES_DIR
HASH_CHARS = 12
KERNEL_PREFIX = "vmlinux-"
SCRATCH_PREFIX = ".kernel-build-"
SOURCE_DIR = Path("/usr/src")
SOURCE_GLOB = "linux-source-*.tar.xz"
SOURCE_PACKAGE = "linux-source"
UNPACKED_MARK = ".nimbus-unpacked"  # written once tar has finished, so a resumed build skips the unpack
CONFIG_HINT = ("Firecracker publishes the configuration its CI boots as "
               "resources/guest_configs/microvm-kernel-ci-x86_64-6.1.config in the "
               "firecracker-microvm/firecracker repository")
# What a Nimbus guest cannot boot or talk without: virtio over MMIO (Firecracker's bus), the root drive,
# its ext4, the vsock the agent listens on, devtmpfs for init's /dev and the serial console for its log.
REQUIRED_OPTIONS = (
    "CONFIG_VIRTIO_MMIO", "CONFIG_VIRTIO_BLK", "CONFIG_EXT4_FS", "CONFIG_VIRTIO_VSOCKETS", "CONFIG_DEVTMPFS",
    "CONFIG_SERIAL_8250_CONSOLE",
)
# Programs a kernel build runs, and the Debian packages that bring them.
BUILD_TOOLS = {"make": "make", "gcc": "gcc", "bc": "bc", "bison": "bison", "flex": "flex", "tar": "tar",
               "xz": "xz-utils"}
BUILD_PACKAGES = "build-essential bc bison flex libelf-dev libssl-dev"
ELF_MAGIC = b"\x7fELF"
ELF_CLASS_64 = 2
ELF_MACHINE_X86_64 = 0x3E
BZIMAGE_MAGIC_OFFSET = 0x202  # "HdrS", the x86 boot protocol header of a bzImage
VERSION_PATTERN = re.compile(rb"Linux version (\d+\.\d+[\w.+~-]*)")
VERSION_SCAN_BYTES = 64 << 20  # the banner sits in .rodata, well inside the first tens of MiB
OUTPUT_TAIL_LINES = 40  # how much of a failed step's output an error quotes
PROBE_TIMEOUT_S = 60.0
COPY_CHUNK = 1 << 20

Progress = Callable[[str], None]


class KernelError(NimbusError):
    """A kernel could not be built or registered: a missing source or tool, a bad file, a failed step."""


# ---------------------------------------------------------------- where kernels live


def kernels_dir(home: Path) -> Path:
    return Path(home) / IMAGES_DIR


def kernel_path(home: Path, version: str, digest: str) -> Path:
    return kernels_dir(home) / f"{KERNEL_PREFIX}{version}-{digest[:HASH_CHARS]}"


def list_kernels(home: Path) -> list[Path]:
    """The kernels under ``home``/images, by name."""
    directory = kernels_dir(home)
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.glob(f"{KERNEL_PREFIX}*") if p.is_file() and not p.name.endswith(".part"))


def find_kernel(home: Path) -> Path | None:
    """The newest kernel built or registered under ``home`` (by modification time), or None."""
    found = list_kernels(home)
    if not found:
        return None
    return max(found, key=lambda p: (p.stat().st_mtime_ns, p.name))


def _cached(home: Path, digest: str) -> Path | None:
    for path in list_kernels(home):
        if path.name.endswith(f"-{digest[:HASH_CHARS]}"):
            return path
    return None


# ---------------------------------------------------------------- checking a vmlinux


def check_vmlinux(path: Path) -> None:
    """Raise unless ``path`` is an uncompressed 64-bit x86 ELF, the kernel format Firecracker boots on x86_64."""
    try:
        with open(path, "rb") as file:
            head = file.read(BZIMAGE_MAGIC_OFFSET + 4)
    except OSError as exc:
        raise KernelError(f"cannot read {path}: {exc.strerror or exc}") from None
    if head[:4] != ELF_MAGIC:
        if head[BZIMAGE_MAGIC_OFFSET:BZIMAGE_MAGIC_OFFSET + 4] == b"HdrS":
            raise KernelError(f"{path} is a compressed bzImage; Firecracker on x86_64 wants the uncompressed ELF "
                              "vmlinux (the file 'vmlinux' at the top of a kernel build tree)")
        raise KernelError(f"{path} is not an ELF file (no \\x7fELF magic): not a vmlinux")
    if len(head) < 20 or head[4] != ELF_CLASS_64 or int.from_bytes(head[18:20], "little") != ELF_MACHINE_X86_64:
        raise KernelError(f"{path} is an ELF file but not a 64-bit x86 one: not an x86_64 vmlinux")


def kernel_version(path: Path) -> str | None:
    """The release in a kernel image's ``Linux version …`` banner, or None when it has none."""
    tail = b""
    with open(path, "rb") as file:
        read = 0
        while read < VERSION_SCAN_BYTES and (chunk := file.read(COPY_CHUNK)):
            read += len(chunk)
            found = VERSION_PATTERN.search(tail + chunk)
            if found:
                return found.group(1).decode("ascii", "replace")
            tail = chunk[-128:]  # a banner split across two chunks
    return None


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(COPY_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _install(source: Path, dest: Path) -> None:
    """Copy ``source`` to ``dest`` through a partial file, so a reader never sees half a kernel."""
    partial = dest.with_name(dest.name + ".part")
    shutil.copyfile(source, partial)  # not copy2: the kernel's mtime is when it came in (find_kernel)
    os.chmod(partial, 0o644)
    os.replace(partial, dest)


def register_kernel(home: Path, source: Path, *, progress: Progress | None = None) -> Path:
    """Copy the user's ``vmlinux`` into ``home``/images (once per content) and return where it is."""
    say = progress or (lambda message: None)
    source = Path(source)
    if not source.is_file():
        raise KernelError(f"{source} does not exist or is not a file")
    check_vmlinux(source)
    digest = _file_sha256(source)
    version = kernel_version(source) or "unknown"
    dest = kernel_path(home, version, digest)
    if dest.is_file():
        say(f"already registered: {dest}")
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    say(f"copying {source} ({version})")
    _install(source, dest)
    say(f"registered {dest}")
    return dest


# ---------------------------------------------------------------- building from linux-source


def find_source(source_dir: Path | None = None) -> Path:
    """The newest ``linux-source-*.tar.xz`` in ``source_dir`` (``SOURCE_DIR``); the error names its package."""
    source_dir = Path(source_dir) if source_dir is not None else SOURCE_DIR
    def key(path: Path) -> tuple[int, ...]:
        digits = re.findall(r"\d+", path.name)
        return tuple(int(d) for d in digits)

    found = sorted(source_dir.glob(SOURCE_GLOB), key=key)
    if not found:
        raise KernelError(f"no {SOURCE_GLOB} in {source_dir}: apt-get install {SOURCE_PACKAGE} "
                          "(Debian's kernel source tarball), or pass the tarball with --source")
    return found[-1]


def read_config(config: Path) -> bytes:
    """The configuration's bytes, refused early when it lacks an option a Nimbus guest needs."""
    try:
        data = Path(config).read_bytes()
    except OSError as exc:
        raise KernelError(f"cannot read the kernel configuration {config}: {exc.strerror or exc}") from None
    missing = missing_options(data.decode("utf-8", "replace"))
    if missing:
        raise KernelError(f"{config} does not build a kernel a Nimbus guest can boot: not set to y: "
                          f"{', '.join(missing)}")
    return data


def missing_options(config_text: str) -> list[str]:
    """The ``REQUIRED_OPTIONS`` that ``config_text`` does not set to ``y`` (built in, not a module)."""
    enabled = set(re.findall(r"^(CONFIG_\w+)=y\s*$", config_text, flags=re.MULTILINE))
    return [option for option in REQUIRED_OPTIONS if option not in enabled]


def build_hash(tarball: Path, config: bytes) -> str:
    """sha256 of the recipe version, the source tarball's name and size, and the configuration."""
    size = Path(tarball).stat().st_size
    digest = hashlib.sha256(f"nimbus-kernel recipe {RECIPE_VERSION}\n{Path(tarball).name} {size}\n".encode())
    digest.update(config)
    return digest.hexdigest()


def unpack_command(tarball: Path, dest: Path) -> list[str]:
    # The tarball holds one top directory (linux-source-6.1/): strip it so the tree is dest itself.
    return ["tar", "-xJf", str(tarball), "-C", str(dest), "--strip-components=1"]


def build_commands(jobs: int) -> list[list[str]]:
    """The make steps, run in the unpacked tree after the configuration is copied to ``.config``."""
    return [["make", "olddefconfig"], ["make", f"-j{jobs}", "vmlinux"]]


def scratch_dir(home: Path, digest: str) -> Path:
    return kernels_dir(home) / f"{SCRATCH_PREFIX}{digest[:HASH_CHARS]}"


def _check_tools() -> None:
    missing = [package for tool, package in BUILD_TOOLS.items() if shutil.which(tool) is None]
    if missing:
        raise KernelError(f"a kernel build needs {', '.join(sorted(set(missing)))}: "
                          f"apt-get install {BUILD_PACKAGES}")


def _stream(argv: list[str], cwd: Path, say: Progress) -> None:
    """Run one step, handing each output line to ``say``; on failure the error quotes the last lines."""
    say("$ " + " ".join(argv))
    try:
        code, tail = images.run_streamed(argv, say, cwd=cwd, tail_lines=OUTPUT_TAIL_LINES)
    except OSError as exc:
        raise KernelError(f"cannot run {argv[0]}: {exc.strerror or exc}") from None
    if code != 0:
        quoted = "\n".join(tail)
        raise KernelError(f"{' '.join(argv)} exited with {code} (the tree is kept in {cwd}; run again to "
                          f"resume, or remove it):\n{quoted}")


def _make_kernelversion(tree: Path) -> str:
    done = subprocess.run(["make", "-s", "kernelversion"], cwd=tree, capture_output=True, text=True,
                          timeout=PROBE_TIMEOUT_S, stdin=subprocess.DEVNULL)
    version = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""
    if done.returncode != 0 or not re.fullmatch(r"\d+\.\d+[\w.+~-]*", version):
        raise KernelError(f"make kernelversion failed in {tree}: {(done.stderr or done.stdout).strip()}")
    return version


def build_kernel(home: Path, config: Path, *, source: Path | None = None, jobs: int | None = None,
                 progress: Progress | None = None) -> Path:
    """Build ``vmlinux`` from ``source`` (default: the newest linux-source tarball) with ``config``.

    Returns the cached kernel at once when one was built from the same tarball and configuration.
    """
    say = progress or (lambda message: None)
    data = read_config(config)
    tarball = Path(source) if source is not None else find_source()
    if not tarball.is_file():
        raise KernelError(f"{tarball} does not exist or is not a file")
    digest = build_hash(tarball, data)
    cached = _cached(home, digest)
    if cached is not None:
        say(f"cached: {cached}")
        return cached
    _check_tools()
    jobs = jobs or os.cpu_count() or 1
    tree = scratch_dir(home, digest)
    tree.mkdir(parents=True, exist_ok=True)
    if not (tree / UNPACKED_MARK).is_file():
        say(f"unpacking {tarball} into {tree}")
        _stream(unpack_command(tarball, tree), tree, say)
        (tree / UNPACKED_MARK).write_text(f"{tarball}\n")
    else:
        say(f"resuming the build in {tree}")
    (tree / ".config").write_bytes(data)
    for argv in build_commands(jobs):
        _stream(argv, tree, say)
    missing = missing_options((tree / ".config").read_text(errors="replace"))
    if missing:  # olddefconfig drops what this source cannot have: say so rather than boot a dead guest
        raise KernelError(f"after make olddefconfig these options are no longer y: {', '.join(missing)}")
    built = tree / "vmlinux"
    check_vmlinux(built)
    version = _make_kernelversion(tree)
    dest = kernel_path(home, version, digest)
    _install(built, dest)
    say(f"built {dest}")
    shutil.rmtree(tree, ignore_errors=True)
    return dest

