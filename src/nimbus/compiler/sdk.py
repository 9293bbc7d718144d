"""The AWS SDK every python3 and nodejs machine gets, as Lambda's runtimes bundle it.

Lambda's python runtime ships ``boto3`` and its nodejs 18+ runtimes ship the ``@aws-sdk/*`` v3 clients;
handlers import them at module level without declaring them. Nimbus provides the same: the pinned
versions below are resolved once per host with the dependency-layer resolver
(:class:`~nimbus.compiler.layers.LayerBuilder`: wheels only, ``--ignore-scripts``, no package code on
the host) into ``<cache>/<key>``, ``key = sha256(runtime, platform, pins)``. The cache
(``NIMBUS_SDK_CACHE``, by default ``~/.cache/nimbus/sdk``) is shared by every node home on the host, so
the many nodes tests make build it once. Machines see the tree read-only from boot, blank ones
included: python3 at ``/opt/sdk/python``, appended to ``sys.path`` after the function's own layer (a
boto3 the function pins wins); nodejs at ``/node_modules``, the last place node's upward search looks
from CommonJS and ES modules alike (a function's own ``node_modules`` or layer is found first).

A tree appears under its final name only complete (built in a temporary directory beside it, then
renamed), and one process builds a key at a time (a lock file per key), so nodes starting together on
one host neither corrupt the cache nor build twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import io
import json
import logging
import os
import shutil
import tarfile
import tempfile
import time
from pathlib import Path

from nimbus.agent.contract import SDK_DIRS
from nimbus.compiler.base import BuildFailed
from nimbus.compiler.layers import LayerBuilder
from nimbus.compiler.manifests import PACKAGE_JSON, REQUIREMENTS, LayerSpec, npm_manifest, requirement_lines

log = logging.getLogger("nimbus.sdk")

RECIPE = "sdk-1"  # bump when the way the SDK tree is made changes (not the pins: they are in the key)
RUNTIMES = tuple(SDK_DIRS)
LOCK_POLL_S = 0.2

# boto3 and everything it pulls in, each pinned, so every host resolves the same files.
PYTHON_PINS = (
    "boto3==1.44.18",
    "botocore==1.44.18",
    "s3transfer==0.19.3",
    "jmespath==1.1.0",
    "python-dateutil==2.9.0.post0",
    "urllib3==2.8.0",
    "six==1.17.0",
    # SnapStart's runtime hooks (register_before_snapshot / register_after_restore), which Lambda's python
    # runtimes include: a function template runs them (nimbus.agent.main, on_snapshot and resume).
    "snapshot-restore-py==1.0.0",
)
# The v3 clients handlers use most, plus the credential providers and DynamoDB's document client;
# about 50 MiB with their @smithy dependencies, which npm resolves within the clients' own ranges.
NODE_PINS = {
    "@aws-sdk/client-cloudwatch-logs": "3.1178.0",
    "@aws-sdk/client-dynamodb": "3.1178.0",
    "@aws-sdk/client-eventbridge": "3.1178.0",
    "@aws-sdk/client-kinesis": "3.1143.0",
    "@aws-sdk/client-lambda": "3.1178.0",
    "@aws-sdk/client-s3": "3.1178.0",
    "@aws-sdk/client-secrets-manager": "3.1178.0",
    "@aws-sdk/client-sns": "3.1178.0",
    "@aws-sdk/client-sqs": "3.1178.0",
    "@aws-sdk/client-ssm": "3.1178.0",
    "@aws-sdk/client-sts": "3.1178.0",
    "@aws-sdk/credential-providers": "3.1178.0",
    "@aws-sdk/lib-dynamodb": "3.1178.0",
}


def layer_spec(runtime: str) -> LayerSpec:
    """The pins as the resolver reads them, through the same checks a tenant's manifest passes."""
    if runtime == "python3":
        lines = requirement_lines("\n".join(PYTHON_PINS).encode())
        return LayerSpec(runtime, ((REQUIREMENTS, "".join(f"{line}\n" for line in lines).encode()),))
    if runtime == "nodejs":
        manifest = npm_manifest(json.dumps({"name": "nimbus-sdk", "version": "1.0.0",
                                            "dependencies": NODE_PINS}).encode())
        return LayerSpec(runtime, ((PACKAGE_JSON, json.dumps(manifest, indent=2).encode() + b"\n"),))
    raise ValueError(f"no bundled SDK for runtime {runtime!r}")


def cache_key(runtime: str, platform_id: str) -> str:
    return hashlib.sha256(f"{RECIPE}\0{layer_spec(runtime).key(platform_id)}".encode()).hexdigest()


