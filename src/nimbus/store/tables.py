"""The schema as SQLAlchemy Core tables: what the store's statements query, and what the migrations must produce.

The migrations under ``migrations/versions`` are written out by hand and frozen; a test compares the
database they build with this module, so the two cannot drift apart unnoticed.

Layout (docs/architecture.md#storage):

- ``functions``: identity (tenant, name), the number of the latest revision (``$LATEST``) and the last
  published version number handed out (never reused).
- ``function_versions``: immutable revisions: settings, a code reference and (compiled runtimes) the built
  artifact the machines run, one row per PUT. ``published`` marks the revisions published as numbered
  versions, which keep every setting of their revision (``isolation`` too).
- ``aliases``: named pointers at a published version, with an optional weighted second version.
- ``artifacts``: code and built bytes by sha256, shared by every version and build with the same bytes.
- ``builds``: the build cache, sha256(runtime, toolchain, source) → artifact, so identical code deployed
  again (on any node sharing the database) is not built again. Dependency layers are builds too
  (``kind = 'layer'``): sha256(runtime, platform, requirements) → the layer's archive.
- ``artifact_tenants``: which tenants asked for each build, so a cache hit is reported only to them.
- ``invocations``: one row per call; async calls carry their event and a lease.
- ``api_keys``: hashed keys per tenant.
- ``nodes``: the node registry: every node's address, state and last heartbeat.
"""

from datetime import UTC, datetime

import sqlalchemy as sa

# Deterministic constraint names, so migrations can name what they alter later.
NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

ID = 32  # uuid4().hex
NAME = 64  # function names are at most 63 characters (gateway.schemas.NAME_PATTERN)
TENANT = 64
RUNTIME = 64
HANDLER = 256
SHA256 = 64
TOOLCHAIN = 256  # e.g. "go1.22.5 linux/amd64" or a builder image digest
NODE_ID = 64  # a home's uuid hex, "-<worker index>" after it
ADDRESS = 255  # a node's advertised base URL


class UTCDateTime(sa.TypeDecorator):
    """A timezone-aware UTC datetime on every backend.

    PostgreSQL keeps ``timestamptz``; SQLite has no time zones, so the value is stored as naive UTC text
    (fixed-width, so it sorts and compares correctly) and marked UTC again when read.
    """

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: the store only takes timezone-aware datetimes")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def JSONColumn() -> sa.JSON:  # noqa: N802 - reads as a type in the table definitions
    # A Python None is SQL NULL, not the JSON text 'null'.
    return sa.JSON(none_as_null=True)


metadata = sa.MetaData(naming_convention=NAMING_CONVENTION)

artifacts = sa.Table(
    "artifacts",
    metadata,
    sa.Column("sha256", sa.String(SHA256), primary_key=True),
    sa.Column("runtime", sa.String(RUNTIME), nullable=False),
    sa.Column("size", sa.BigInteger, nullable=False),
    sa.Column("content", sa.LargeBinary, nullable=False),
    sa.Column("created_at", UTCDateTime, nullable=False),
)

functions = sa.Table(
    "functions",
    metadata,
    sa.Column("id", sa.String(ID), primary_key=True),
    sa.Column("tenant", sa.String(TENANT), nullable=False, server_default="default"),
    sa.Column("name", sa.String(NAME), nullable=False),
    sa.Column("version", sa.Integer, nullable=False),
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.Column("updated_at", UTCDateTime, nullable=False),
    # Migration 0008: the highest published version number ever handed out, so a deleted one is not reused.
    sa.Column("last_published", sa.Integer, nullable=False, server_default=sa.text("0")),
    sa.UniqueConstraint("tenant", "name"),
)

