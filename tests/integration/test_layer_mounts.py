"""Dependency layers: a machine sees its function's layer read-only at /opt/layer, and nothing else's.

Each test runs against template machines (the node clones the layer into a detached mount the child
attaches) and booted ones (bwrap binds it), since the two get there by different roads.
"""

import asyncio
import io
import json
import os
import uuid
import zipfile
from pathlib import Path

import pytest
import test_bwrap
from test_bwrap import _WHY_NOT, LONG, init_header

from nimbus.agent.contract import LAYER_DIR
from nimbus.errors import MachineStartError
from nimbus.machines.base import MachineSpec

driver = test_bwrap.driver  # each test on template and booted machines, as test_bwrap's

pytestmark = pytest.mark.sandbox
if _WHY_NOT:
    pytestmark = [pytest.mark.sandbox, pytest.mark.skip(reason=_WHY_NOT)]

# Imports a package of the layer, and a module both the layer and the function's own code have.
LAYERED_PY = '''
import errno, os
import layered_dep, shadowed

def _try(action):
    try:
        action()
        return "written"
    except OSError as exc:
        return errno.errorcode[exc.errno]

def _mount_options(path):
    for line in open("/proc/self/mountinfo"):
        fields = line.split()
        if fields[4] == path:
            return sorted(fields[5].split(","))
    return None

def handler(event, context=None):
    return {
        "dep": layered_dep.VALUE,
        "dep_file": layered_dep.__file__,
        "shadowed": shadowed.WHERE,
        "new_file": _try(lambda: open("/opt/layer/new.txt", "w").close()),
        "overwrite": _try(lambda: open(layered_dep.__file__, "a").close()),
        "mkdir": _try(lambda: os.mkdir("/opt/layer/__pycache__")),
        "read_only": bool(os.statvfs("/opt/layer").f_flag & os.ST_RDONLY),
        "options": _mount_options("/opt/layer"),
        "fds": sorted(os.listdir("/proc/self/fd")),
    }
'''

# What a function without a layer finds at /opt/layer.
NO_LAYER_PY = '''
import os

def handler(event, context=None):
    try:
        import layered_dep
        imported = layered_dep.__file__
    except ImportError:
        imported = None
    return {"listing": os.listdir("/opt/layer"), "read_only": bool(os.statvfs("/opt/layer").f_flag & os.ST_RDONLY),
            "create": _create(), "imported": imported, "fds": sorted(os.listdir("/proc/self/fd"))}

def _create():
    try:
        open("/opt/layer/x", "w").close()
        return "written"
    except OSError as exc:
        return exc.strerror
'''

LEFTPAD_JS = "module.exports = (s, n) => String(s).padStart(n, '.');\n"
# An ES-module package of the layer that imports a sibling package, as npm lays out node_modules flat.
SHOUT_PACKAGE = {"name": "shout", "type": "module", "exports": "./index.js"}
SHOUT_JS = "import leftpad from 'leftpad2';\nexport const shout = (s) => leftpad(s.toUpperCase(), 6);\n"

NODE_HANDLERS = {
    "cjs": ("index.js", (
        "const leftpad = require('leftpad2');\n"
        "exports.handler = async (e) => ({ padded: leftpad(e.s, 5), from: require.resolve('leftpad2'),\n"
        "  nodePath: process.env.NODE_PATH });\n")),
    "mjs": ("index.mjs", (
        "import leftpad from 'leftpad2';\nimport { shout } from 'shout';\n"
        "export const handler = async (e) => ({ padded: leftpad(e.s, 5), shouted: shout(e.s) });\n")),
    # A .js handler of a package with "type": "module", shipped as a zip.
    "type-module": ("package.zip", {
        "package.json": json.dumps({"type": "module"}),
        "index.js": ("import leftpad from 'leftpad2';\nimport { shout } from 'shout';\n"
                     "export const handler = async (e) => ({ padded: leftpad(e.s, 5), shouted: shout(e.s) });\n"),
    }),
}


