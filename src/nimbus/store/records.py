"""The plain values the store hands out and takes in: no SQLAlchemy, no behaviour but naming the
``Deployment`` a function or version runs as.

Every datetime is timezone-aware UTC. Records read from the store are snapshots; changing one changes
nothing in the database.
"""

from dataclasses import dataclass, field
from datetime import UTC, datetime

from nimbus.deployment import LATEST, SHARED, Deployment

DEFAULT_TENANT = "default"
DEFAULT_MAX_RETRIES = 2  # Lambda's default for async invocations

MODES = ("sync", "async")
STATUSES = ("queued", "running", "succeeded", "failed", "timed_out")
FINISHED_STATUSES = frozenset({"succeeded", "failed", "timed_out"})
STARTS = ("cold", "warm", "forked", "hot")


def utcnow() -> datetime:
    """Now, timezone-aware UTC: the only clock the store uses."""
    return datetime.now(UTC)


@dataclass(slots=True, kw_only=True)
class FunctionRecord:
    """A function as it runs now: its identity plus the settings and code of its latest version."""

    id: str
    name: str
    tenant: str
    runtime: str
    handler: str
    env: dict[str, str]
    memory_mb: int
    timeout_s: float
    concurrency: int
    version: int
    """The latest version's number (1, 2, …)."""
    version_id: str
    """The latest version's id: what an invocation records, so a later update does not change what it ran."""
    code_sha256: str
    code_size: int
    code_kind: str
    """How the code bytes are meant: ``source`` (one file), ``zip``, ``module`` (a prebuilt wasm module)…"""
    created_at: datetime
    updated_at: datetime
    """When the latest version was made."""
    artifact_sha256: str | None = None
    """Compiled runtimes: the built artifact the machines run (``code_sha256`` stays the source). None for
    interpreted runtimes, which run the code itself."""
    artifact_size: int | None = None
    max_retries: int = DEFAULT_MAX_RETRIES
    """How often a failed async invocation is tried again."""
    layer_sha256: str | None = None
    """Packages with requirements.txt or package.json: the archive of the dependency layer its machines
    mount read-only. None when the function has no dependencies."""
    published: int | None = None
    """The published version number of this revision; None when it is not published."""
    description: str = ""
    role: str | None = None
    """The Lambda API's execution role: stored and echoed, it grants nothing."""
    isolation: str = SHARED
    """``shared`` (machines serve call after call) or ``per-call`` (a fresh machine for every call)."""

    def deployment(self, executed_version: str = LATEST) -> Deployment:
        """What a machine serving this revision as ``executed_version`` is initialised with."""
        return Deployment(
            version_id=self.version_id, function_id=self.id, function_name=self.name, version=self.version,
            runtime=self.runtime, handler=self.handler, env=dict(self.env), memory_mb=self.memory_mb,
            timeout_s=float(self.timeout_s), concurrency=self.concurrency,
            # Compiled runtimes run their built artifact; interpreted ones their code.
            code_sha256=self.artifact_sha256 or self.code_sha256, package=self.code_kind == "zip",
            layer_sha256=self.layer_sha256, executed_version=executed_version, isolation=self.isolation,
        )


@dataclass(slots=True, kw_only=True)
class VersionRecord:
    """One immutable version of a function.

    It has no ``version_id`` attribute: its own ``id`` is the version id.
    """

    id: str
    function_id: str
    function_name: str
    tenant: str
    version: int
    runtime: str
    handler: str
    env: dict[str, str]
    memory_mb: int
    timeout_s: float
    concurrency: int
    code_sha256: str
    code_size: int
    code_kind: str
    created_at: datetime
    artifact_sha256: str | None = None
    """Compiled runtimes: the built artifact this version runs; None for interpreted runtimes."""
    artifact_size: int | None = None
    max_retries: int = DEFAULT_MAX_RETRIES
    layer_sha256: str | None = None
    """The dependency layer this version's machines mount; None when it has none."""
    published: int | None = None
    """The published version number of this revision; None when it is not published."""
    description: str = ""
    role: str | None = None
    isolation: str = SHARED
    """``shared`` or ``per-call``: kept by the published version, as every other setting."""

    def deployment(self, executed_version: str = LATEST) -> Deployment:
        """What a machine serving this version is initialised with: an async call runs the version it was
        queued for, as the version (``$LATEST`` or a number) it was queued under."""
        return Deployment(
            version_id=self.id, function_id=self.function_id, function_name=self.function_name,
            version=self.version, runtime=self.runtime, handler=self.handler, env=dict(self.env),
            memory_mb=self.memory_mb, timeout_s=float(self.timeout_s), concurrency=self.concurrency,
            code_sha256=self.artifact_sha256 or self.code_sha256, package=self.code_kind == "zip",
            layer_sha256=self.layer_sha256, executed_version=executed_version, isolation=self.isolation,
        )