function_versions = sa.Table(
    "function_versions",
    metadata,
    sa.Column("id", sa.String(ID), primary_key=True),
    sa.Column("function_id", sa.String(ID), sa.ForeignKey("functions.id", ondelete="CASCADE"), nullable=False),
    sa.Column("version", sa.Integer, nullable=False),
    sa.Column("runtime", sa.String(RUNTIME), nullable=False),
    sa.Column("handler", sa.String(HANDLER), nullable=False),
    sa.Column("env", JSONColumn(), nullable=False),
    sa.Column("memory_mb", sa.Integer, nullable=False),
    sa.Column("timeout_s", sa.Float, nullable=False),
    sa.Column("concurrency", sa.Integer, nullable=False),
    # No ON DELETE: an artifact still referenced by a version cannot be deleted.
    sa.Column("code_sha256", sa.String(SHA256), sa.ForeignKey("artifacts.sha256"), nullable=False),
    sa.Column("code_size", sa.BigInteger, nullable=False),  # the artifact's, kept here to spare a join
    sa.Column("code_kind", sa.String(16), nullable=False),
    sa.Column("created_at", UTCDateTime, nullable=False),
    # Compiled runtimes: the built artifact the machines run. NULL for interpreted ones, which run the code.
    # Added by migration 0002, hence last.
    sa.Column("artifact_sha256", sa.String(SHA256), sa.ForeignKey("artifacts.sha256"), nullable=True),
    # Async invocations that fail are tried again this many times (migration 0003).
    sa.Column("max_retries", sa.Integer, nullable=False, server_default=sa.text("2")),
    # Packages with requirements.txt / package.json: the dependency layer machines mount (migration 0004).
    sa.Column("layer_sha256", sa.String(SHA256), sa.ForeignKey("artifacts.sha256"), nullable=True),
    # Migration 0008: the published version number of this revision (NULL: unpublished), its description,
    # and the Lambda API's execution role (stored and echoed; it grants nothing).
    sa.Column("published", sa.Integer, nullable=True),
    sa.Column("description", sa.Text, nullable=False, server_default=""),
    sa.Column("role", sa.Text, nullable=True),
    # The description given when publishing: the version's own, while $LATEST keeps ``description``.
    sa.Column("published_description", sa.Text, nullable=True),
    # Migration 0010: "shared" (a machine serves call after call) or "per-call" (a fresh machine per call).
    sa.Column("isolation", sa.String(16), nullable=False, server_default="shared"),
    sa.UniqueConstraint("function_id", "version"),
    # A unique index, not a constraint: SQLite adds it without rebuilding the table. NULLs never collide.
    sa.Index(None, "function_id", "published", unique=True),
    # Deleting a function asks whether anyone else still uses each of its artifacts.
    sa.Index(None, "code_sha256"),
    sa.Index(None, "artifact_sha256"),
    sa.Index(None, "layer_sha256"),
)

builds = sa.Table(
    "builds",
    metadata,
    # sha256 of runtime, toolchain and source: the same three always give the same artifact.
    sa.Column("key", sa.String(SHA256), primary_key=True),
    sa.Column("runtime", sa.String(RUNTIME), nullable=False),
    sa.Column("toolchain", sa.String(TOOLCHAIN), nullable=False),
    sa.Column("source_sha256", sa.String(SHA256), nullable=False),
    # No ON DELETE: the cache keeps its artifact alive until `nimbus gc` removes the build row first.
    sa.Column("artifact_sha256", sa.String(SHA256), sa.ForeignKey("artifacts.sha256"), nullable=False),
    sa.Column("log", sa.Text, nullable=False, server_default=""),
    sa.Column("duration_ms", sa.Float, nullable=False),
    sa.Column("created_at", UTCDateTime, nullable=False),
    # "artifact" (a compiled function) or "layer" (resolved dependencies); migration 0004.
    sa.Column("kind", sa.String(16), nullable=False, server_default="artifact"),
    # Deleting a function asks whether a build still names each of its artifacts.
    sa.Index(None, "artifact_sha256"),
)

# Which tenants asked for each build-cache entry (migration 0006): a hit is "cached" only to them.
artifact_tenants = sa.Table(
    "artifact_tenants",
    metadata,
    sa.Column("key", sa.String(SHA256), sa.ForeignKey("builds.key", ondelete="CASCADE"), primary_key=True),
    sa.Column("tenant", sa.String(TENANT), primary_key=True),
    sa.Column("duration_ms", sa.Float, nullable=False),  # how long that tenant's first request took
    sa.Column("created_at", UTCDateTime, nullable=False),
)