def write_tree(root, files: dict) -> str:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text if isinstance(text, str) else json.dumps(text))
    return str(root)


def zipped(files: dict) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, text in files.items():
            archive.writestr(name, text)
    return buffer.getvalue()


@pytest.fixture
def python_layer(tmp_path) -> str:
    """A pip --target style layer, writable by anyone: only the mount can keep the function from writing."""
    root = tmp_path / "layers" / "py"
    write_tree(root, {"layered_dep/__init__.py": "VALUE = 'from-layer'\n", "shadowed.py": "WHERE = 'layer'\n"})
    for path in (root, root / "layered_dep"):
        path.chmod(0o777)
    for path in (root / "layered_dep" / "__init__.py", root / "shadowed.py"):
        path.chmod(0o666)
    return str(root)


@pytest.fixture
def node_layer(tmp_path) -> str:
    """The contents of a node_modules directory."""
    return write_tree(tmp_path / "layers" / "node", {
        "leftpad2/index.js": LEFTPAD_JS,
        "shout/package.json": SHOUT_PACKAGE,
        "shout/index.js": SHOUT_JS,
    })


async def init(machine, runtime: str, filename: str, code: bytes, **fields) -> dict:
    handler = "main.handler" if runtime == "python3" else "index.handler"
    header = init_header(runtime, handler=handler, filename=filename, **fields)
    reply, _ = await machine.request(header, code, timeout=LONG)
    return reply


async def call(machine, event) -> dict:
    header = {"type": "exec", "invocation_id": uuid.uuid4().hex, "deadline_ms": int(LONG * 1000)}
    reply, blob = await machine.request(header, json.dumps(event).encode(), timeout=LONG)
    assert reply["type"] == "result", reply
    return json.loads(blob)


def assert_forked_or_booted(driver, machine) -> None:
    """A template driver forks layered machines too (no silent fallback to booting on this host)."""
    expected = "TemplateMachine" if driver.templates_on else "BwrapMachine"
    assert type(machine).__name__ == expected, driver.templates_note


async def python_machine(driver, source: str, layer: str | None):
    machine = await driver.create(MachineSpec(runtime="python3", layer=layer))
    code = zipped({"main.py": source, "shadowed.py": "WHERE = 'task'\n"})
    extra = {"layer": LAYER_DIR} if layer is not None else {}
    reply = await init(machine, "python3", "package.zip", code, **extra)
    assert reply["type"] == "init_ok", reply
    return machine


# ---------------------------------------------------------------- python3


async def test_a_python_layer_is_importable_read_only_and_below_the_function(driver, python_layer):
    machine = await python_machine(driver, LAYERED_PY, python_layer)
    assert_forked_or_booted(driver, machine)
    seen = await call(machine, {})
    assert seen["dep"] == "from-layer" and seen["dep_file"] == "/opt/layer/layered_dep/__init__.py", seen
    assert seen["shadowed"] == "task", seen  # the function's own module wins over the layer's
    # The directory and files are world-writable on the host: the read-only mount is what refuses.
    assert seen["new_file"] == seen["overwrite"] == seen["mkdir"] == "EROFS", seen
    assert seen["read_only"], seen
    assert {"ro", "nosuid", "nodev"} <= set(seen["options"]), seen["options"]
    await machine.stop()
    assert sorted(os.listdir(python_layer)) == ["layered_dep", "shadowed.py"]