@dataclass(slots=True, kw_only=True)
class AliasRecord:
    """A named pointer at a published version (or ``$LATEST``), optionally sending a share of the calls to
    a second published version."""

    id: str
    function_id: str
    function_name: str
    tenant: str
    name: str
    version: int | str
    """A published number, or ``"$LATEST"``."""
    additional: dict[int, float]
    """At most one entry: published number → the share of calls (0..1) it gets instead of ``version``."""
    description: str
    revision_id: str
    """New on every update (Lambda's RevisionId)."""
    created_at: datetime
    updated_at: datetime


@dataclass(slots=True, kw_only=True)
class BuildRecord:
    """One entry of the build cache: what building ``source_sha256`` with ``toolchain`` produced.

    ``key`` is sha256(runtime, toolchain, source), computed by the compiler; the same key always names the
    same artifact, so a second deploy of identical code on any node reuses it instead of building.
    """

    key: str
    runtime: str
    toolchain: str
    source_sha256: str
    artifact_sha256: str
    artifact_size: int
    log: str
    """The toolchain's output (warnings), as the compiler chose to keep it."""
    duration_ms: float
    """How long the original build took; a cache hit costs none of it."""
    created_at: datetime
    kind: str = "artifact"
    """``artifact`` (compiled code) or ``layer`` (a function's resolved dependencies)."""


@dataclass(slots=True, kw_only=True)
class InvocationRecord:
    """One call of a function, sync or async, from queued (async only) to finished.

    Only the identity fields are required; the rest default to a call that has not run yet.
    """

    id: str
    function_id: str
    function_name: str
    version: int
    version_id: str
    tenant: str = DEFAULT_TENANT
    mode: str = "sync"
    """``sync`` or ``async``."""
    status: str = "queued"
    """``queued``, ``running``, ``succeeded``, ``failed`` or ``timed_out``."""
    start: str | None = None
    """``cold``, ``warm`` or ``hot``: what kind of machine served the call."""
    restored: bool = False
    """The call's machine was restored from a snapshot (firecracker with snapshots on), not booted."""
    event: bytes | None = None
    """The raw JSON event; kept for async calls, which run later."""
    output: bytes | None = None
    """The raw JSON the function returned."""
    error: dict | None = None
    """``{type, message, stack}`` when the call failed."""
    logs: str = ""
    logs_truncated: bool = False
    duration_ms: float | None = None
    created_at: datetime = field(default_factory=utcnow)
    started_at: datetime | None = None
    finished_at: datetime | None = None
    attempts: int = 0
    lease_owner: str | None = None
    """The node running an async call; with ``lease_expires_at``, how a crashed node's work is found again."""
    lease_expires_at: datetime | None = None
    not_before: datetime | None = None
    """A retried async invocation is not claimed before this (its backoff)."""
    callback_url: str | None = None
    callback_status: str | None = None
    """``pending``, ``delivered`` or ``failed``: how far POSTing the result to ``callback_url`` got."""
    callback_attempts: int = 0
    idempotency_key: str | None = None
    executed_version: str = LATEST
    """``$LATEST`` or the published number the call ran (``version_id`` names the revision)."""
    trigger: str = "api"
    """What started the call: ``api``, ``url`` (a function URL) or ``schedule``."""


@dataclass(slots=True, kw_only=True)
class ApiKeyRecord:
    """An API key, known only by its hash."""

    id: str
    tenant: str
    name: str
    key_hash: str
    created_at: datetime
    revoked_at: datetime | None = None
    admin: bool = False
    prefix: str = ""


@dataclass(slots=True, kw_only=True)
class LayerRecord:
    """A dependency layer as ``GET /api/v1/layers`` shows it: its build and the functions that use it."""

    sha256: str
    """The layer archive's sha256: what versions reference and nodes unpack."""
    key: str | None
    """The build-cache key (sha256 of runtime, platform and requirements); None once pruned by gc."""
    runtime: str
    platform: str
    """What the layer was resolved for (interpreter or node version, machine, libc)."""
    size: int
    """Bytes of the archive."""
    log: str
    duration_ms: float
    created_at: datetime
    functions: list[str] = field(default_factory=list)
    """Names of the functions (of the asking tenant) with a version that mounts it."""


@dataclass(slots=True)
class FunctionUrlRecord:
    """A function URL: how ``/fn/{name}[:{qualifier}]/…`` is served ('' qualifier: ``$LATEST``)."""

    function_id: str
    function_name: str
    tenant: str
    qualifier: str
    auth: str
    """``none`` (anyone) or ``key`` (a valid API key as a bearer token)."""
    cors: dict
    created_at: datetime
    updated_at: datetime


NODE_STATES = ("up", "draining", "dead", "stopped")


@dataclass(slots=True, kw_only=True)
class NodeRecord:
    """A node in the registry, as it last reported itself (``stats``: its pool and in-flight calls)."""

    id: str
    address: str
    driver: str
    runtimes: list[str]
    capacity: dict
    version: str
    state: str
    """``up``, ``draining``, ``stopped`` (it said so as it exited), or ``dead`` (another node found its
    heartbeats missing and took its async work over)."""
    stats: dict = field(default_factory=dict)
    started_at: datetime = field(default_factory=utcnow)
    heartbeat_at: datetime = field(default_factory=utcnow)
