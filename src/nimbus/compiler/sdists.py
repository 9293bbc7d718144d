"""Source distributions built in the builder sandbox: what the sandboxed pip is given.

:mod:`nimbus.compiler.layers` decides *when* pip runs in the sandbox (the wheel-only resolve on the host
failed); this module is *what* it runs with there: the stdlib forwarder script that relays
``127.0.0.1:<port>`` to the egress proxy's socket (:mod:`nimbus.compiler.egress`) before running pip,
and the pip config written from the node's own, with index credentials dropped and local indexes,
find-links and constraints bound read-only at neutral paths.
"""

from __future__ import annotations

import ast
import importlib.util
import os
from pathlib import Path
from urllib.parse import quote, unquote, urlsplit, urlunsplit

from nimbus.compiler.egress import allowed_targets
from nimbus.compiler.sandbox import ARTIFACT_FD

# The sandboxed pip (source distributions): where things are inside the builder sandbox.
SANDBOX_SITE = "/opt/nimbus/site"  # the node's own pip package, alone, read-only
SANDBOX_PIP_CONF = "/opt/nimbus/pip.conf"
SANDBOX_EGRESS = "/opt/nimbus/egress.sock"
SANDBOX_TARGET = "/tmp/layer"
CA_DIR = "/etc/ssl/certs"
PIP_KEYS = ("index-url", "extra-index-url", "find-links", "no-index", "cert", "constraint", "trusted-host",
            "timeout", "retries")
PIP_ALIASES = {"default-timeout": "timeout"}
SANDBOX_LOCAL = "/opt/nimbus/pip"  # local indexes, find-links, constraints, each at <n> below it
UNPACKED_FILES_MAX = 200_000  # entries in a sandbox-built tree
# Inside the sandbox (stdlib only, run with -I -S): the forwarder from 127.0.0.1:<port> to the egress socket,
# then pip, then the tree as a tar.gz on descriptor 8 (ARTIFACT_FD), the only host file the job can write.
SANDBOX_PIP_MAIN = f"""\
import os, socket, subprocess, sys, tarfile, threading

def pump(src, dst):
    try:
        while data := src.recv(65536):
            dst.sendall(data)
        dst.shutdown(socket.SHUT_WR)
    except OSError:
        pass

def relay(client):
    with client, socket.socket(socket.AF_UNIX) as up:
        try:
            up.connect({SANDBOX_EGRESS!r})
        except OSError:
            return
        back = threading.Thread(target=pump, args=(up, client), daemon=True)
        back.start()
        pump(client, up)
        back.join()

def serve(listener):
    while True:
        client, _ = listener.accept()
        threading.Thread(target=relay, args=(client,), daemon=True).start()

listener = socket.create_server(("127.0.0.1", 0))
threading.Thread(target=serve, args=(listener,), daemon=True).start()
proxy = "http://127.0.0.1:%d" % listener.getsockname()[1]
env = dict(os.environ, HTTP_PROXY=proxy, HTTPS_PROXY=proxy, http_proxy=proxy, https_proxy=proxy)
status = subprocess.call([sys.executable, "-m", "pip", "install", "--proxy", proxy, *sys.argv[1:]], env=env)
if status:
    sys.exit(status)
with os.fdopen({ARTIFACT_FD}, "wb") as out, tarfile.open(fileobj=out, mode="w:gz", compresslevel=1) as tar:
    tar.add({SANDBOX_TARGET!r}, arcname=".")
"""


def parse_pip_config(text: str) -> dict[str, str]:
    """The settings ``pip config list`` prints that the sandboxed pip should share, keyed without their
    section (``install.`` overrides ``global.``; ``:env:`` is Nimbus's environment, not the operator's)."""
    found: dict[str, dict[str, str]] = {"global": {}, "install": {}}
    for line in text.splitlines():
        name, sep, raw = line.partition("=")
        section, dot, key = name.strip().partition(".")
        if not sep or not dot or section not in found:
            continue
        try:
            value = ast.literal_eval(raw.strip())
        except (ValueError, SyntaxError):
            continue
        key = key.replace("_", "-")
        key = PIP_ALIASES.get(key, key)
        if key in PIP_KEYS and isinstance(value, str):
            found[section][key] = value
    return {**found["global"], **found["install"]}


