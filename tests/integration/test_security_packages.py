"""Regression tests for the package findings of the security review (issue 15), on a real node."""

import base64
import io
import os
import zipfile

import pytest
from test_api import assert_problem, invoke
from test_packages import create, zipped

pytestmark = pytest.mark.sandbox

MAIN = "def handler(event, context):\n    return 'ran'\n"
WALK = (
    "import os\n"
    "def handler(event, context):\n"
    "    files, total = 0, 0\n"
    "    for root, dirs, names in os.walk('/var/task'):\n"
    "        for name in names:\n"
    "            files += 1\n"
    "            total += os.path.getsize(os.path.join(root, name))\n"
    "    return {'files': files, 'bytes': total, 'tool': os.access('/var/task/bin/tool', os.X_OK)}\n"
)


def _text(size: int) -> bytes:
    """Random-ish text that deflates about 4x: far under the zip-bomb ratio, and no repeat in deflate's window."""
    block = os.urandom(256 << 10).translate(bytes(b"acgt \n"[i % 6] for i in range(256)))
    return (block * (size // len(block) + 1))[:size]


def _zip(entries: list[tuple[str, bytes, int]]) -> str:
    """``(name, data, unix mode)`` entries, deflated, as code_base64."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as archive:
        for name, data, mode in entries:
            info = zipfile.ZipInfo(name)
            info.external_attr = mode << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(info, data)
    return base64.b64encode(buffer.getvalue()).decode()


# ---------------------------------------------------------------- F3: big packages, the code cache


def test_f3_a_package_unpacking_over_the_frame_limit_runs_or_is_refused_never_a_500(api):
    """~70 MiB unpacked (over the 64 MiB frame) from a zip of ~20 MiB: it runs, with its exec bits."""
    chunk = _text(7 << 20)
    entries = [("app.py", WALK.encode(), 0o100644), ("bin/tool", b"#!/bin/sh\necho tool\n", 0o100755)]
    entries += [(f"data/part{i}.txt", chunk, 0o100644) for i in range(10)]
    name, resp = create(api, _zip(entries), "python3", "app.handler")
    assert resp.status_code < 500, resp.text
    if resp.status_code != 201:
        assert_problem(resp, resp.status_code)
        return
    out = api.post(f"/api/v1/functions/{name}/invoke", json={})
    assert out.status_code == 200, out.text
    assert out.json()["status"] == "succeeded", out.json()
    assert out.json()["output"] == {"files": 12, "bytes": sum(len(data) for _, data, _ in entries), "tool": True}


def test_f3_a_package_too_big_for_the_task_directory_is_refused_at_create(api):
    """Under 250 MB of content, but 9,000 files of 7 pages and a byte take 288 MiB of a 256 MiB tmpfs."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("main.py", MAIN)
        for i in range(9_000):
            archive.writestr(f"pad/{i}.bin", bytes(7 * 4096 + 1))
    name, resp = create(api, base64.b64encode(buffer.getvalue()).decode(), "python3", "main.handler")
    assert_problem(resp, 413, "/var/task")
    assert api.get(f"/api/v1/functions/{name}").status_code == 404


def test_f3_a_package_the_function_memory_cannot_unpack_is_refused(api):
    """/var/task is a tmpfs charged to the machine's memory: 80 MiB of files never unpack in 64 MiB."""
    chunk = b"".join(os.urandom(40) * 60 for _ in range((20 << 20) // 2400 + 1))[:20 << 20]  # deflates ~40x
    code = _zip([("main.py", MAIN.encode(), 0o100644)] + [(f"d/{i}.bin", chunk, 0o100644) for i in range(4)])
    name, resp = create(api, code, "python3", "main.handler", memory_mb=64)
    assert_problem(resp, 422, "memory_mb 64", "/var/task")
    assert api.get(f"/api/v1/functions/{name}").status_code == 404
    name, resp = create(api, code, "python3", "main.handler", memory_mb=256)
    assert resp.status_code == 201, resp.text
    assert_problem(api.put(f"/api/v1/functions/{name}", json={"memory_mb": 64}), 422, "memory_mb 64")
    assert api.get(f"/api/v1/functions/{name}").json()["memory_mb"] == 256


def test_f3_every_machine_task_directory_holds_what_create_lets_through(node):
    """The create-time limit is the machines' /var/task: bwrap's tmpfs, and the Firecracker guest's."""
    from nimbus import packages
    from nimbus.agent import init
    from nimbus.machines.base import MachineSpec

    for memory_mb in (64, 128, 10240):
        _, task_bytes = node.node.driver.tmpfs_bytes(MachineSpec("python3", memory_mb=memory_mb))
        assert task_bytes >= packages.TASK_DIR_BYTES
    assert init.DEFAULT_TASK_SIZE == f"{packages.TASK_DIR_BYTES >> 20}m"


def test_f3_the_code_cache_is_bounded_by_bytes(make_node, tmp_path):
    """With a 1 MiB code cache, a 1.5 MiB package still runs but is not kept; small ones are, within budget."""
    with make_node(tmp_path / "home", f"sqlite:///{tmp_path / 'nimbus.db'}", code_cache_mb=1) as running:
        cache = running.node.pool._code_loader.__self__
        with running.client() as api:
            big = [("main.py", MAIN.encode(), 0o100644), ("blob.txt", os.urandom(1536 << 10), 0o100644)]
            big_name, resp = create(api, _zip(big), "python3", "main.handler")
            assert resp.status_code == 201, resp.text
            big_sha = resp.json()["code_sha256"]
            assert invoke(api, big_name)["output"] == "ran"
            for _ in range(40):
                small = zipped({"main.py": MAIN, "pad.txt": os.urandom(40 << 10).hex()})
                name, resp = create(api, small, "python3", "main.handler")
                assert resp.status_code == 201, resp.text
                assert invoke(api, name)["output"] == "ran"
                assert cache.size <= cache.max_bytes == 1 << 20
            assert 0 < len(cache) < 40  # the oldest went
            assert big_sha not in cache  # and the one over the whole budget was never kept


# ---------------------------------------------------------------- F11: names that collide once normalised


@pytest.mark.parametrize("names", [
    ["main.py", "./main.py"],
    ["lib/util.py", "lib//util.py"],
    ["lib/util.py", "lib/./util.py"],
    ["lib", "lib/"],
    ["lib/", "lib"],
    ["lib", "lib/util.py"],
    ["lib/util.py", "lib"],
    ["lib/util.py/", "lib/util.py"],
])
def test_f11_zip_names_colliding_after_normalisation_are_refused(api, names):
    entries = [("main.py", MAIN.encode(), 0o100644)] if "main.py" not in names else []
    entries += [(n, b"" if n.endswith("/") else b"x = 1\n", 0o40755 if n.endswith("/") else 0o100644)
                for n in names]
    name, resp = create(api, _zip(entries), "python3", "main.handler")
    assert_problem(resp, 422, "duplicate", repr(names[1]))
    assert api.get(f"/api/v1/functions/{name}").status_code == 404


def test_f11_names_differing_only_in_case_are_different_files(api):
    files = {"main.py": "import A, a\ndef handler(event, context):\n    return [A.X, a.X]\n",
             "A.py": "X = 'upper'\n", "a.py": "X = 'lower'\n"}
    name, resp = create(api, zipped(files), "python3", "main.handler")
    assert resp.status_code == 201, resp.text
    assert invoke(api, name)["output"] == ["upper", "lower"]


# ---------------------------------------------------------------- next to F3/F11: entries zipfile cannot read


def _encrypted() -> bytes:
    data = bytearray(base64.b64decode(zipped({"main.py": MAIN, "secret.txt": "hello"})))
    local = data.index(b"PK\x03\x04", 4)  # secret.txt's local header, then its central one: "encrypted"
    central = data.index(b"PK\x01\x02", data.index(b"PK\x01\x02") + 4)
    data[local + 6] |= 1
    data[central + 8] |= 1
    return bytes(data)


def _corrupt_lzma() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("main.py", MAIN)
        archive.writestr("x.bin", bytes(range(256)) * 40, compress_type=zipfile.ZIP_LZMA)
    data = bytearray(buffer.getvalue())
    start = data.index(b"x.bin") + len("x.bin") + 9  # past the name, lzma's version and properties
    data[start:start + 40] = bytes(byte ^ 0x5A for byte in data[start:start + 40])
    return bytes(data)


@pytest.mark.parametrize("package", [_encrypted, _corrupt_lzma], ids=["encrypted", "corrupt-lzma"])
def test_an_entry_zipfile_cannot_read_is_a_422_not_a_500(api, package):
    name, resp = create(api, base64.b64encode(package()).decode(), "python3", "main.handler")
    assert_problem(resp, 422, "package")
    assert api.get(f"/api/v1/functions/{name}").status_code == 404
