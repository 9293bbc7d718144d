"""The host's rules for the `provided` runtime (issue 23): names, handlers, code forms, packages, layers, Init.

A custom runtime's package holds an executable ``bootstrap`` at its root, or the function is that one
file (a script, or a prebuilt binary sent byte for byte); its handler names no file; a requirements.txt
or a package.json (not both) resolves to python3's or nodejs' kind of layer.
"""

import asyncio
import base64
import io
import stat
import zipfile

import pytest

from nimbus import packages, protocol, runtimes
from nimbus.compiler import manifests
from nimbus.config import Settings
from nimbus.deployment import Deployment
from nimbus.errors import InvalidRequest
from nimbus.gateway import functions
from nimbus.gateway.schemas import FunctionCreate, FunctionUpdate
from nimbus.pool import loading

SCRIPT = "#!/bin/sh\nset -eu\nwhile true; do sleep 1; done\n"
ELF = b"\x7fELF\x02\x01\x01\x00" + bytes(range(256)) * 64  # not UTF-8, holds every byte value


def zip_of(files: dict[str, bytes | str], modes: dict[str, int] | None = None) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in files.items():
            info = zipfile.ZipInfo(name)
            info.external_attr = ((modes or {}).get(name, 0o644) | stat.S_IFREG) << 16
            archive.writestr(info, data)
    return buffer.getvalue()


# ---------------------------------------------------------------- the registry


@pytest.mark.parametrize("name", ["provided", "provided.al2", "provided.al2023", "PROVIDED.AL2023", " Provided.al2 "])
def test_provided_and_its_aliases_name_one_runtime(name):
    assert runtimes.normalise(name) == "provided"


@pytest.mark.parametrize("name", ["provided.al3", "provided.al2023x", "provided.", "providedal2", "custom"])
def test_near_misses_are_unknown_runtimes(name):
    with pytest.raises(InvalidRequest, match="provided"):
        runtimes.normalise(name)


def test_provided_is_not_built_and_its_one_file_is_the_bootstrap():
    rt = runtimes.get("provided")
    assert not rt.compiled
    assert rt.default_handler == "function.handler"
    for handler in ("function.handler", "bootstrap", "a/b.c"):
        assert rt.machine_filename(handler) == "bootstrap"
    assert runtimes.get("python3").machine_filename("app.handler") == "app.py"  # the others as before


PROVIDED_ACCEPTED = ["bootstrap", "function.handler", "not.used", "main", "my-fn", "x.y.z", "pkg/cmd:run",
                     "index.$handler", "Handler_1", "a" * 128, "lib/app.handler"]
PROVIDED_REFUSED = ["-x", ".hidden", "/abs", "../x", "lib/../x", "lib//x", "lib/.env", "a b", "a\tb",
                    "a\nb", "bootstrap\n", "a\\b", "a\0b", "a;b", "$(id)", "`id`", "a'b", 'a"b', "a|b", "a" * 129,
                    "ü", "lib/", "x/-y"]


@pytest.mark.parametrize("handler", PROVIDED_ACCEPTED)
def test_provided_takes_free_form_handlers(handler):
    assert functions._handler(handler, "provided") == handler
    assert FunctionCreate(name="fn", runtime="provided", code="x", handler=handler).handler == handler


@pytest.mark.parametrize("handler", PROVIDED_REFUSED)
def test_provided_refuses_unsafe_handlers(handler):
    with pytest.raises(InvalidRequest, match="provided runtime"):
        functions._handler(handler, "provided")


@pytest.mark.parametrize("handler", ["bootstrap", "not.used", "x.y-z"])
def test_other_runtimes_keep_module_function_handlers(handler):
    if handler != "not.used":  # module.function already
        with pytest.raises(InvalidRequest, match="module.function"):
            functions._handler(handler, "python3")
    assert FunctionUpdate(handler=handler).handler == handler  # the schema lets both kinds through


def test_the_default_handler_is_used_when_none_is_given():
    assert functions._handler(None, "provided") == "function.handler"


# ---------------------------------------------------------------- single-file code


def test_source_text_is_the_bootstrap():
    body = FunctionCreate(name="fn", runtime="provided", code=SCRIPT)
    code = functions._source(body, "provided")
    assert code == SCRIPT.encode()
    asyncio.run(functions._check_code("provided", code, "bootstrap", 128))
    assert functions._code_kind(code, "provided") == "source"


def test_a_binary_bootstrap_is_kept_byte_exact():
    body = FunctionCreate(name="fn", runtime="provided", code_base64=base64.b64encode(ELF).decode())
    code = functions._source(body, "provided")
    assert code == ELF
    asyncio.run(functions._check_code("provided", code, "bootstrap", 128))
    assert functions._code_kind(code, "provided") == "executable"
    # Other interpreted runtimes still refuse binaries that are not packages.
    with pytest.raises(InvalidRequest, match="UTF-8"):
        functions._source(FunctionCreate(name="fn", runtime="python3", code_base64=body.code_base64), "python3")


