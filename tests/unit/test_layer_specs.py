"""What a package's manifest may ask a layer for, and how a layer is keyed, packed and unpacked."""

import asyncio
import hashlib
import io
import json
import re
import tarfile
import zipfile

import pytest

from nimbus.compiler import layers, manifests
from nimbus.errors import InvalidRequest, Unavailable


def zipped(files: dict[str, str]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def test_requirements_lines_join_continuations_and_drop_comments():
    text = b"# top\nsix==1.16.0  # pinned\n\nrequests[socks] >=2, <3 ; python_version >= '3.8'\nattrs \\\n  >=23\n"
    assert manifests.requirement_lines(text) == [
        "six==1.16.0", 'requests[socks]<3,>=2; python_version >= "3.8"', "attrs>=23"]


@pytest.mark.parametrize(("line", "words"), [
    ("-r /etc/shadow", "pip options (-r)"),
    ("--requirement=/etc/shadow", "pip options"),
    ("-e git+https://x/y.git#egg=y", "pip options (-e)"),
    ("--extra-index-url http://evil/simple", "pip options"),
    ("-c /etc/passwd", "pip options (-c)"),
    ("y @ https://evil.example/y.whl", "URL or path"),
    ("./local/dir", "not a requirement"),
    ("six===", "not a requirement"),
])
def test_requirements_options_urls_and_paths_are_refused(line, words):
    with pytest.raises(InvalidRequest) as info:
        manifests.requirement_lines(f"six\n{line}\n".encode())
    assert words in str(info.value) and "line 2" in str(info.value)


def test_requirements_must_be_utf8():
    with pytest.raises(InvalidRequest, match="UTF-8"):
        manifests.requirement_lines(b"\xff\xfe")


def test_spec_of_finds_the_manifest_at_the_package_root_only():
    assert manifests.spec_of("python3", zipped({"app.py": "", "sub/requirements.txt": "six\n"})) is None
    assert manifests.spec_of("python3", zipped({"app.py": "", "requirements.txt": "# none\n"})) is None
    spec = manifests.spec_of("python3", zipped({"app.py": "", "requirements.txt": "six\n"}))
    assert spec.runtime == "python3" and spec.files == (("requirements.txt", b"six\n"),)
    assert manifests.spec_of("go", zipped({"requirements.txt": "six\n"})) is None
    assert manifests.spec_of("nodejs", zipped({"index.js": "", "package.json": '{"name": "x"}'})) is None
    assert manifests.spec_of("nodejs", zipped({"index.js": "", "package.json": '{"devDependencies": {"a": "1"}}'})) is None


def test_spec_of_finds_a_manifest_named_as_the_machine_will_see_it():
    # ./requirements.txt unpacks to /var/task/requirements.txt: a package must not dodge its layer that way.
    for name in ("./requirements.txt", ".//requirements.txt"):
        spec = manifests.spec_of("python3", zipped({"app.py": "", name: "six\n"}))
        assert spec is not None and spec.files == (("requirements.txt", b"six\n"),), name
    spec = manifests.spec_of("nodejs", zipped({"index.js": "", "./package.json": '{"dependencies": {"is-number": "7"}}'}))
    assert spec is not None and spec.files[0][0] == "package.json"


def test_node_spec_takes_the_lock_file_beside_package_json():
    pkg = '{"dependencies": {"ms": "^2.1.0", "alias": "npm:left-pad@1.3.0", "@scope/pkg": "latest"}}'
    lock = json.dumps({"lockfileVersion": 3, "packages": {"": {}, "node_modules/ms": {
        "version": "2.1.3", "resolved": "https://registry.npmjs.org/ms/-/ms-2.1.3.tgz"}}})
    spec = manifests.spec_of("nodejs", zipped({"index.js": "", "package.json": pkg, "package-lock.json": lock}))
    assert [name for name, _ in spec.files] == ["package.json", "package-lock.json"]


@pytest.mark.parametrize("value", ["file:../x", "link:/etc", "git+ssh://git@h/x.git", "github:user/repo",
                                   "https://example.com/x.tgz", "user/repo", "/abs/path", "./rel", "~/home"])
def test_npm_dependencies_outside_the_registry_are_refused(value):
    with pytest.raises(InvalidRequest, match="only packages from the npm registry"):
        manifests.npm_dependencies(json.dumps({"dependencies": {"x": value}}).encode())


def test_npm_overrides_are_checked_too():
    with pytest.raises(InvalidRequest, match="overrides"):
        manifests.npm_dependencies(json.dumps({"dependencies": {"a": "1"}, "overrides": {"b": {"c": "file:/x"}}}).encode())


@pytest.mark.parametrize(("entry", "words"), [
    ({"node_modules/x": {"version": "1.0.0", "resolved": "file:/etc"}}, "only tarballs from an npm registry"),
    ({"node_modules/x": {"link": True, "resolved": "../x"}}, "is a link"),
    ({"packages/local": {"version": "1.0.0"}}, "local package"),
    ({"node_modules/x": "nope"}, "must be an object"),
])
def test_lock_files_that_leave_the_registry_are_refused(entry, words):
    with pytest.raises(InvalidRequest, match=words):
        manifests.check_npm_lock("package-lock.json",
                              json.dumps({"lockfileVersion": 3, "packages": {"": {}, **entry}}).encode())


REGISTRY = "https://registry.example/npm/"


@pytest.mark.parametrize(("resolved", "ok"), [
    ("https://registry.example/npm/ms/-/ms-2.1.3.tgz", True),
    ("https://registry.example/npm/@scope/x/-/x-1.0.0.tgz", True),
    ("https://registry.example/other/ms/-/ms-2.1.3.tgz", False),  # the host, but not the registry's path
    ("https://registry.example/npm/../other/ms.tgz", False),
    ("https://registry.example/npm/%2e%2e/other/ms.tgz", False),
    ("https://registry.example:8443/npm/ms.tgz", False),
    ("http://registry.example/npm/ms.tgz", False),
    ("https://user:pw@registry.example/npm/ms.tgz", False),
    ("https://registry.example.evil/npm/ms.tgz", False),
    ("https://127.0.0.1/npm/ms.tgz", False),
])
def test_lock_entries_must_resolve_under_the_configured_registry(resolved, ok):
    lock = json.dumps({"lockfileVersion": 3, "packages": {"": {}, "node_modules/ms": {
        "version": "2.1.3", "resolved": resolved}}}).encode()
    manifests.check_npm_lock("package-lock.json", lock)  # the shape is fine either way
    if ok:
        manifests.check_npm_lock("package-lock.json", lock, REGISTRY)
    else:
        with pytest.raises(InvalidRequest, match="only tarballs from the configured registry"):
            manifests.check_npm_lock("package-lock.json", lock, REGISTRY)


@pytest.mark.parametrize(("lock", "words"), [
    ({"lockfileVersion": 1, "dependencies": {"x": {"version": "https://evil/x.tgz"}}}, "lockfileVersion 2 or 3"),
    ({"lockfileVersion": 2, "packages": {"": {}}, "dependencies": {"x": {"version": "git+https://h/x.git"}}},
     "only registry versions"),
    ({"lockfileVersion": 3, "packages": {"": {"workspaces": ["a"]}}}, "workspaces"),
    ({"lockfileVersion": 3, "packages": {"": {}, "node_modules/x": {"version": "github:u/x"}}}, "registry versions"),
    ({"lockfileVersion": 3, "packages": {"": {}, "node_modules/x": {"version": "1.0.0",
                                                                    "dependencies": {"y": "gist:1"}}}}, "gist:1"),
    ({"lockfileVersion": 3, "packages": {"": {}, "node_modules/../../x": {"version": "1.0.0"}}}, "local package"),
])
def test_lock_files_are_checked_entry_by_entry(lock, words):
    with pytest.raises(InvalidRequest, match=re.escape(words)):
        manifests.check_npm_lock("package-lock.json", json.dumps(lock).encode())


@pytest.mark.parametrize("spec", ["2.1.3", "^1.2.3", "~1.2", "1.x", "*", "", ">=1.0.0 <2", "1.0.0 - 2.0.0",
                                  "^1 || ^2", "latest", "next", "npm:left-pad@1.3.0", "npm:@scope/x@^1",
                                  "npm:left-pad"])
def test_registry_specs_are_accepted(spec):
    assert manifests.npm_dependencies(json.dumps({"dependencies": {"x": spec}}).encode()) == {"x": spec}


def test_requirements_are_re_emitted_and_refuse_environment_variables():
    spec = manifests.spec_of("python3", zipped({"app.py": "", "requirements.txt": "# c\nSix >= 1.0 # pinned\n"}))
    assert spec.files == (("requirements.txt", b"Six>=1.0\n"),)
    for text in ("six===${HOME}\n", "six===$\\\n{HOME}\n", "six; extra == '${HOME}'\n"):
        with pytest.raises(InvalidRequest, match=re.escape("${")):
            manifests.requirement_lines(text.encode())
    for text in ("six===$HOME\n", "six; extra == 'a -r b'\n", "six; extra == 'a#b'\n"):
        with pytest.raises(InvalidRequest, match="option, a comment or a variable"):
            manifests.requirement_lines(text.encode())


def test_the_key_covers_runtime_platform_and_every_manifest_byte():
    spec = manifests.LayerSpec("python3", (("requirements.txt", b"six\n"),))
    key = spec.key("python3.11 x86_64 glibc-2.36")
    assert key == spec.key("python3.11 x86_64 glibc-2.36")
    assert key != spec.key("python3.12 x86_64 glibc-2.36")
    assert key != manifests.LayerSpec("python3", (("requirements.txt", b"six\n\n"),)).key("python3.11 x86_64 glibc-2.36")
    assert key != manifests.LayerSpec("nodejs", spec.files).key("python3.11 x86_64 glibc-2.36")


def test_pack_is_deterministic_and_unpacks_through_layer_dirs(tmp_path):
    tree = tmp_path / "tree"
    (tree / "pkg").mkdir(parents=True)
    (tree / "pkg" / "__init__.py").write_text("X = 1\n")
    (tree / "mod.py").write_text("Y = 2\n")
    first, second = layers.pack(tree), layers.pack(tree)
    assert first == second
    with tarfile.open(fileobj=io.BytesIO(first)) as tar:
        assert sorted(tar.getnames()) == ["mod.py", "pkg", "pkg/__init__.py"]
        assert {m.uid for m in tar.getmembers()} == {0}
    sha = hashlib.sha256(first).hexdigest()
    fetched = []

    async def fetch(key: str) -> bytes:
        fetched.append(key)
        await asyncio.sleep(0.01)
        return first

    dirs = layers.LayerDirs(tmp_path / "home", fetch)

    async def both():
        return await asyncio.gather(dirs.path(sha), dirs.path(sha))

    paths = asyncio.run(both())
    assert paths[0] == paths[1] and fetched == [sha]  # unpacked once for two callers
    assert (tmp_path / "home" / "layers" / sha / "pkg" / "__init__.py").read_text() == "X = 1\n"
    assert asyncio.run(dirs.path(sha)) == paths[0] and fetched == [sha]
    image = tmp_path / "home" / "layers" / f"{sha}.ext4"  # the firecracker driver's image of it
    image.write_bytes(b"ext4")
    assert dirs.prune({sha}) == 0 and image.exists()
    assert dirs.prune(set()) == 1
    assert not (tmp_path / "home" / "layers" / sha).exists() and not image.exists()


def test_a_layer_whose_bytes_do_not_match_its_hash_is_not_unpacked(tmp_path):
    async def fetch(key: str) -> bytes:
        return b"tampered"

    with pytest.raises(Unavailable, match="does not match"):
        asyncio.run(layers.LayerDirs(tmp_path, fetch).path("0" * 64))
