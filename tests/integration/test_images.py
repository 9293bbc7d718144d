"""Guest images (``nimbus.machines.images``): the small python3 tree, its init, and the ext4 made from it.

The tree is built once per module. Its interpreter is run with the tree as the root of a bwrap sandbox
(no chroot, no VM), and its /sbin/init is started there as PID 1 and answers the agent's protocol over
a socketpair, as in test_guest_init.py. The image is read back with debugfs and checked with e2fsck.
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
from nimbus.machines import images
from nimbus.machines.bwrap import find_bwrap

pytestmark = pytest.mark.firecracker

WAIT_S = 30.0  # bounds a broken guest; never asserted on
VERSION = f"{sys.version_info.major}.{sys.version_info.minor}"
GUEST_PYTHON = f"/usr/local/bin/python{VERSION}"
ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": "/tmp", "LANG": "C.UTF-8"}
HANDLER = "import sys\ndef handler(event, context):\n    return {'twice': event['n'] * 2, 'prefix': sys.prefix}\n"


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
def tree(tmp_path_factory) -> tuple[Path, dict]:
    dest = tmp_path_factory.mktemp("tree") / "root"
    record = images.build_tree("python3", dest)
    return dest, record


def _sandbox(tree: Path, *argv: str, pass_fds=()) -> subprocess.Popen:
    command = [find_bwrap(), "--unshare-pid", "--as-pid-1", "--die-with-parent", "--bind", str(tree), "/",
               "--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp", "--", *argv]
    return subprocess.Popen(command, pass_fds=pass_fds, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=ENV)


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
    python_host = str(images.bwrap.base_python()[0])
    ldd = subprocess.run(["ldd", python_host], capture_output=True, text=True, check=True).stdout
    for line in ldd.splitlines():
        if "=>" in line:
            name = line.split("=>")[0].strip()
            assert (root / "lib/x86_64-linux-gnu" / name).is_file(), name
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
    assert record["runtime"] == "python3"
    assert record["python"] == ".".join(map(str, sys.version_info[:3]))
    assert record["content_hash"] == images.content_hash("python3")


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
    host, guest = socket.socketpair()
    proc = _sandbox(root, "/sbin/init", "--no-mounts", "--no-poweroff", "--", "--fd", str(guest.fileno()),
                    "--task-dir", "/tmp", pass_fds=(guest.fileno(),))
    guest.close()
    host.settimeout(WAIT_S)
    try:
        protocol.send_frame(host, {"type": "ping", "id": 1})
        reply, _ = protocol.recv_frame(host, protocol.GUEST_TYPES)
        assert (reply["type"], reply["id"]) == ("pong", 1)
        header = {"type": "init", "id": 2, "runtime": "python3", "handler": "main.handler", "filename": "main.py",
                  "env": {}, "memory_mb": 128, "timeout_s": 30, "function_name": "image-test",
                  "function_version": "1"}
        protocol.send_frame(host, header, HANDLER.encode())
        reply, _ = protocol.recv_frame(host, protocol.GUEST_TYPES)
        assert reply["type"] == "init_ok", reply
        protocol.send_frame(host, {"type": "exec", "id": 3, "invocation_id": "inv-1", "deadline_ms": 29000},
                            json.dumps({"n": 21}).encode())
        reply, blob = protocol.recv_frame(host, protocol.GUEST_TYPES)
        assert reply["type"] == "result", reply
        assert json.loads(blob) == {"twice": 42, "prefix": "/usr/local"}
    finally:
        host.close()
        try:
            _, err = proc.communicate(timeout=WAIT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
    assert proc.returncode == 0, err.decode()


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


def test_second_build_is_a_cache_hit(built, home):
    image, _ = built
    before = image.stat()
    messages: list[str] = []
    again = images.build_image(home, "python3", progress=messages.append)
    after = again.stat()
    assert again == image
    assert (before.st_ino, before.st_mtime_ns) == (after.st_ino, after.st_mtime_ns)
    assert any(m.startswith("cached") for m in messages)
    assert images.list_images(home) == [image]


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


@pytest.mark.parametrize("runtime", ["nodejs", "go", "rust", "wasm"])
def test_runtimes_not_yet_built_say_so(runtime, tmp_path):
    with pytest.raises(images.ImageError, match=f"{runtime} runtime are not built yet; supported: python3"):
        images.build_image(tmp_path, runtime)
    assert not (tmp_path / "images").exists()


def test_unknown_runtime(tmp_path):
    with pytest.raises(images.ImageError, match="unknown runtime 'cobol'"):
        images.content_hash("cobol")


def test_cli_build_and_ls(built, home):
    image, _ = built
    runner = CliRunner()
    result = runner.invoke(app, ["images", "build", "--runtime", "python3", "--home", str(home)])
    assert result.exit_code == 0, result.output
    assert str(image) in result.output
    listed = runner.invoke(app, ["images", "ls", "--home", str(home)])
    assert listed.exit_code == 0, listed.output
    assert image.name in listed.output
    refused = runner.invoke(app, ["images", "build", "--runtime", "go", "--home", str(home)])
    assert refused.exit_code != 0