def sandbox_pip_config(settings: dict[str, str]) -> tuple[str, list[tuple[str, str]], frozenset, list[str]]:
    """The sandboxed pip's config file from the node's pip ``settings``, with what it needs: the read-only
    binds (host path, sandbox path) of local indexes, find-links, constraints and CA files, the ``(host,
    port)`` pairs the egress proxy lets through, and notes on what was left out.

    Credentials in index URLs are dropped (package code in the sandbox could read the file). Local paths
    are bound at neutral paths (``/opt/nimbus/pip/<n>``) and the config names them there; a ``…/simple``
    index is bound with its parent, since PEP 503 trees link their files beside it.
    """
    binds: dict[str, str] = {}
    notes: list[str] = []
    urls: list[str] = []

    def bind(path: str, *, tree: bool = False) -> str | None:
        real = os.path.realpath(path)
        if not os.path.exists(real):
            notes.append(f"the sandbox's pip does without {path}, which does not exist")
            return None
        if real == CA_DIR or real.startswith(CA_DIR + "/"):
            binds.setdefault(CA_DIR, CA_DIR)
            return real
        top = os.path.dirname(real) if tree and os.path.basename(real) == "simple" else real
        inside = binds.setdefault(top, f"{SANDBOX_LOCAL}/{len(binds)}")
        return inside + real[len(top):]

    def location(value: str, *, index: bool = False) -> str | None:
        parts = urlsplit(value)
        if parts.scheme in ("http", "https"):
            if parts.username or parts.password:
                notes.append(f"the sandbox's pip uses {parts.hostname} without the credentials the node's has")
                netloc = parts.hostname or ""
                netloc = f"[{netloc}]" if ":" in netloc else netloc
                value = urlunsplit(parts._replace(netloc=f"{netloc}:{parts.port}" if parts.port else netloc))
            urls.append(value)
            return value
        if parts.scheme == "file":
            inside = bind(unquote(parts.path), tree=index)
            return f"file://{quote(inside)}" if inside else None
        if parts.scheme:
            notes.append(f"the sandbox's pip does without {value} (only http, https and local paths)")
            return None
        return bind(value, tree=index)

    lines = []
    if settings.get("no-index", "").lower() not in ("1", "true", "yes", "on"):
        index = settings.get("index-url", "https://pypi.org/simple")
        kept = location(index, index=True)
        lines.append(f"index-url = {kept}" if kept else "no-index = true")
    else:
        lines.append("no-index = true")
    for key in ("extra-index-url", "find-links", "constraint"):
        values = [location(item, index=key == "extra-index-url") for item in settings.get(key, "").split()]
        if any(values):
            lines.append(f"{key} = {' '.join(v for v in values if v)}")
    if os.path.isdir(CA_DIR):
        binds.setdefault(CA_DIR, CA_DIR)
    cert = location(settings["cert"]) if settings.get("cert") else None
    if cert:
        lines.append(f"cert = {cert}")
    allowed = allowed_targets(urls)
    trusted = [host for host in settings.get("trusted-host", "").split()
               if any(normal == host.split(":")[0].lower() for normal, _ in allowed)]
    if trusted:
        lines.append(f"trusted-host = {' '.join(trusted)}")
    for key in ("timeout", "retries"):
        if settings.get(key, "").isdigit():
            lines.append(f"{key} = {settings[key]}")
    conf = "[global]\n" + "".join(f"{line}\n" for line in lines)
    return conf, sorted(binds.items()), allowed, notes


def package_dir(name: str) -> Path | None:
    """An installed package's directory, located without importing it."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(os.path.realpath(next(iter(spec.submodule_search_locations))))