def test_an_empty_bootstrap_is_refused():
    with pytest.raises(InvalidRequest, match="empty"):
        asyncio.run(functions._check_code("provided", b"  \n", "bootstrap", 128))


def test_a_bootstrap_the_memory_cannot_hold_is_refused():
    big = b"\x7fELF" + bytes(40 << 20)
    packages.check_bootstrap(big, 128)
    with pytest.raises(InvalidRequest, match="memory_mb 64"):
        packages.check_bootstrap(big, 64)


def test_source_over_the_text_limit_is_refused_but_binaries_get_the_artifact_limit():
    from nimbus.errors import PayloadTooLarge

    with pytest.raises(PayloadTooLarge):
        functions._source(FunctionCreate(name="fn", runtime="provided", code="#" * (functions.SOURCE_MAX + 1)),
                          "provided")
    binary = b"\xff" * (functions.SOURCE_MAX + 1)
    body = FunctionCreate(name="fn", runtime="provided", code_base64=base64.b64encode(binary).decode())
    assert functions._source(body, "provided") == binary


# ---------------------------------------------------------------- packages


@pytest.mark.parametrize("mode", [0o755, 0o644])
def test_a_package_with_a_bootstrap_at_its_root_passes_whatever_its_mode(mode):
    data = zip_of({"bootstrap": SCRIPT, "lib/helper.sh": "echo hi\n"}, {"bootstrap": mode})
    found = packages.check(data, "provided", "function.handler", memory_mb=128)
    assert found.handler_file == "bootstrap"
    tree = dict((name, kind) for name, kind, _ in protocol.decode_tree(packages.to_machine(data)))
    assert tree["bootstrap"] == ("x" if mode & 0o111 else "")


def test_a_package_without_a_bootstrap_says_what_its_top_level_holds():
    data = zip_of({"src/bootstrap": SCRIPT, "main.go": "package main\n", "README": "x"})
    with pytest.raises(InvalidRequest) as caught:
        packages.check(data, "provided", "bootstrap")
    message = str(caught.value)
    assert "'bootstrap' at its top level" in message
    assert "README, main.go, src/" in message, message


def test_a_bootstrap_directory_is_not_a_bootstrap():
    data = zip_of({"bootstrap/run": SCRIPT})
    with pytest.raises(InvalidRequest, match="top level has bootstrap/"):
        packages.check(data, "provided", "bootstrap")


def test_provided_packages_get_every_zip_check():
    with pytest.raises(InvalidRequest, match="'..' component"):
        packages.check(zip_of({"bootstrap": SCRIPT, "../evil": "x"}), "provided", "bootstrap")
    with pytest.raises(InvalidRequest, match="symbolic link"):
        packages.check(zip_of({"bootstrap": "/bin/sh"}, {"bootstrap": stat.S_IFLNK | 0o777}), "provided",
                       "bootstrap")


def test_the_loading_path_names_the_file():
    def dep(package: bool) -> Deployment:
        return Deployment(version_id="v", function_id="f", function_name="fn", version=1, runtime="provided",
                          handler="function.handler", env={}, memory_mb=128, timeout_s=3, concurrency=1,
                          code_sha256="0" * 64, package=package)

    assert loading._filename(dep(False), ELF) == "bootstrap"
    tree = packages.to_machine(zip_of({"bootstrap": SCRIPT}))
    assert loading._filename(dep(True), tree) == protocol.TREE_FILENAME


# ---------------------------------------------------------------- layers


def test_requirements_make_a_python_layer_and_package_json_a_node_one():
    python = manifests.spec_of("provided", zip_of({"bootstrap": SCRIPT, "requirements.txt": "requests==2.32.3\n"}))
    assert python is not None and python.runtime == "python3"
    assert python.files == manifests.spec_of("python3", zip_of({"main.py": "", "requirements.txt":
                                                                "requests==2.32.3\n"})).files
    node = manifests.spec_of("provided", zip_of({"bootstrap": SCRIPT,
                                                 "package.json": '{"dependencies": {"left-pad": "1.3.0"}}'}))
    assert node is not None and node.runtime == "nodejs"
    assert manifests.spec_of("provided", zip_of({"bootstrap": SCRIPT, "package.json": "{}"})) is None
    assert manifests.spec_of("provided", zip_of({"bootstrap": SCRIPT})) is None


def test_both_manifests_are_refused():
    data = zip_of({"bootstrap": SCRIPT, "requirements.txt": "requests\n",
                   "package.json": '{"dependencies": {"left-pad": "1.3.0"}}'})
    with pytest.raises(InvalidRequest, match="pick one"):
        manifests.spec_of("provided", data)


def test_a_provided_manifest_is_checked_as_strictly():
    with pytest.raises(InvalidRequest):
        manifests.spec_of("provided", zip_of({"bootstrap": SCRIPT, "requirements.txt": "--index-url http://x\n"}))


# ---------------------------------------------------------------- the node's settings


def test_pre_warmed_runtimes_are_named_by_their_canonical_id(tmp_path):
    settings = Settings(home=tmp_path, runtimes="python3.12, provided.al2023, provided, nodejs")
    assert settings.runtimes == ["python3", "provided", "nodejs"]
