"""What a machine is initialised with: one function version, as the pool and the scheduler need it.

A module of its own so the store's records can make one (``FunctionRecord.deployment``) without
importing the pool, and the pool can take one without importing the store.
"""

from dataclasses import dataclass

LATEST = "$LATEST"  # Lambda's name for the unpublished version, which unqualified calls run

# How calls share machines (a function setting, ``Deployment.isolation``). SHARED: a machine that served a
# call stays idle for the next one, as on Lambda. PER_CALL: each call runs on a fresh machine, destroyed
# after it, so two calls share no /tmp, globals or leftover threads.
SHARED = "shared"
PER_CALL = "per-call"
ISOLATIONS = (SHARED, PER_CALL)


@dataclass(frozen=True, slots=True)
class Deployment:
    """One function version as the pool needs it: identity, limits and what Init sends."""

    version_id: str
    function_id: str
    function_name: str
    version: int
    runtime: str
    handler: str
    env: dict
    memory_mb: int
    timeout_s: float
    concurrency: int
    code_sha256: str
    package: bool = False  # the code is a zip of many files, which the agent unpacks
    layer_sha256: str | None = None  # its dependency layer, mounted read-only: only new machines can have it
    # "$LATEST" or a published number: what the function sees as its version. Part of a machine's identity,
    # so one revision run as $LATEST and as "1" never shares machines (each sees its own version).
    executed_version: str = LATEST
    isolation: str = SHARED  # SHARED or PER_CALL: whether a machine may serve a second call
