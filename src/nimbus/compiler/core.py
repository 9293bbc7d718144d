"""The compiler: source in, artifact out, through the build cache, one builder and a bounded number of slots.

``build(runtime, source)``:

1. plans the build — which toolchain (asked of the builder, so the docker builder's image version counts,
   not the host's) and which recipe; the build's ``toolchain`` identity is the toolchain's version plus
   a fingerprint of the recipe (generated main, flags), so a new Nimbus or a new compiler is a new build;
2. looks the key ``sha256(runtime, toolchain, source)`` up in the cache: a hit does no build;
3. otherwise joins the build of the same key already running (single flight), or starts one, which
   waits for a slot (``concurrency``, default 1: builds are CPU-bound and these are small machines),
   runs the job in the builder, turns failures into :class:`BuildFailed` and stores the result.

The cache is shared by every tenant, but whether an artifact was already there is not: the answer says
``cached: true`` only to a tenant that asked for the same key before (the cache's ``claim`` keeps who
asked: the store's ``artifact_tenants`` table, or memory), with that first request's duration. A tenant's
first request for what another tenant built says ``cached: false`` with its own, measured duration, so
a hit never confirms another tenant's source or manifest (the response time still differs: a cache
hit is fast whoever asks).

A build runs as a task of its own, so a client that goes away does not kill a build that others wait for
(and a finished one still fills the cache). ``close()`` cancels builds still running; the builders kill
their sandboxes or containers on cancellation.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import hashlib
import importlib
import logging
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from nimbus.compiler import layers, manifests, recipes, toolchains, wasm
from nimbus.compiler.base import Build, Builder, BuildFailed, Job, JobResult
from nimbus.compiler.cache import Cache, MemoryCache
from nimbus.errors import InvalidRequest, Unavailable, redact
from nimbus.store.records import DEFAULT_TENANT

log = logging.getLogger("nimbus.compiler")

COMPILED_RUNTIMES = ("go", "rust", "wasm")
DEFAULT_TIMEOUT_S = 300.0
DEFAULT_MEMORY_MB = 2048
DEFAULT_CONCURRENCY = 1
# A backstop only: builders enforce the job's limit themselves. Past it they may first spend up to
# PREPARE_S on one-time preparation (the sandbox warms its Go cache), then GRACE_S to kill and reap.
BUILDER_PREPARE_S = 900.0
BUILDER_GRACE_S = 30.0


def cache_key(runtime: str, toolchain: str, source: bytes) -> str:
    """The build cache key: sha256 over runtime, toolchain identity and source (NUL-separated, unambiguous)."""
    h = hashlib.sha256()
    h.update(runtime.encode() + b"\0")
    h.update(toolchain.encode() + b"\0")
    h.update(source)
    return h.hexdigest()


@dataclasses.dataclass(frozen=True, slots=True)
class _Plan:
    identity: str  # what Build.toolchain says and the key covers
    kind: str  # "job" (native), "rust-wasm", "wat", "module"
    job: Job | None = None


def _recipe_tag(job: Job) -> str:
    return f"(recipe {job.fingerprint()[:12]})"


@functools.cache
def _engine_tag() -> str:
    """A fingerprint of the machines' wasmtime engine setup: a serialized module loads only into the same one."""
    import inspect

    from nimbus.agent.wasm import make_engine

    return hashlib.sha256(inspect.getsource(make_engine).encode()).hexdigest()[:12]