invocations = sa.Table(
    "invocations",
    metadata,
    sa.Column("id", sa.String(ID), primary_key=True),
    sa.Column("function_id", sa.String(ID), sa.ForeignKey("functions.id", ondelete="CASCADE"), nullable=False),
    sa.Column("function_name", sa.String(NAME), nullable=False),
    sa.Column("tenant", sa.String(TENANT), nullable=False, server_default="default"),
    sa.Column("version", sa.Integer, nullable=False),
    sa.Column("version_id", sa.String(ID), nullable=False),
    sa.Column("mode", sa.String(8), nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("start", sa.String(8)),
    # Migration 0005: the machine of a cold or warm start came from a snapshot.
    sa.Column("restored", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("event", sa.LargeBinary),
    sa.Column("output", sa.LargeBinary),
    sa.Column("error", JSONColumn()),
    sa.Column("logs", sa.Text, nullable=False, server_default=""),
    sa.Column("logs_truncated", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("duration_ms", sa.Float),
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.Column("started_at", UTCDateTime),
    sa.Column("finished_at", UTCDateTime),
    sa.Column("attempts", sa.Integer, nullable=False, server_default=sa.text("0")),
    sa.Column("lease_owner", sa.String(64)),
    sa.Column("lease_expires_at", UTCDateTime),
    # Migration 0003: retry backoff, result callbacks, idempotency keys.
    sa.Column("not_before", UTCDateTime),
    sa.Column("callback_url", sa.String(2048)),
    sa.Column("callback_status", sa.String(16)),
    sa.Column("callback_attempts", sa.Integer, nullable=False, server_default=sa.text("0")),
    sa.Column("idempotency_key", sa.String(256)),
    # Migration 0008: which version ran: "$LATEST" or a published number ("1", "2"…).
    sa.Column("executed_version", sa.String(16), nullable=False, server_default="$LATEST"),
    # Migration 0009: what started the call: "api", "url" (a function URL) or "schedule".
    sa.Column("trigger", sa.String(16), nullable=False, server_default="api"),
    sa.Index("ix_invocations_tenant_idempotency_key", "tenant", "idempotency_key", unique=True),
    sa.Index("ix_invocations_callback_status", "callback_status"),
    # A function's recent invocations, newest first.
    sa.Index(None, "function_id", "created_at"),
    # Claiming async work: queued rows, and running rows whose lease ran out.
    sa.Index(None, "mode", "status", "lease_expires_at"),
    # The retention sweep: finished rows past their age (migration 0007).
    sa.Index(None, "created_at"),
    # The console's overview: one tenant's calls of the last hour (migration 0012).
    sa.Index(None, "tenant", "created_at"),
)

api_keys = sa.Table(
    "api_keys",
    metadata,
    sa.Column("id", sa.String(ID), primary_key=True),
    sa.Column("tenant", sa.String(TENANT), nullable=False),
    sa.Column("name", sa.String(NAME), nullable=False),
    sa.Column("key_hash", sa.String(128), nullable=False, unique=True),
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.Column("revoked_at", UTCDateTime),
    # Migration 0003: admin keys manage every tenant's keys; the prefix identifies a key in listings.
    sa.Column("admin", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("prefix", sa.String(16), nullable=False, server_default=""),
    # Migration 0008: the SigV4 secret of the Lambda API (gateway/lambda_api); NULL for bearer-only keys.
    sa.Column("secret", sa.Text, nullable=True),
    sa.Index(None, "tenant"),
)

ALIAS = 128  # Lambda's limit on alias names
VERSION = 16  # "$LATEST" or a published number

# Named pointers at published versions (migration 0008): what a qualified invoke resolves.
aliases = sa.Table(
    "aliases",
    metadata,
    sa.Column("id", sa.String(ID), primary_key=True),
    sa.Column("function_id", sa.String(ID), sa.ForeignKey("functions.id", ondelete="CASCADE"), nullable=False),
    sa.Column("tenant", sa.String(TENANT), nullable=False),
    sa.Column("name", sa.String(ALIAS), nullable=False),
    # A published number as text, or "$LATEST" (allowed only without an additional version).
    sa.Column("version", sa.String(VERSION), nullable=False),
    sa.Column("additional_version", sa.Integer, nullable=True),
    sa.Column("additional_weight", sa.Float, nullable=True),
    sa.Column("description", sa.Text, nullable=False, server_default=""),
    sa.Column("revision_id", sa.String(ID), nullable=False),
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.Column("updated_at", UTCDateTime, nullable=False),
    sa.UniqueConstraint("function_id", "name"),
)

# Function URLs (migration 0009): the HTTP config of a function ('' qualifier: $LATEST) or of one alias.
function_urls = sa.Table(
    "function_urls",
    metadata,
    sa.Column("function_id", sa.String(ID), sa.ForeignKey("functions.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("qualifier", sa.String(ALIAS), primary_key=True),
    sa.Column("tenant", sa.String(TENANT), nullable=False),
    sa.Column("auth", sa.String(8), nullable=False),  # "none" or "key"
    sa.Column("cors", sa.Text, nullable=False, server_default="{}"),  # JSON: the CORS settings
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.Column("updated_at", UTCDateTime, nullable=False),
)

SCHEDULE_NAME = 64
EXPRESSION = 256  # EventBridge's limit on a schedule expression

# Schedules (migration 0009): rate()/cron() expressions that queue an async invocation per tick.
schedules = sa.Table(
    "schedules",
    metadata,
    sa.Column("id", sa.String(ID), primary_key=True),
    sa.Column("function_id", sa.String(ID), sa.ForeignKey("functions.id", ondelete="CASCADE"), nullable=False),
    sa.Column("tenant", sa.String(TENANT), nullable=False),
    sa.Column("name", sa.String(SCHEDULE_NAME), nullable=False),
    # "$LATEST", a published number or an alias: resolved at each tick, like a call of name:qualifier.
    sa.Column("qualifier", sa.String(ALIAS), nullable=False, server_default="$LATEST"),
    sa.Column("expression", sa.String(EXPRESSION), nullable=False),
    sa.Column("input", sa.Text, nullable=True),  # fixed JSON event; NULL: the Scheduled Event
    sa.Column("enabled", sa.Boolean, nullable=False, server_default=sa.true()),
    # The next tick still to fire; NULL when the expression has no future time (a cron of past years).
    sa.Column("next_fire_at", UTCDateTime, nullable=True),
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.Column("updated_at", UTCDateTime, nullable=False),
    sa.UniqueConstraint("function_id", "name"),
    # The tick loop's question: which enabled schedules are due.
    sa.Index(None, "enabled", "next_fire_at"),
)

# One row per fired tick (migration 0009): its primary key makes a tick fire once across every node.
schedule_ticks = sa.Table(
    "schedule_ticks",
    metadata,
    sa.Column("schedule_id", sa.String(ID), sa.ForeignKey("schedules.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("fire_time", UTCDateTime, primary_key=True),
    sa.Column("invocation_id", sa.String(ID), nullable=True),  # NULL: nothing to run (its qualifier is gone)
    sa.Column("created_at", UTCDateTime, nullable=False),
)

# The node registry (migration 0011): one row per node (worker process) that ever served this database.
# What every node reads to show the fleet and to find a dead node, whose async work it then takes over.
nodes = sa.Table(
    "nodes",
    metadata,
    sa.Column("id", sa.String(NODE_ID), primary_key=True),  # nimbus.app.node_id: the lease tokens' prefix
    sa.Column("address", sa.String(ADDRESS), nullable=False),
    sa.Column("driver", sa.String(16), nullable=False),
    sa.Column("runtimes", JSONColumn(), nullable=False),
    sa.Column("capacity", JSONColumn(), nullable=False),  # workers, max_machines
    sa.Column("version", sa.String(32), nullable=False),
    sa.Column("state", sa.String(16), nullable=False),  # up | draining | dead | stopped
    sa.Column("stats", JSONColumn(), nullable=False),  # as of the last heartbeat: pool, in-flight calls
    sa.Column("started_at", UTCDateTime, nullable=False),
    sa.Column("heartbeat_at", UTCDateTime, nullable=False),
    sa.Index(None, "state", "heartbeat_at"),  # the dead-node sweep's question
)

# The console's logins (migration 0012): a session is a random token in an HttpOnly cookie, stored by its
# hash and bound to the API key it was opened with, so revoking the key ends the session on every node.
console_sessions = sa.Table(
    "console_sessions",
    metadata,
    sa.Column("token_hash", sa.String(SHA256), primary_key=True),
    sa.Column("key_id", sa.String(ID), sa.ForeignKey("api_keys.id", ondelete="CASCADE"), nullable=False),
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.Column("expires_at", UTCDateTime, nullable=False),
    sa.Index(None, "key_id"),
    sa.Index(None, "expires_at"),
)