class _NoScripts:
    """The builder sandbox of the SDK's resolver: none of the pinned packages has an install script, and
    one that gains one must be looked at before it is bundled, not run."""

    async def run(self, job):
        raise BuildFailed("a pinned SDK package now has an install script; the bundled SDK runs none "
                          "(see nimbus.compiler.sdk)")


def layer_builder(cache: Path) -> LayerBuilder:
    """A resolver for the SDK, its scratch space beside the cache."""
    return LayerBuilder(cache / ".build", _NoScripts())


async def ensure(runtime: str, cache: Path, builder: LayerBuilder) -> Path:
    """The host directory of ``runtime``'s SDK tree, built first if this host has none for these pins.

    ``BuildFailed`` when it cannot be resolved (no registry, the runtime's tools missing).
    """
    spec = layer_spec(runtime)
    platform_id = await builder.platform(runtime)
    key = cache_key(runtime, platform_id)
    final = cache / key
    if final.is_dir():
        return final
    cache.mkdir(parents=True, exist_ok=True)
    async with _locked(cache / f".{key}.lock", runtime):
        if final.is_dir():  # another process built it while this one waited
            return final
        for stale in cache.glob(f".{key[:16]}-*"):  # left by a build that died; none runs now
            shutil.rmtree(stale, ignore_errors=True)
        log.info("building the %s AWS SDK into %s (once per host; this takes a while)", runtime, final)
        started = time.monotonic()
        build = await builder.build(spec, key, platform_id)
        tmp = Path(tempfile.mkdtemp(prefix=f".{key[:16]}-", dir=cache))
        try:
            await asyncio.to_thread(_unpack, build.artifact, tmp)
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        log.info("built the %s AWS SDK (%d MiB) in %.1f s", runtime, _size(final) >> 20, time.monotonic() - started)
    return final


async def ensure_all(runtimes: list[str] | tuple[str, ...], cache: Path, builder: LayerBuilder) -> dict[str, str]:
    """runtime → SDK directory for each of ``runtimes`` that bundles one and whose tools this host has.

    A runtime whose tool is missing (no ``node``) is skipped with a warning: its machines cannot run
    anyway. Any other failure is raised, so a node never runs some machines with the SDK and some without.
    """
    found: dict[str, str] = {}
    for runtime in runtimes:
        if runtime not in SDK_DIRS:
            continue
        try:
            found[runtime] = str(await ensure(runtime, cache, builder))
        except BuildFailed as exc:
            if "is not installed" in exc.message:
                log.warning("no bundled AWS SDK for %s: %s", runtime, exc.message)
                continue
            raise BuildFailed(f"building the {runtime} AWS SDK failed ({exc.message}); set "
                              "NIMBUS_SDK_LAYER=false to run without it", exc.output) from None
    return found


@contextlib.asynccontextmanager
async def _locked(path: Path, runtime: str):
    """An exclusive ``flock`` on ``path``, polled so that waiting stays cancellable."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        said = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not said:
                    log.info("waiting for another process building the %s AWS SDK", runtime)
                    said = True
                await asyncio.sleep(LOCK_POLL_S)
        yield
    finally:
        os.close(fd)  # releases the lock


def _unpack(archive: bytes, dest: Path) -> None:
    """Unpack the layer archive readable by every machine uid (directories 0755, files a+r), writable by none."""
    with tarfile.open(fileobj=io.BytesIO(archive), mode="r:*") as tar:
        tar.extractall(dest, filter="data")
    for root, dirs, files in os.walk(dest):
        for name in dirs:
            os.chmod(os.path.join(root, name), 0o755)
        for name in files:
            path = os.path.join(root, name)
            if not os.path.islink(path):
                os.chmod(path, 0o755 if os.stat(path).st_mode & 0o100 else 0o644)
    os.chmod(dest, 0o755)


def _size(tree: Path) -> int:
    return sum(p.lstat().st_size for p in tree.rglob("*") if not p.is_dir())


def versions(runtime: str, tree: Path) -> dict[str, str]:
    """The pinned packages' versions as installed in ``tree`` (what ``nimbus sdk`` prints)."""
    out: dict[str, str] = {}
    if runtime == "python3":
        for info in sorted(tree.glob("*.dist-info")):
            name, _, version = info.name[: -len(".dist-info")].partition("-")
            out[name] = version
        return out
    for name in NODE_PINS:
        with contextlib.suppress(OSError, ValueError):
            out[name] = json.loads((tree / name / PACKAGE_JSON).read_bytes()).get("version", "?")
    return out


__all__ = ["NODE_PINS", "PYTHON_PINS", "RUNTIMES", "cache_key", "ensure", "ensure_all",
           "layer_builder", "layer_spec", "versions"]
