"""Guest images (``nimbus.machines.firecracker.images``): the small trees of every runtime, their init, and the ext4s.

Each runtime's tree is built once per module. Its interpreter is run with the tree as the root of a bwrap
sandbox (no chroot, no VM), and its /sbin/init is started there as PID 1 and answers the agent's protocol
over a socketpair, as in test_guest_init.py: python3 and nodejs handlers, a Go and a Rust executable built
here with the host's toolchains (skipped without them), and a WASI module run by the tree's own wasmtime.
Images are read back with debugfs and checked with e2fsck.

The debootstrap base downloads Debian (about a minute here, from this host's apt mirror): its test is
skipped, saying why, when debootstrap is missing, the node is not root or the mirror does not answer,
and can be left out with ``NIMBUS_TEST_DEBOOTSTRAP=0``.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from nimbus import protocol
from nimbus.cli import app
from nimbus.machines import layout
from nimbus.machines.bwrap import find_bwrap
from nimbus.machines.firecracker import images
from toolchain_builds import go_binary, rust_binary

pytestmark = pytest.mark.firecracker

WAIT_S = 30.0  # bounds a broken guest; never asserted on
VERSION = f"{sys.version_info.major}.{sys.version_info.minor}"
GUEST_PYTHON = f"/usr/local/bin/python{VERSION}"
ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": "/tmp", "LANG": "C.UTF-8"}
HANDLER = "import sys\ndef handler(event, context):\n    return {'twice': event['n'] * 2, 'prefix': sys.prefix}\n"
NODE_HANDLER = "exports.handler = async (event) => ({twice: event.n * 2, node: process.version});\n"
GO_HANDLER = """package main

import "encoding/json"

func Handle(event json.RawMessage) (any, error) {
	var in struct{ N int `json:"n"` }
	if err := json.Unmarshal(event, &in); err != nil {
		return nil, err
	}
	return map[string]int{"twice": in.N * 2}, nil
}
"""
RUST_PROGRAM = """use std::io::{self, BufRead, Write};