class Compiler:
    """Builds compiled runtimes' source into artifacts; see the module docstring for the flow."""

    def __init__(self, builder: Builder, cache: Cache, *, timeout_s: float = DEFAULT_TIMEOUT_S,
                 concurrency: int = DEFAULT_CONCURRENCY, home: Path | None = None,
                 sdists: bool = True) -> None:
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        self.builder = builder
        self.cache = cache
        self.timeout_s = timeout_s
        self.concurrency = concurrency
        self._slots = asyncio.Semaphore(concurrency)
        self._inflight: dict[str, asyncio.Task[Build]] = {}
        self._executor = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="nimbus-wasm")
        self._closed = False
        # Layers are fetched on the host (work space under ``home``); install scripts run in ``builder``.
        self.layers = layers.LayerBuilder(home if home is not None else Path(tempfile.gettempdir()) / "nimbus",
                                          builder, timeout_s=timeout_s, sdists=sdists)
        self.builds_run = 0  # builds that ran a toolchain or wasmtime (cache misses that got a slot)

    def __repr__(self) -> str:
        return f"<Compiler builder={self.builder.name} timeout_s={self.timeout_s:g} concurrency={self.concurrency}>"

    def compiles(self, runtime: str) -> bool:
        """True for the runtimes whose code is built into an artifact: go, rust, wasm."""
        return runtime in COMPILED_RUNTIMES

    async def toolchain(self, runtime: str) -> str:
        """The toolchain version that builds ``runtime`` here (``BuildFailed`` saying how to install it)."""
        if runtime == "go":
            return (await self.builder.toolchain("go")).version
        if runtime == "rust":
            return (await self.builder.toolchain("rustc")).version
        if runtime == "wasm":
            return toolchains.wasmtime_version()
        raise InvalidRequest(f"runtime {runtime!r} is not compiled")

    async def build(self, runtime: str, source: bytes, *, tenant: str = DEFAULT_TENANT) -> Build:
        """The artifact of ``source``: from the cache, from an identical build in flight, or built now.

        ``cached`` and ``duration_ms`` are as ``tenant`` may see them (see the module docstring).
        """
        if self._closed:
            raise Unavailable("the compiler is shut down")
        started = time.monotonic()
        plan = await self._plan(runtime, source)
        key = cache_key(runtime, plan.identity, source)
        return await self._once(key, lambda: self._build(key, runtime, source, plan), tenant, started)

    async def layer(self, spec: manifests.LayerSpec, *, tenant: str = DEFAULT_TENANT) -> Build:
        """The dependency layer ``spec`` resolves to: cached by (runtime, platform, manifest), else built now.

        ``BuildFailed`` carries the package tool's output (an unknown package, a version conflict…).
        """
        if self._closed:
            raise Unavailable("the compiler is shut down")
        started = time.monotonic()
        platform = await self.layers.platform(spec.runtime)
        await self.layers.check(spec)
        key = spec.key(platform)
        return await self._once(key, lambda: self._build_layer(key, spec, platform), tenant, started)

    async def _once(self, key: str, start, tenant: str, started: float) -> Build:
        """The build under ``key``: a cache hit, the identical build already running, or ``start()`` as a task;
        told as ``tenant`` may see it."""
        hit = await self.cache.get(key)
        if hit is not None:
            return await self._told(hit, tenant, started)
        task = self._inflight.get(key)
        leader = task is None
        if task is None:
            task = asyncio.create_task(start(), name=f"nimbus-build-{key[:12]}")
            self._inflight[key] = task
            task.add_done_callback(lambda t, key=key: self._finished(key, t))
        try:
            build = await asyncio.shield(task)
        except asyncio.CancelledError:
            me = asyncio.current_task()
            if task.cancelled() and me is not None and not me.cancelling():
                raise Unavailable("the build was cancelled: the node is shutting down") from None
            raise
        return await self._told(build if leader else dataclasses.replace(build, cached=True), tenant, started)

    async def _told(self, build: Build, tenant: str, started: float) -> Build:
        """``build`` as ``tenant`` may see it: ``cached`` only when that tenant asked for it before."""
        if not build.cached:  # built for this very request
            await self.cache.claim(build.key, tenant, build.duration_ms)
            return build
        measured = round((time.monotonic() - started) * 1000, 1)
        first = await self.cache.claim(build.key, tenant, measured)
        if first is None:
            return dataclasses.replace(build, cached=False, duration_ms=measured)
        return dataclasses.replace(build, cached=True, duration_ms=first)

    async def close(self) -> None:
        """Cancel running builds (their sandboxes are killed) and release the builder."""
        self._closed = True
        tasks = list(self._inflight.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.builder.close()
        self._executor.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------------ internals

    def _finished(self, key: str, task: asyncio.Task) -> None:
        if self._inflight.get(key) is task:
            del self._inflight[key]
        if not task.cancelled():
            task.exception()  # retrieved: a failure nobody waits for any more is not "never retrieved"

    async def _plan(self, runtime: str, source: bytes) -> _Plan:
        if runtime == "go":
            version = (await self.builder.toolchain("go")).version
            job = recipes.go(source, self.timeout_s)
            return _Plan(f"{version} {_recipe_tag(job)}", "job", job)
        if runtime == "rust":
            version = (await self.builder.toolchain("rustc")).version
            job = recipes.rust(source, self.timeout_s)
            return _Plan(f"{version} {_recipe_tag(job)}", "job", job)
        if runtime == "wasm":
            engine = f"{toolchains.wasmtime_version()} (engine {_engine_tag()})"
            kind = recipes.wasm_kind(source)
            if kind != "rust":
                return _Plan(engine, kind)
            rustc = await self.builder.toolchain("rustc")
            if recipes.WASM_TARGET not in rustc.targets:
                raise BuildFailed(
                    f"cannot build Rust source to WebAssembly here: the {recipes.WASM_TARGET} target is not "
                    f"installed for {rustc.version} ({toolchains.WASM_TARGET_HINT} on the node), or upload a "
                    "compiled WASI module as code_base64 (or its WAT text as code)"
                )
            job = recipes.rust(source, self.timeout_s, target=recipes.WASM_TARGET)
            return _Plan(f"{engine}; {rustc.version} {_recipe_tag(job)}", "rust-wasm", job)
        raise InvalidRequest(f"runtime {runtime!r} is not compiled (compiled runtimes: {', '.join(COMPILED_RUNTIMES)})")

    async def _build(self, key: str, runtime: str, source: bytes, plan: _Plan) -> Build:
        await self._slots.acquire()
        handoff: list[asyncio.Future] = []  # a wasm compile abandoned at the timeout keeps the slot till it ends
        try:
            hit = await self.cache.get(key)  # an identical build may have finished while this one queued
            if hit is not None:
                return hit
            self.builds_run += 1
            started = time.monotonic()
            deadline = started + self.timeout_s
            output = ""
            if plan.kind == "module":
                artifact = await self._in_thread(handoff, deadline, wasm.precompile, source)
            elif plan.kind == "wat":
                module = await self._in_thread(handoff, deadline, wasm.wat_to_wasm, source)
                artifact = await self._in_thread(handoff, deadline, wasm.precompile, module)
            else:
                result = await self._run_job(runtime, plan.job)
                output = redact(result.output)  # shown to the tenant, like a failure's output
                artifact = result.artifact
                if plan.kind == "rust-wasm":
                    artifact = await self._in_thread(handoff, deadline, wasm.precompile, artifact)
            build = Build(
                key=key,
                runtime=runtime,
                toolchain=plan.identity,
                artifact=artifact,
                artifact_sha256=hashlib.sha256(artifact).hexdigest(),
                log=output,
                duration_ms=round((time.monotonic() - started) * 1000, 1),
                cached=False,
                source_sha256=hashlib.sha256(source).hexdigest(),
            )
            stored = await self.cache.put(build)
            if stored is not None:
                build = stored
            log.info("built %s %s in %.0f ms (%s)", runtime, key[:12], build.duration_ms, plan.identity)
            return build
        finally:
            if handoff:
                handoff[0].add_done_callback(lambda _f: self._slots.release())
            else:
                self._slots.release()

    async def _build_layer(self, key: str, spec: manifests.LayerSpec, platform: str) -> Build:
        async with self._slots:
            hit = await self.cache.get(key)
            if hit is not None:
                return hit
            self.builds_run += 1
            build = await self.layers.build(spec, key, platform)
            stored = await self.cache.put(build)
            if stored is not None:
                build = stored
            log.info("built a %s layer %s in %.0f ms (%s)", spec.runtime, key[:12], build.duration_ms, platform)
            return build

    async def _run_job(self, runtime: str, job: Job) -> JobResult:
        try:
            result = await asyncio.wait_for(self.builder.run(job), job.timeout_s + BUILDER_PREPARE_S + BUILDER_GRACE_S)
        except TimeoutError:
            raise BuildFailed(f"the {runtime} build ran past its {job.timeout_s:g} s limit and was stopped",
                              timed_out=True) from None
        if result.timed_out:
            raise BuildFailed(f"the {runtime} build ran past its {job.timeout_s:g} s limit and was killed",
                              result.output, timed_out=True)
        if result.status != 0:
            how = f"exit status {result.status}" if result.status is not None else "killed"
            note = f"; {result.note}" if result.note else ""
            raise BuildFailed(f"the {runtime} build failed ({how}{note})", result.output)
        if result.artifact is None:
            raise BuildFailed(f"the {runtime} build produced no artifact ({result.note or 'nothing written'})",
                              result.output)
        return result

    async def _in_thread(self, handoff: list, deadline: float, fn, *args):
        """Run ``fn`` in the compiler's worker thread until ``deadline``; past it, BuildFailed (the thread runs on)."""
        future = asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)
        try:
            return await asyncio.wait_for(asyncio.shield(future), max(0.0, deadline - time.monotonic()))
        except TimeoutError:
            handoff.append(future)
            raise BuildFailed(f"the wasm build ran past its {self.timeout_s:g} s limit", timed_out=True) from None
        except asyncio.CancelledError:
            handoff.append(future)
            raise