async def test_a_sibling_without_a_layer_sees_an_empty_read_only_opt_layer(driver, python_layer):
    layered = await python_machine(driver, LAYERED_PY, python_layer)
    plain = await python_machine(driver, NO_LAYER_PY, None)
    if driver.templates_on:
        assert layered.template is plain.template  # forked from the same template after the layered one
        # The layer was attached in the child's own mount namespace only, not in the template's.
        template_mounts = Path(f"/proc/{layered.template.pid}/mountinfo").read_text().splitlines()
        assert not [line for line in template_mounts if line.split()[4] == LAYER_DIR], template_mounts
    seen = await call(plain, {})
    assert seen["listing"] == [] and seen["imported"] is None, seen
    assert seen["read_only"] and seen["create"] == "Read-only file system", seen
    # The layered machine still has its layer, and no descriptor more than a machine without one.
    layered_seen = await call(layered, {})
    assert layered_seen["dep"] == "from-layer"
    assert len(layered_seen["fds"]) == len(seen["fds"]), (layered_seen["fds"], seen["fds"])
    await asyncio.gather(layered.stop(), plain.stop())


async def test_two_machines_get_their_own_layers(driver, tmp_path):
    layers = [write_tree(tmp_path / "layers" / name, {"layered_dep/__init__.py": f"VALUE = {name!r}\n",
                                                      "shadowed.py": "WHERE = 'layer'\n"}) for name in ("a", "b")]
    machines = [await python_machine(driver, LAYERED_PY, layer) for layer in layers]
    assert [(await call(m, {}))["dep"] for m in machines] == ["a", "b"]
    await asyncio.gather(*(m.stop() for m in machines))


async def test_the_node_keeps_no_descriptor_of_a_layer(driver, python_layer):
    warm = await python_machine(driver, NO_LAYER_PY, None)  # the template, if any, is running now
    before = len(os.listdir("/proc/self/fd"))
    machine = await python_machine(driver, LAYERED_PY, python_layer)
    await machine.kill()
    assert len(os.listdir("/proc/self/fd")) == before
    await warm.stop()


async def test_an_unusable_layer_is_a_start_error(driver, tmp_path):
    (tmp_path / "file").write_text("not a directory")
    for layer, why in ((str(tmp_path / "missing"), "does not exist"), (str(tmp_path / "file"), "not a directory"),
                       ("relative/layer", "not an absolute path")):
        with pytest.raises(MachineStartError, match=why):
            await driver.create(MachineSpec(runtime="python3", layer=layer))
    assert driver.machines == []


async def test_an_init_naming_another_layer_directory_is_refused(driver, python_layer):
    machine = await driver.create(MachineSpec(runtime="python3", layer=python_layer))
    reply = await init(machine, "python3", "main.py", b"def handler(e, c=None):\n    return 1\n", layer="/etc")
    assert reply["type"] == "error" and reply["error"]["type"] == "InvalidInit", reply
    await machine.kill()


# ---------------------------------------------------------------- nodejs


@pytest.mark.parametrize("style", list(NODE_HANDLERS))
async def test_a_node_layer_is_found_from_commonjs_and_es_modules(driver, node_layer, style):
    filename, source = NODE_HANDLERS[style]
    code = zipped(source) if isinstance(source, dict) else source.encode()
    machine = await driver.create(MachineSpec(runtime="nodejs", layer=node_layer))
    assert_forked_or_booted(driver, machine)
    reply = await init(machine, "nodejs", filename, code, layer=LAYER_DIR)
    assert reply["type"] == "init_ok", reply
    seen = await call(machine, {"s": "ab"})
    assert seen["padded"] == "...ab", seen
    if style == "cjs":
        assert seen["from"] == "/opt/layer/leftpad2/index.js" and seen["nodePath"] == LAYER_DIR, seen
    else:
        assert seen["shouted"] == "....AB", seen
    await machine.stop()


async def test_a_function_without_a_node_layer_cannot_require_one(driver, node_layer):
    layered = await driver.create(MachineSpec(runtime="nodejs", layer=node_layer))
    plain = await driver.create(MachineSpec(runtime="nodejs"))
    code = b"const leftpad = require('leftpad2');\nexports.handler = async () => 1;\n"
    reply = await init(plain, "nodejs", "index.js", code)
    assert reply["type"] == "error" and "leftpad2" in reply["error"]["message"], reply
    await asyncio.gather(layered.kill(), plain.kill())
