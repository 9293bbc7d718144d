"""Builds Go, Rust and WASM sources into artifacts in an isolated builder, with a build cache.

See docs/architecture.md#creating-a-function-builds-and-dependency-layers and #runtime-contract.

Layout:

* ``base``       — :class:`Build`, :class:`BuildFailed`, and the builder seam (``Builder``, ``Job``, ``JobResult``);
* ``core``       — :class:`Compiler` (cache, single flight, slots), :func:`cache_key`, :func:`create_compiler`;
* ``recipes``    — what each runtime's build is (files, command, environment), shared by every builder;
* ``sandbox``    — the default builder: the host's toolchain in a bwrap sandbox;
* ``docker``     — the same jobs in ``golang``/``rust`` builder containers, when an engine is reachable;
* ``wasm``       — module validation and precompilation with wasmtime (in-process, in a worker thread);
* ``cache``      — :class:`MemoryCache` and :class:`StoreCache`;
* ``toolchains`` — finding the host's Go, Rust and wasmtime; ``doctor`` — what ``nimbus doctor`` shows.

Builders are picked by name from a lazy ``"module:Class"`` registry, as machine drivers are, so importing
this package stays cheap and a host without one backend's needs can use the other.
"""

from __future__ import annotations

from nimbus.compiler.base import Build, Builder, BuildFailed, Job, JobResult, Toolchain
from nimbus.compiler.cache import Cache, MemoryCache, StoreCache
from nimbus.compiler.core import (
    BUILDERS,
    COMPILED_RUNTIMES,
    Compiler,
    builder_class,
    cache_key,
    create_compiler,
    load_builder,
)


def report(*, images: dict[str, str] | None = None) -> dict:
    """What this host can build, for ``nimbus doctor`` (shape in :mod:`nimbus.compiler.doctor`)."""
    from nimbus.compiler import doctor

    return doctor.report(images=images)


__all__ = [
    "BUILDERS",
    "COMPILED_RUNTIMES",
    "Build",
    "BuildFailed",
    "Builder",
    "Cache",
    "Compiler",
    "Job",
    "JobResult",
    "MemoryCache",
    "StoreCache",
    "Toolchain",
    "builder_class",
    "cache_key",
    "create_compiler",
    "load_builder",
    "report",
]