# Builders by name, imported only when chosen (the docker builder needs no bwrap, and the reverse).
BUILDERS: dict[str, str] = {
    "sandbox": "nimbus.compiler.sandbox:SandboxBuilder",
    "docker": "nimbus.compiler.docker:DockerBuilder",
}


def builder_class(name: str) -> type:
    """Import and return the builder class registered as ``name`` (``ValueError`` when unknown)."""
    try:
        target = BUILDERS[name]
    except KeyError:
        known = ", ".join(sorted(BUILDERS))
        raise ValueError(f"unknown builder {name!r}; known builders: {known}") from None
    module_name, _, attr = target.partition(":")
    return getattr(importlib.import_module(module_name), attr)


def load_builder(name: str, home: Path, *, memory_mb: int = DEFAULT_MEMORY_MB, timeout_s: float = DEFAULT_TIMEOUT_S,
                 images: dict[str, str] | None = None) -> Builder:
    """Build the builder registered as ``name`` (see ``BUILDERS``); ``ValueError`` when unknown."""
    return builder_class(name)(Path(home), memory_mb=memory_mb, timeout_s=timeout_s, images=images)


def create_compiler(
    home: Path,
    *,
    builder: str = "sandbox",
    timeout_s: float = DEFAULT_TIMEOUT_S,
    memory_mb: int = DEFAULT_MEMORY_MB,
    concurrency: int = DEFAULT_CONCURRENCY,
    images: dict[str, str] | None = None,
    cache: Cache | None = None,
    sdists: bool = True,
) -> Compiler:
    """A compiler over the named builder and ``cache`` (an in-memory one when None)."""
    backend = load_builder(builder, home, memory_mb=memory_mb, timeout_s=timeout_s, images=images)
    return Compiler(backend, cache if cache is not None else MemoryCache(), timeout_s=timeout_s,
                    concurrency=concurrency, home=Path(home), sdists=sdists)


__all__ = ["COMPILED_RUNTIMES", "Compiler", "cache_key", "create_compiler", "load_builder"]
