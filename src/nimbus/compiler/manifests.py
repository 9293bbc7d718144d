"""What a package asks of its dependency layer: its manifests, checked and re-emitted.

What a manifest may ask for is checked and re-emitted, so the resolvers never read the tenant's text:
``requirements.txt`` becomes canonical PEP 508 lines (no pip options such as ``-r /etc/shadow`` or
``--index-url``, no URLs or paths, no ``${VAR}``, which pip would expand); ``package.json`` becomes its
dependency sections only, each naming registry packages (a semver range, a dist-tag or an ``npm:``
alias; no ``file:``, ``link:``, git, gist or tarball URLs, no workspaces), and a lock file's entries
must be registry packages whose ``resolved``, when given, is under the configured registry. So a
manifest cannot read host files or the node's environment, or fetch from where the operator did not
configure. What the resolvers print is scrubbed of the node's environment values before a tenant sees it.

The layer is built from a ``LayerSpec`` by :mod:`nimbus.compiler.layers`.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import zipfile
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

from nimbus.errors import InvalidRequest
from nimbus.protocol import package_path

RECIPE = "layer-2"  # bump when the way a layer is made changes: every layer is then built anew
MANIFEST_MAX = 1 << 20
REQUIREMENTS = "requirements.txt"
PACKAGE_JSON = "package.json"
NODE_LOCKS = ("package-lock.json", "npm-shrinkwrap.json")
LAYERED_RUNTIMES = ("python3", "nodejs", "provided")
# Text in a canonical requirement that pip's requirement-file parser would act on: variables, comments,
# continuations, per-requirement options.
PIP_SIGNIFICANT = re.compile(r"[$#\\]|\s-")
NPM_DEPENDENCY_FIELDS = ("dependencies", "devDependencies", "optionalDependencies", "peerDependencies")
NPM_NAME = re.compile(r"^(?:@[a-z0-9~-][a-z0-9._~-]*/)?[a-z0-9~-][a-z0-9._~-]*$", re.IGNORECASE)
NPM_NAME_MAX = 214
NPM_SPEC_MAX = 256
# A dist-tag: npm reads a spec as a tag when it is no range, no URL, no path and no tarball file name.
NPM_TAG = re.compile(r"^[A-Za-z][A-Za-z0-9._-]{0,127}$")
NPM_FILE_SUFFIX = re.compile(r"\.(?:tgz|tar|tar\.gz)$", re.IGNORECASE)


@dataclass(frozen=True, slots=True)
class LayerSpec:
    """What a package asks for: the runtime and its manifest files (name, bytes) from the package root."""

    runtime: str
    files: tuple[tuple[str, bytes], ...]

    def key(self, platform_id: str) -> str:
        h = hashlib.sha256()
        for part in (self.runtime, platform_id, RECIPE):
            h.update(part.encode() + b"\0")
        for name, data in self.files:
            h.update(name.encode() + b"\0" + hashlib.sha256(data).digest())
        return h.hexdigest()

    @property
    def source_sha256(self) -> str:
        h = hashlib.sha256()
        for name, data in self.files:
            h.update(name.encode() + b"\0" + hashlib.sha256(data).digest())
        return h.hexdigest()


# ---------------------------------------------------------------------------- what a package asks for


def spec_of(runtime: str, package: bytes) -> LayerSpec | None:
    """The layer a zip package needs, checked and re-emitted; None when it declares no dependencies.

    The spec holds what the resolver will read: ``requirements.txt`` as canonical requirement lines,
    ``package.json`` as its checked dependency fields only; a lock file as it came (checked entry by
    entry; against the registry once the builder knows it, see :meth:`LayerBuilder.check`).
    """
    if runtime not in LAYERED_RUNTIMES:
        return None
    with zipfile.ZipFile(io.BytesIO(package)) as archive:
        # By the path an entry unpacks to, as the machine sees it: ``./requirements.txt`` is the manifest too.
        infos = {package_path(info.filename): info for info in archive.infolist() if not info.is_dir()}

        def read(name: str) -> bytes | None:
            info = infos.get(name)
            if info is None:
                return None
            if info.file_size > MANIFEST_MAX:
                raise InvalidRequest(f"{name} is {info.file_size} bytes; the limit is {MANIFEST_MAX}")
            return archive.read(info)

        def python() -> LayerSpec | None:
            data = read(REQUIREMENTS)
            lines = requirement_lines(data) if data is not None else []
            if not lines:
                return None
            return LayerSpec("python3", ((REQUIREMENTS, "".join(f"{line}\n" for line in lines).encode()),))

        def node() -> LayerSpec | None:
            data = read(PACKAGE_JSON)
            manifest = npm_manifest(data) if data is not None else {}
            if not manifest.get("dependencies"):
                return None
            files = [(PACKAGE_JSON, json.dumps(manifest, indent=2).encode() + b"\n")]
            for lock in NODE_LOCKS:
                lock_data = read(lock)
                if lock_data is not None:
                    check_npm_lock(lock, lock_data)
                    files.append((lock, lock_data))
                    break
            return LayerSpec("nodejs", tuple(files))

        if runtime == "python3":
            return python()
        if runtime == "nodejs":
            return node()
        # provided: a bootstrap in any language may use either resolver, as python3's or nodejs' layer (the
        # agent points PYTHONPATH and NODE_PATH at /opt/layer); one layer per function, so not both.
        specs = [spec for spec in (python(), node()) if spec is not None]
        if len(specs) > 1:
            raise InvalidRequest(f"a provided package may declare dependencies in {REQUIREMENTS} or in "
                                 f"{PACKAGE_JSON}, not both: a function has one layer; pick one")
        return specs[0] if specs else None


def requirement_lines(data: bytes) -> list[str]:
    """The requirements in a requirements.txt, each re-emitted canonically (a PEP 508 name with versions,
    extras and markers), so pip reads Nimbus's text, never the tenant's.

    Options (``-r``, ``-e``, ``--index-url``…) and direct references (URLs, paths) are refused: they
    would read host files or fetch from places the operator did not configure. So is ``${`` anywhere:
    pip expands ``${VAR}`` in requirement files from its environment.
    """
    from packaging.requirements import InvalidRequirement, Requirement

    try:
        text = data.decode()
    except UnicodeDecodeError:
        raise InvalidRequest(f"{REQUIREMENTS} is not UTF-8 text") from None
    lines, pending, start = [], "", 0
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split(" #", 1)[0].strip() if not raw.lstrip().startswith("#") else ""
        if not pending:
            start = number
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = (pending + line).strip(), ""
        if "${" in line or "${" in line.replace(" ", ""):
            raise InvalidRequest(f"{REQUIREMENTS} line {start}: ${{...}} (an environment variable) is not "
                                 "accepted; write the version out")
        if not line:
            continue
        if line.startswith("-"):
            raise InvalidRequest(f"{REQUIREMENTS} line {start}: pip options ({line.split()[0]}) are not "
                                 "accepted; list requirements only (name and version), the node's pip "
                                 "configuration says where packages come from")
        try:
            requirement = Requirement(line)
        except InvalidRequirement as exc:
            raise InvalidRequest(f"{REQUIREMENTS} line {start}: {line!r} is not a requirement: {exc}") from None
        if requirement.url:
            raise InvalidRequest(f"{REQUIREMENTS} line {start}: {requirement.name} names a URL or path; only "
                                 "packages from the node's package index are accepted")
        canonical = str(requirement)
        if PIP_SIGNIFICANT.search(canonical):
            raise InvalidRequest(f"{REQUIREMENTS} line {start}: {line!r} holds text pip would read as an "
                                 "option, a comment or a variable ('$', '#', '\\' or ' -'); only names, "
                                 "versions, extras and markers are accepted")
        lines.append(canonical)
    if pending.strip():
        raise InvalidRequest(f"{REQUIREMENTS} line {start}: the file ends in a line continuation")
    return lines


def npm_dependencies(data: bytes) -> dict[str, str]:
    """A package.json's ``dependencies`` (what a machine needs), after checking the whole manifest."""
    return npm_manifest(data).get("dependencies", {})


def npm_manifest(data: bytes) -> dict:
    """The package.json npm will see: only the checked fields of the tenant's, re-emitted.

    Every dependency section must name registry packages (a semver range, a dist-tag, or an ``npm:``
    alias of a valid package name); ``workspaces`` are refused; everything else (scripts, config,
    publishConfig…) is left out, so it never reaches npm.
    """
    try:
        manifest = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidRequest(f"{PACKAGE_JSON} is not valid JSON: {exc}") from None
    if not isinstance(manifest, dict):
        raise InvalidRequest(f"{PACKAGE_JSON} must be a JSON object")
    if "workspaces" in manifest:
        raise InvalidRequest(f"{PACKAGE_JSON}: workspaces are not accepted; a function's dependencies come "
                             "from the npm registry only")
    out: dict = {}
    name, version = manifest.get("name"), manifest.get("version")
    if isinstance(name, str) and valid_npm_name(name):
        out["name"] = name
    if isinstance(version, str) and _semver(version):
        out["version"] = version
    out.update((field, deps) for field, deps in _dependency_sections(PACKAGE_JSON, manifest).items() if deps)
    meta = manifest.get("peerDependenciesMeta")
    if meta is not None:
        if not isinstance(meta, dict) or not all(
                isinstance(v, dict) and set(v) <= {"optional"} and all(isinstance(o, bool) for o in v.values())
                for v in meta.values()):
            raise InvalidRequest(f"{PACKAGE_JSON}: peerDependenciesMeta must map names to {{\"optional\": true}}")
        for dep in meta:
            _check_npm_name(f"{PACKAGE_JSON} peerDependenciesMeta", dep)
        if meta:
            out["peerDependenciesMeta"] = meta
    for field in ("bundleDependencies", "bundledDependencies"):  # a packing matter: checked, not passed on
        bundled = manifest.get(field)
        if bundled is None or isinstance(bundled, bool):
            continue
        if not isinstance(bundled, list):
            raise InvalidRequest(f"{PACKAGE_JSON}: {field} must be a list of package names")
        for dep in bundled:
            _check_npm_name(f"{PACKAGE_JSON} {field}", dep)
    overrides = manifest.get("overrides")
    if overrides is not None:
        if not isinstance(overrides, dict):
            raise InvalidRequest(f"{PACKAGE_JSON}: overrides must be an object")
        _check_overrides(overrides, "")
        if overrides:
            out["overrides"] = overrides
    return out


def valid_npm_name(name: str) -> bool:
    """npm's documented package-name rules (``validate-npm-package-name``): URL-safe, at most 214
    characters, not starting with ``.`` or ``_``; capitals are allowed, as old packages have them."""
    return (isinstance(name, str) and len(name) <= NPM_NAME_MAX and bool(NPM_NAME.match(name))
            and name.lower() not in ("node_modules", "favicon.ico"))


def _semver(text: str) -> bool:
    from semantic_version import Version

    try:
        Version(text)
    except ValueError:
        return False
    return True


def _range_or_tag(text: str) -> bool:
    """True for an npm semver range (``^1.2``, ``1.x || >=3``, ``*``) or a dist-tag (``latest``)."""
    from semantic_version import NpmSpec

    if NPM_TAG.match(text) and not NPM_FILE_SUFFIX.search(text):
        return True
    try:
        NpmSpec(text)
    except ValueError:
        return False
    return True


def _check_npm_name(where: str, name) -> None:
    if not valid_npm_name(name):
        raise InvalidRequest(f"{where}: {name!r} is not a valid npm package name")


def _check_npm_spec(where: str, name: str, spec) -> None:
    if not isinstance(spec, str):
        raise InvalidRequest(f"{where}: {name!r} must map to a version string")
    if _registry_spec(spec):
        return
    raise InvalidRequest(f"{where}: {name!r} is {spec!r}; only packages from the npm registry are accepted "
                         "(a semver range, a dist-tag or npm:<name>@<range>; no files, links, git, gists "
                         "or tarball URLs)")


def _registry_spec(spec: str) -> bool:
    """A spec npm resolves from the registry: a range or tag, or an ``npm:`` alias of a valid name."""
    if len(spec) > NPM_SPEC_MAX:
        return False
    if spec.startswith("npm:"):
        target = spec[4:]
        at = target.find("@", 1)  # a scoped name starts with @
        alias, version = (target, "") if at < 0 else (target[:at], target[at + 1:])
        return valid_npm_name(alias) and _range_or_tag(version.strip())
    return _range_or_tag(spec.strip())


def _check_overrides(overrides: dict, path: str) -> None:
    """npm ``overrides``: selectors (``name`` or ``name@range``, ``.`` for the package itself) mapping to a
    spec, a ``$name`` reference to a direct dependency, or a nested object of the same."""
    for selector, value in overrides.items():
        where = f"{PACKAGE_JSON} overrides{path}"
        if selector != ".":
            at = selector.find("@", 1)
            base, version = (selector, None) if at < 0 else (selector[:at], selector[at + 1:])
            _check_npm_name(where, base)
            if version is not None and not _range_or_tag(version):
                raise InvalidRequest(f"{where}: {selector!r} selects no registry version")
        if isinstance(value, dict):
            _check_overrides(value, f"{path} > {selector}")
        elif isinstance(value, str) and value.startswith("$"):
            _check_npm_name(where, value[1:])
        else:
            _check_npm_spec(where, selector, value)


def _dependency_sections(where: str, holder: dict) -> dict[str, dict]:
    """The dependency sections of a package.json or a lock entry, by field, every name and spec checked."""
    sections = {}
    for field in NPM_DEPENDENCY_FIELDS:
        deps = holder.get(field)
        if deps is None:
            continue
        if not isinstance(deps, dict):
            raise InvalidRequest(f"{where}: {field} must be an object of name → version")
        for dep, spec in deps.items():
            _check_npm_name(f"{where} {field}", dep)
            _check_npm_spec(f"{where} {field}", dep, spec)
        sections[field] = deps
    return sections


def check_npm_lock(name: str, data: bytes, registry: str | None = None) -> None:
    """Refuse a lock file that installs anything from outside the registry, or links to host paths.

    Without ``registry`` (when the package arrives) the entries' shape is checked; with it (before
    every resolve, :meth:`LayerBuilder.check`) every ``resolved`` must also be under that registry.
    Nothing is rewritten: npm reads the lock as the tenant wrote it.
    """
    try:
        lock = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidRequest(f"{name} is not valid JSON: {exc}") from None
    if (not isinstance(lock, dict) or not isinstance(lock.get("packages"), dict)
            or lock.get("lockfileVersion") not in (2, 3)):
        raise InvalidRequest(f"{name} must be an npm lock file (lockfileVersion 2 or 3, with \"packages\")")
    for path, entry in lock["packages"].items():
        if not isinstance(entry, dict):
            raise InvalidRequest(f"{name}: entry {path!r} must be an object")
        if path and not _lock_path(path):
            raise InvalidRequest(f"{name}: {path!r} is a local package (workspace or file:); only registry "
                                 "packages are accepted")
        if entry.get("link"):
            raise InvalidRequest(f"{name}: {path!r} is a link; only registry packages are accepted")
        if "workspaces" in entry:
            raise InvalidRequest(f"{name}: {path or 'the root'!r} has workspaces; they are not accepted")
        if path:
            version = entry.get("version")
            if not isinstance(version, str) or not _semver(version):
                raise InvalidRequest(f"{name}: {path!r} has version {version!r}; only registry versions "
                                     "(x.y.z) are accepted")
            if "name" in entry:
                _check_npm_name(f"{name} {path!r}", entry["name"])
        elif "resolved" in entry:
            raise InvalidRequest(f"{name}: the root entry cannot be resolved from anywhere")
        _check_resolved(name, path, entry.get("resolved"), registry)
        _dependency_sections(f"{name} {path!r}", entry)
    _check_legacy_lock(name, lock.get("dependencies") or {}, registry)


def _lock_path(path: str) -> bool:
    parts = path.split("/node_modules/")
    if not parts[0].startswith("node_modules/"):
        return False
    parts[0] = parts[0][len("node_modules/"):]
    return all(valid_npm_name(part) for part in parts)


def _check_resolved(name: str, path: str, resolved, registry: str | None) -> None:
    if resolved is None:
        return  # npm fetches name@version from --registry
    ok = isinstance(resolved, str) and resolved.startswith(("https://", "http://"))
    if ok and registry is not None:
        ok = under_registry(resolved, registry)
    if not ok:
        where = f"the configured registry {registry}" if registry else "an npm registry"
        raise InvalidRequest(f"{name}: {path!r} resolves to {resolved!r}; only tarballs from {where} are "
                             "accepted (or leave \"resolved\" out)")


def _check_legacy_lock(name: str, deps, registry: str | None, path: str = "dependencies") -> None:
    """The ``dependencies`` tree lockfileVersion 2 keeps for old npm versions: the same rules."""
    if not isinstance(deps, dict):
        raise InvalidRequest(f"{name}: {path} must be an object")
    for dep, entry in deps.items():
        where = f"{path} > {dep}"
        if not isinstance(entry, dict):
            raise InvalidRequest(f"{name}: {where!r} must be an object")
        _check_npm_name(f"{name} {where!r}", dep)
        version = entry.get("version")
        alias = version[4:].rpartition("@") if isinstance(version, str) and version.startswith("npm:") else None
        if not isinstance(version, str) or not (
                _semver(version) or (alias and valid_npm_name(alias[0]) and _semver(alias[2]))):
            raise InvalidRequest(f"{name}: {where!r} has version {version!r}; only registry versions are accepted")
        _check_resolved(name, where, entry.get("resolved"), registry)
        _check_legacy_lock(name, entry.get("dependencies") or {}, registry, where)


def under_registry(url: str, registry: str) -> bool:
    """True when ``url`` is on ``registry``'s scheme, host and port, under its path (no ``..``, no userinfo)."""
    try:
        u, r = urlsplit(url), urlsplit(registry)
        port_u, port_r = u.port, r.port
    except ValueError:
        return False
    if (u.scheme, u.hostname, port_u) != (r.scheme, r.hostname, port_r) or u.username or u.password:
        return False
    segments = unquote(u.path).split("/")
    if ".." in segments or "." in segments or "\\" in unquote(u.path):
        return False
    return u.path.startswith(r.path.rstrip("/") + "/")