fn main() {
    let mut out = io::stdout().lock();
    for line in io::stdin().lock().lines() {
        let line = line.expect("stdin");
        writeln!(out, "{{\\"rust\\":{}}}", line).unwrap();
        out.flush().unwrap();
    }
}
"""
# A WASI command that copies stdin to stdout until EOF: each event line comes back as its result line.
WAT_ECHO = """(module
  (import "wasi_snapshot_preview1" "fd_read" (func $fd_read (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (func (export "_start") (local $n i32)
    (loop $next
      (i32.store (i32.const 0) (i32.const 1024))
      (i32.store (i32.const 4) (i32.const 8192))
      (drop (call $fd_read (i32.const 0) (i32.const 0) (i32.const 1) (i32.const 16)))
      (local.set $n (i32.load (i32.const 16)))
      (if (i32.eqz (local.get $n)) (then (return)))
      (i32.store (i32.const 32) (i32.const 1024))
      (i32.store (i32.const 36) (local.get $n))
      (drop (call $fd_write (i32.const 1) (i32.const 32) (i32.const 1) (i32.const 48)))
      (br $next))))
"""


def _tool(name: str) -> str:
    found = shutil.which(name) or (f"/sbin/{name}" if os.path.exists(f"/sbin/{name}") else None)
    if found is None:
        pytest.skip(f"{name} is not installed (e2fsprogs)")
    return found


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("nimbus-home")


@pytest.fixture(scope="module")
def built(home) -> tuple[Path, list[str]]:
    _tool("mkfs.ext4")
    messages: list[str] = []
    return images.build_image(home, "python3", progress=messages.append), messages


@pytest.fixture(scope="module")
def trees(tmp_path_factory):
    """``trees(runtime)``: (root, record) of the runtime's tree-base image, built once per module."""
    made: dict[str, tuple[Path, dict]] = {}

    def get(runtime: str) -> tuple[Path, dict]:
        if runtime == "nodejs" and shutil.which("node") is None:
            pytest.skip("node is not installed (apt-get install nodejs): no nodejs image")
        if runtime not in made:
            dest = tmp_path_factory.mktemp(f"tree-{runtime}") / "root"
            made[runtime] = dest, images.build_tree(runtime, dest)
        return made[runtime]

    return get


@pytest.fixture(scope="module")
def tree(trees) -> tuple[Path, dict]:
    return trees("python3")


def _sandbox(tree: Path, *argv: str, pass_fds=()) -> subprocess.Popen:
    command = [find_bwrap(), "--unshare-pid", "--as-pid-1", "--die-with-parent", "--bind", str(tree), "/",
               "--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp", "--", *argv]
    return subprocess.Popen(command, pass_fds=pass_fds, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=ENV)


def _serve(root: Path, init: dict, code: bytes, events: list) -> list[tuple[dict, bytes]]:
    """Start the tree's /sbin/init as PID 1 of a sandbox, ping, ``init`` with ``code``, one exec per event."""
    host, guest = socket.socketpair()
    proc = _sandbox(root, "/sbin/init", "--no-mounts", "--no-poweroff", "--", "--fd", str(guest.fileno()),
                    "--task-dir", "/tmp", pass_fds=(guest.fileno(),))
    guest.close()
    host.settimeout(WAIT_S)
    replies = []
    try:
        protocol.send_frame(host, {"type": "ping", "id": 1})
        reply, _ = protocol.recv_frame(host, protocol.GUEST_TYPES)
        assert (reply["type"], reply["id"]) == ("pong", 1)
        header = {"type": "init", "id": 2, "env": {}, "memory_mb": 128, "timeout_s": 30,
                  "function_name": "image-test", "function_version": "1", **init}
        protocol.send_frame(host, header, code)
        reply, _ = protocol.recv_frame(host, protocol.GUEST_TYPES)
        assert reply["type"] == "init_ok", reply
        for number, event in enumerate(events, start=3):
            protocol.send_frame(host, {"type": "exec", "id": number, "invocation_id": f"inv-{number}",
                                       "deadline_ms": 29000}, json.dumps(event).encode())
            replies.append(protocol.recv_frame(host, protocol.GUEST_TYPES))
    finally:
        host.close()
        try:
            _, err = proc.communicate(timeout=WAIT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
    assert proc.returncode == 0, err.decode()
    return replies


def _ldd_names(binary: Path) -> list[str]:
    """The libraries ``ldd`` names for ``binary`` (by soname), the loader by its path; [] for a static one."""
    done = subprocess.run(["ldd", str(binary)], capture_output=True, text=True)
    names = []
    for line in done.stdout.splitlines():
        line = line.strip()
        if "=>" in line:
            names.append(line.split("=>")[0].strip())
        elif line.startswith("/"):
            names.append(line.split("(")[0].strip())
    return names


def _assert_libraries_in(root: Path, binary: Path) -> None:
    for name in _ldd_names(binary):
        guest = root / name.lstrip("/") if name.startswith("/") else root / "lib/x86_64-linux-gnu" / name
        assert guest.is_file(), f"{binary.name} needs {name}, which the tree lacks"


def test_tree_layout(tree):
    root, record = tree
    init = root / "sbin/init"
    assert init.is_file() and os.access(init, os.X_OK)
    text = init.read_text()
    assert text.startswith(f"#!{GUEST_PYTHON} -IS\n")
    assert "from nimbus.agent.init import main" in text
    python = root / GUEST_PYTHON.lstrip("/")
    assert python.is_file() and os.access(python, os.X_OK)
    assert (root / f"usr/local/lib/python{VERSION}/os.py").is_file()
    dynload = root / f"usr/local/lib/python{VERSION}/lib-dynload"
    assert any(dynload.glob("_ssl*.so"))
    for skipped in ("test", "idlelib", "tkinter", "ensurepip", "site-packages"):
        assert not (root / f"usr/local/lib/python{VERSION}/{skipped}").exists()
    assert (root / "lib64/ld-linux-x86-64.so.2").is_file()
    # Every library ldd names for the interpreter is in the tree.
    _assert_libraries_in(root, layout.base_python()[0])
    assert (root / "etc/ld.so.cache").is_file()
    nimbus_dir = root / "opt/nimbus/nimbus"
    for name in ("__init__.py", "protocol.py", "agent/init.py", "agent/main.py", "agent/python3.py"):
        assert (nimbus_dir / name).is_file(), name
    for mount in ("proc", "sys", "dev", "tmp", "run", "var/task", "opt/layer"):
        path = root / mount
        assert path.is_dir() and not any(path.iterdir()), mount
    for name in ("passwd", "group", "hosts", "nsswitch.conf"):
        assert (root / "etc" / name).is_file(), name
    on_disk = json.loads((root / "etc/nimbus-image.json").read_text())
    assert on_disk == record
    assert (record["runtime"], record["base"]) == ("python3", "tree")
    assert record["python"] == ".".join(map(str, sys.version_info[:3]))
    assert record["tools"]["python"] == {"version": record["python"], "path": GUEST_PYTHON}
    assert record["content_hash"] == images.content_hash("python3")
    assert not (root / "usr/bin/node").exists() and not (root / "opt/nimbus/site").exists()


def test_tree_interpreter_imports_the_agent(tree):
    root, _ = tree
    code = ("import sys; sys.path.insert(0, '/opt/nimbus'); import nimbus.agent.main, nimbus.agent.init; "
            "import ssl, json, asyncio, ctypes; print(sys.prefix, nimbus.agent.main.__file__)")
    proc = _sandbox(root, GUEST_PYTHON, "-I", "-S", "-c", code)
    out, err = proc.communicate(timeout=WAIT_S)
    assert proc.returncode == 0, err.decode()
    assert out.decode().split() == ["/usr/local", "/opt/nimbus/nimbus/agent/main.py"]


def test_tree_init_runs_the_agent_as_pid_1(tree):
    root, _ = tree
    init = {"runtime": "python3", "handler": "main.handler", "filename": "main.py"}
    [(reply, blob)] = _serve(root, init, HANDLER.encode(), [{"n": 21}])
    assert reply["type"] == "result", reply
    assert json.loads(blob) == {"twice": 42, "prefix": "/usr/local"}


@pytest.mark.parametrize("runtime", ["nodejs", "go", "rust", "wasm"])
def test_each_runtime_is_the_python3_tree_plus_its_own(runtime, trees):
    base_root, _ = trees("python3")
    root, record = trees(runtime)
    base_files = {p.relative_to(base_root) for p in base_root.rglob("*")} - {Path("etc/nimbus-image.json")}
    files = {p.relative_to(root) for p in root.rglob("*")}
    assert base_files <= files, sorted(base_files - files)[:5]
    assert (record["runtime"], record["base"]) == (runtime, "tree")
    assert record["content_hash"] == images.content_hash(runtime) != images.content_hash("python3")
    assert {"python", "glibc"} <= set(record["tools"])


def test_nodejs_tree_has_node_and_its_libraries(trees):
    root, record = trees("nodejs")
    node = root / "usr/bin/node"
    assert node.is_file() and os.access(node, os.X_OK)
    host_node = Path(os.path.realpath(shutil.which("node")))
    assert node.stat().st_size == host_node.stat().st_size
    _assert_libraries_in(root, host_node)
    assert (root / "opt/nimbus/nimbus/agent/node_runner.js").is_file()
    version = subprocess.run([str(host_node), "--version"], capture_output=True, text=True).stdout.strip()
    assert record["tools"]["node"] == {"version": version.lstrip("v"), "path": "/usr/bin/node"}


def test_nodejs_tree_runs_a_handler(trees):
    root, record = trees("nodejs")
    init = {"runtime": "nodejs", "handler": "index.handler", "filename": "index.js"}
    [(reply, blob)] = _serve(root, init, NODE_HANDLER.encode(), [{"n": 4}])
    assert reply["type"] == "result", reply
    assert json.loads(blob) == {"twice": 8, "node": "v" + record["tools"]["node"]["version"]}


def test_wasm_tree_has_wasmtime_where_the_agent_looks(trees):
    root, record = trees("wasm")
    package = root / "opt/nimbus/site/wasmtime"
    assert (package / "__init__.py").is_file()
    native = [p for p in package.rglob("*.so")]
    assert native, "wasmtime's native library is missing"
    for library in native:
        _assert_libraries_in(root, library)
    # Compiled at build time (the guest's root is read-only): wasmtime imports without compiling 30 modules.
    assert (package / "__pycache__" / f"__init__.{sys.implementation.cache_tag}.pyc").is_file()
    assert record["tools"]["wasmtime"]["path"] == "/opt/nimbus/site/wasmtime"
    assert record["tools"]["wasmtime"]["version"]


def test_wasm_tree_runs_a_module(trees):
    wasmtime = pytest.importorskip("wasmtime")
    from nimbus.agent.wasm import make_engine

    root, _ = trees("wasm")
    module = bytes(wasmtime.Module(make_engine(), wasmtime.wat2wasm(WAT_ECHO)).serialize())
    init = {"runtime": "wasm", "handler": "module._start", "filename": "module.cwasm"}
    [(reply, blob)] = _serve(root, init, module, [{"echo": [1, 2]}])
    assert reply["type"] == "result", reply
    assert json.loads(blob) == {"echo": [1, 2]}


def test_rust_tree_runs_a_rustc_executable(trees, tmp_path):
    program = rust_binary(tmp_path, RUST_PROGRAM)
    root, record = trees("rust")
    _assert_libraries_in(root, tmp_path / "bootstrap")
    assert "libgcc_s.so.1" in _ldd_names(tmp_path / "bootstrap")  # why the rust image adds it
    assert record["tools"]["libgcc_s"]["path"] == "/lib/x86_64-linux-gnu/libgcc_s.so.1"
    init = {"runtime": "rust", "handler": "main.main", "filename": "bootstrap"}
    [(reply, blob)] = _serve(root, init, program, [{"n": 1}])
    assert reply["type"] == "result", reply
    assert json.loads(blob) == {"rust": {"n": 1}}


def test_go_tree_runs_a_static_executable(trees, tmp_path):
    program = go_binary(tmp_path, GO_HANDLER)
    assert _ldd_names(tmp_path / "bootstrap") == []  # CGO_ENABLED=0: static, so the image adds nothing
    root, _ = trees("go")
    init = {"runtime": "go", "handler": "main.Handle", "filename": "bootstrap"}
    [(reply, blob)] = _serve(root, init, program, [{"n": 5}])
    assert reply["type"] == "result", reply
    assert json.loads(blob) == {"twice": 10}


def test_image_is_a_readable_ext4(built):
    image, messages = built
    debugfs = _tool("debugfs")
    assert image.name.startswith("python3-") and image.suffix == ".ext4"
    assert any("mkfs" in m or "ext4" in m for m in messages)
    listing = subprocess.run([debugfs, "-R", "ls -l /sbin", str(image)], capture_output=True, text=True, check=True)
    assert " init" in listing.stdout or "init\n" in listing.stdout
    cat = subprocess.run([debugfs, "-R", f"cat {images.RECORD_PATH}", str(image)], capture_output=True, text=True,
                         check=True)
    record = json.loads(cat.stdout)
    assert record["runtime"] == "python3"
    assert image.name == f"python3-{record['content_hash'][:images.HASH_CHARS]}.ext4"
    init = subprocess.run([debugfs, "-R", "cat /sbin/init", str(image)], capture_output=True, text=True, check=True)
    assert init.stdout.startswith(f"#!{GUEST_PYTHON} -IS")
    fsck = subprocess.run([_tool("e2fsck"), "-fn", str(image)], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr


def test_nodejs_image_holds_node(home, trees):
    trees("nodejs")  # skips without node
    debugfs = _tool("debugfs")
    image = images.build_image(home, "nodejs")
    assert images.parse_image_name(image) == images.ImageName("nodejs", "tree", image.stem.split("-")[-1])
    stat = subprocess.run([debugfs, "-R", "stat /usr/bin/node", str(image)], capture_output=True, text=True,
                          check=True)
    size = os.path.getsize(os.path.realpath(shutil.which("node")))
    assert f"Size: {size}" in stat.stdout
    record = json.loads(subprocess.run([debugfs, "-R", f"cat {images.RECORD_PATH}", str(image)],
                                       capture_output=True, text=True, check=True).stdout)
    assert record["runtime"] == "nodejs" and "node" in record["tools"]


def test_second_build_is_a_cache_hit(built, home):
    image, _ = built
    before = image.stat()
    messages: list[str] = []
    again = images.build_image(home, "python3", progress=messages.append)
    after = again.stat()
    assert again == image
    assert (before.st_ino, before.st_mtime_ns) == (after.st_ino, after.st_mtime_ns)
    assert any(m.startswith("cached") for m in messages)
    assert image in images.list_images(home)


def test_hash_follows_the_agent_files(tmp_path, monkeypatch):
    original = images._nimbus_entries()
    before = images.content_hash("python3")
    assert images.content_hash("python3") == before  # deterministic
    copy = tmp_path / "main.py"
    source = next(e.source for e in original if e.path.endswith("/agent/main.py"))
    copy.write_bytes(source.read_bytes() + b"\n# changed\n")
    changed = [images.Entry(e.path, source=copy) if e.path.endswith("/agent/main.py") else e for e in original]
    monkeypatch.setattr(images, "_nimbus_entries", lambda: changed)
    assert images.content_hash("python3") != before


def test_debootstrap_hash_covers_its_inputs():
    mirror = "http://deb.example/debian"
    first = images.debootstrap_hash("python3", "bookworm", mirror)
    assert images.debootstrap_hash("python3", "bookworm", mirror) == first
    others = {images.debootstrap_hash("python3", "trixie", mirror),
              images.debootstrap_hash("python3", "bookworm", "http://other.example/debian"),
              images.debootstrap_hash("nodejs", "bookworm", mirror),
              images.content_hash("python3")}
    assert first not in others and len(others) == 4


def test_debootstrap_command_and_mirror(tmp_path):
    command = images.debootstrap_command("nodejs", tmp_path / "t", "bookworm", "http://m.example/debian")
    assert command == ["debootstrap", "--variant=minbase", "--include=python3,nodejs", "bookworm",
                       str(tmp_path / "t"), "http://m.example/debian"]
    listing = tmp_path / "sources.list"
    listing.write_text("# comment\ndeb http://security.debian.org/debian-security bookworm-security main\n"
                       "deb [arch=amd64] http://ftp.example.org/debian/ bookworm main\n")
    assert images.host_mirror((listing,)) == "http://ftp.example.org/debian"
    parts = tmp_path / "sources.list.d"
    parts.mkdir()
    (parts / "debian.sources").write_text("Types: deb\nURIs: http://deb.example.net/debian\nSuites: bookworm\n")
    (parts / "other.list").write_text("deb https://packages.example.com/apt stable main\n")
    assert images.host_mirror((tmp_path / "absent.list", parts)) == "http://deb.example.net/debian"
    assert images.host_mirror((tmp_path / "absent.list",)) == images.DEFAULT_MIRROR


def test_image_names_and_find_image(tmp_path):
    directory = tmp_path / "images"
    directory.mkdir()
    assert images.find_image(tmp_path, "python3") is None
    old = directory / "python3-aaaaaaaaaaaa.ext4"
    new = directory / "python3-debootstrap-bbbbbbbbbbbb.ext4"
    other = directory / "nodejs-cccccccccccc.ext4"
    for number, path in enumerate((old, new, other)):
        path.write_bytes(b"x")
        os.utime(path, ns=(10**18 + number * 10**9,) * 2)
    (directory / "notes.ext4").write_bytes(b"x")
    assert images.parse_image_name(new) == images.ImageName("python3", "debootstrap", "bbbbbbbbbbbb")
    assert images.parse_image_name(old) == images.ImageName("python3", "tree", "aaaaaaaaaaaa")
    assert images.parse_image_name(directory / "notes.ext4") is None
    assert images.image_path(tmp_path, "python3", "b" * 64, "debootstrap") == new
    assert images.find_image(tmp_path, "python3") == new
    os.utime(old, ns=(2 * 10**18,) * 2)
    assert images.find_image(tmp_path, "python3") == old
    assert images.find_image(tmp_path, "nodejs") == other
    assert images.find_image(tmp_path, "go") is None


def test_unknown_runtime_and_base(tmp_path):
    with pytest.raises(images.ImageError, match="unknown runtime 'cobol'"):
        images.content_hash("cobol")
    with pytest.raises(images.ImageError, match="unknown base 'alpine'"):
        images.build_image(tmp_path, "python3", base="alpine")
    assert not (tmp_path / "images").exists()


def test_cli_build_and_ls(built, home):
    image, _ = built
    runner = CliRunner()
    result = runner.invoke(app, ["images", "build", "--runtime", "python3", "--home", str(home)])
    assert result.exit_code == 0, result.output
    assert str(image) in result.output
    kernel = home / "images" / "vmlinux-6.1.1-0123456789ab"
    kernel.write_bytes(b"\x7fELF")
    listed = runner.invoke(app, ["images", "ls", "--home", str(home)])
    assert listed.exit_code == 0, listed.output
    assert image.name in listed.output and "python3 (tree)" in listed.output
    assert "kernel" in listed.output and "6.1.1" in listed.output and kernel.name in listed.output
    kernel.unlink()
    refused = runner.invoke(app, ["images", "build", "--runtime", "cobol", "--home", str(home)])
    assert refused.exit_code != 0 and "unknown runtime" in str(refused.exception)
    mixed = runner.invoke(app, ["images", "build", "--runtime", "python3", "--mirror", "http://x/debian",
                                "--home", str(home)])
    assert mixed.exit_code != 0 and "--base debootstrap" in str(mixed.exception)


def _mirror_answers(mirror: str, suite: str) -> str | None:
    """None when the mirror serves ``suite``'s Release file, else why not."""
    import urllib.request

    url = f"{mirror.rstrip('/')}/dists/{suite}/Release"
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=15):
            return None
    except OSError as exc:
        return f"{url}: {exc}"


@pytest.mark.skipif(os.environ.get("NIMBUS_TEST_DEBOOTSTRAP") == "0",
                    reason="NIMBUS_TEST_DEBOOTSTRAP=0: the debootstrap image (a minute, network) is left out")
def test_debootstrap_image(tmp_path):
    """A minbase bookworm with python3, read back from the ext4 and its init run as PID 1 (Debian's python3)."""
    debugfs = _tool("debugfs")
    if shutil.which("debootstrap") is None:
        pytest.skip("debootstrap is not installed (apt-get install debootstrap)")
    if os.geteuid() != 0:
        pytest.skip("debootstrap needs root")
    unreachable = _mirror_answers(images.host_mirror(), images.DEFAULT_SUITE)
    if unreachable is not None:
        pytest.skip(f"the Debian mirror does not answer: {unreachable}")
    messages: list[str] = []
    image = images.build_image(tmp_path, "python3", base="debootstrap", progress=messages.append)
    assert images.parse_image_name(image).base == "debootstrap"
    assert any(m.startswith("I: ") for m in messages)  # debootstrap's own progress came through
    fsck = subprocess.run([_tool("e2fsck"), "-fn", str(image)], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    root = tmp_path / "root"
    root.mkdir()
    # Read the whole file system back out: debugfs must be able to walk every file mkfs wrote.
    subprocess.run([debugfs, "-R", f"rdump / {root}", str(image)], capture_output=True, check=True)
    assert (root / "usr/bin/python3").exists() and (root / "var/lib/dpkg/status").is_file()
    assert (root / "usr/sbin/init").read_text().startswith("#!/usr/bin/python3 -IS\n")
    record = json.loads((root / "etc/nimbus-image.json").read_text())
    assert (record["base"], record["suite"], record["variant"]) == ("debootstrap", "bookworm", "minbase")
    assert record["content_hash"] == images.debootstrap_hash("python3", "bookworm", record["mirror"])
    assert record["tools"]["python"]["version"].startswith("3.11")
    assert not any((root / "var/cache/apt/archives").glob("*.deb"))
    init = {"runtime": "python3", "handler": "main.handler", "filename": "main.py"}
    [(reply, blob)] = _serve(root, init, HANDLER.encode(), [{"n": 21}])
    assert reply["type"] == "result", reply
    assert json.loads(blob) == {"twice": 42, "prefix": "/usr"}
    again: list[str] = []
    assert images.build_image(tmp_path, "python3", base="debootstrap", progress=again.append) == image
    assert any(m.startswith("cached") for m in again)
