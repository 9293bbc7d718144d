"""The queries, built once with named parameters, and what their rows become.

Building and cache-keying a statement per call costs more than the query on the hot path (every invoke
reads its function and writes its invocation), so each is a module constant here; the verb modules only
pick one and pass its parameters. The few built per call (filters, claims) are built where they are used.
"""

import uuid
from dataclasses import fields

import sqlalchemy as sa

from nimbus.store import tables
from nimbus.store.records import (
    FINISHED_STATUSES,
    AliasRecord,
    ApiKeyRecord,
    BuildRecord,
    FunctionRecord,
    InvocationRecord,
    VersionRecord,
)

DEFAULT_LIST_LIMIT = 50

_f = tables.functions
_v = tables.function_versions
_a = tables.artifacts
_i = tables.invocations
_k = tables.api_keys
_b = tables.builds
_t = tables.artifact_tenants
# The artifacts table once more, joined on a version's or build's built artifact for its size.
_built = tables.artifacts.alias("built")

_key = sa.bindparam("key", type_=sa.String)
_tenant = sa.bindparam("tenant", type_=sa.String)

# A function as it runs now: the functions row joined with its latest version (and, for compiled runtimes,
# the size of its built artifact: a primary-key lookup, where copying it into the version would need the
# artifact read before every insert).
_FUNCTION_COLUMNS = (
    _f.c.id, _f.c.name, _f.c.tenant, _v.c.runtime, _v.c.handler, _v.c.env, _v.c.memory_mb, _v.c.timeout_s,
    _v.c.concurrency, _f.c.version, _v.c.id.label("version_id"), _v.c.code_sha256, _v.c.code_size,
    _v.c.code_kind, _f.c.created_at, _f.c.updated_at, _v.c.artifact_sha256, _built.c.size.label("artifact_size"),
    _v.c.max_retries, _v.c.layer_sha256, _v.c.published, _v.c.description, _v.c.role, _v.c.isolation,
)
LATEST = _f.join(_v, sa.and_(_v.c.function_id == _f.c.id, _v.c.version == _f.c.version))
SELECT_LATEST = sa.select(*_FUNCTION_COLUMNS).select_from(
    LATEST.outerjoin(_built, _built.c.sha256 == _v.c.artifact_sha256)
)
# A name or an id; a name that happens to look like an id wins over the id.
_BY_KEY = (_f.c.tenant == _tenant, sa.or_(_f.c.name == _key, _f.c.id == _key))
_KEY_ORDER = sa.case((_f.c.name == _key, 0), else_=1)
GET_FUNCTION = SELECT_LATEST.where(*_BY_KEY).order_by(_KEY_ORDER).limit(1)
FUNCTION_BY_ID = SELECT_LATEST.where(_f.c.id == _key)
LOCK_FUNCTION = sa.select(_f.c.id).where(*_BY_KEY).order_by(_KEY_ORDER).limit(1).with_for_update()
NAME_TAKEN = sa.select(_f.c.id).where(_f.c.tenant == _tenant, _f.c.name == _key)

SELECT_VERSIONS = sa.select(
    _v.c.id, _v.c.function_id, _f.c.name.label("function_name"), _f.c.tenant, _v.c.version, _v.c.runtime,
    _v.c.handler, _v.c.env, _v.c.memory_mb, _v.c.timeout_s, _v.c.concurrency, _v.c.code_sha256, _v.c.code_size,
    _v.c.code_kind, _v.c.created_at, _v.c.artifact_sha256, _built.c.size.label("artifact_size"), _v.c.max_retries,
    _v.c.layer_sha256, _v.c.published,
    # A published version's own description when it was given one, else its revision's.
    sa.func.coalesce(_v.c.published_description, _v.c.description).label("description"), _v.c.role,
    _v.c.isolation,
).select_from(
    _v.join(_f, _f.c.id == _v.c.function_id).outerjoin(_built, _built.c.sha256 == _v.c.artifact_sha256)
)
GET_VERSION = SELECT_VERSIONS.where(_v.c.id == _key)
_number = sa.bindparam("number", type_=sa.Integer)
# A function's published versions, and one of them by number ("key" is the function's id).
LIST_PUBLISHED = SELECT_VERSIONS.where(_v.c.function_id == _key, _v.c.published.is_not(None)).order_by(
    _v.c.published)
GET_PUBLISHED = SELECT_VERSIONS.where(_v.c.function_id == _key, _v.c.published == _number)
# A published revision as the function record a call runs: its own number, settings and code.
PUBLISHED_AS_FUNCTION = sa.select(
    *(_v.c.version if c is _f.c.version else _v.c.created_at.label("updated_at") if c is _f.c.updated_at else c
      for c in _FUNCTION_COLUMNS)
).select_from(
    _f.join(_v, _v.c.function_id == _f.c.id).outerjoin(_built, _built.c.sha256 == _v.c.artifact_sha256)
).where(_f.c.id == _key, _v.c.published == _number)
# The function's id (name first, as GET_FUNCTION), without the join: what a qualified look-up starts from.
FUNCTION_ID = sa.select(_f.c.id).where(*_BY_KEY).order_by(_KEY_ORDER).limit(1)

_al = tables.aliases
SELECT_ALIASES = sa.select(
    _al.c.id, _al.c.function_id, _f.c.name.label("function_name"), _al.c.tenant, _al.c.name, _al.c.version,
    _al.c.additional_version, _al.c.additional_weight, _al.c.description, _al.c.revision_id, _al.c.created_at,
    _al.c.updated_at,
).select_from(_al.join(_f, _f.c.id == _al.c.function_id))
GET_ALIAS = SELECT_ALIASES.where(_al.c.function_id == _key, _al.c.name == sa.bindparam("alias", type_=sa.String))
LIST_ALIASES = SELECT_ALIASES.where(_al.c.function_id == _key).order_by(_al.c.name)
# Aliases that route calls to a published number: it cannot be deleted while one does.
ALIASES_USING = sa.select(_al.c.name).where(
    _al.c.function_id == _key,
    sa.or_(_al.c.version == sa.bindparam("text", type_=sa.String), _al.c.additional_version == _number),
).order_by(_al.c.name)

GET_CODE = sa.select(_a.c.content).where(_a.c.sha256 == _key)
# An artifact something still needs: a version's code, built artifact or layer, or a build-cache row.
STILL_USED = sa.or_(
    sa.select(_v.c.id).where(_v.c.code_sha256 == _a.c.sha256).exists(),
    sa.select(_v.c.id).where(_v.c.artifact_sha256 == _a.c.sha256).exists(),
    sa.select(_v.c.id).where(_v.c.layer_sha256 == _a.c.sha256).exists(),
    sa.select(_b.c.key).where(_b.c.artifact_sha256 == _a.c.sha256).exists(),
)
# FOR KEY SHARE: a concurrent delete cannot collect the artifact before our version references it.
ARTIFACT_PRESENT = sa.select(_a.c.sha256).where(_a.c.sha256 == _key).with_for_update(read=True, key_share=True)
# The same lock on a built artifact a new version is to reference, and its size for the record.
ARTIFACT_SIZE = sa.select(_a.c.size).where(_a.c.sha256 == _key).with_for_update(read=True, key_share=True)

GET_BUILD = sa.select(
    _b.c.key, _b.c.runtime, _b.c.toolchain, _b.c.source_sha256, _b.c.artifact_sha256,
    _a.c.size.label("artifact_size"), _b.c.log, _b.c.duration_ms, _b.c.created_at, _b.c.kind,
).select_from(_b.join(_a, _a.c.sha256 == _b.c.artifact_sha256)).where(_b.c.key == _key)

LIST_LAYERS = sa.select(
    _b.c.key, _b.c.runtime, _b.c.toolchain, _b.c.artifact_sha256, _a.c.size, _b.c.log, _b.c.duration_ms,
    _b.c.created_at,
).select_from(_b.join(_a, _a.c.sha256 == _b.c.artifact_sha256)).where(_b.c.kind == "layer").order_by(
    _b.c.created_at.desc())
# Each tenant's own first request for a layer: what a tenant's listing shows instead of the build's.
LAYER_ASKS = sa.select(_b.c.artifact_sha256, _t.c.tenant, _t.c.duration_ms, _t.c.created_at).select_from(
    _b.join(_t, _t.c.key == _b.c.key)).where(_b.c.kind == "layer")
LAYER_USERS = sa.select(_v.c.layer_sha256, _f.c.name, _f.c.tenant).distinct().select_from(
    _v.join(_f, _f.c.id == _v.c.function_id)).where(_v.c.layer_sha256.is_not(None))

INSERT_INVOCATION = _i.insert()
GET_INVOCATION = sa.select(_i).where(_i.c.id == _key, _i.c.tenant == _tenant)
# Given a parameter dict, an UPDATE sets the columns its keys name; "key" picks the row.
UPDATE_INVOCATION = _i.update().where(_i.c.id == _key)
# Lists leave out the event: up to 6 MiB each, and shown by no list view.
LIST_INVOCATIONS = (
    sa.select(*(c for c in _i.c if c.name != "event")).where(_i.c.function_id == _key)
    .order_by(_i.c.created_at.desc(), _i.c.id.desc()).limit(sa.bindparam("limit", type_=sa.Integer))
)
# A listing's rows newest first with what each costs to load (output and logs: up to 6 MiB + 64 KiB each),
# so a listing can stop at a byte budget instead of loading a thousand results into memory.
LIST_SIZES = (
    sa.select(_i.c.id, (sa.func.coalesce(sa.func.length(_i.c.output), 0)
                        + sa.func.coalesce(sa.func.length(_i.c.logs), 0)).label("size"))
    .where(_i.c.function_id == _key)
    .order_by(_i.c.created_at.desc(), _i.c.id.desc()).limit(sa.bindparam("limit", type_=sa.Integer))
)
LIST_BY_IDS = (
    sa.select(*(c for c in _i.c if c.name != "event")).where(_i.c.id.in_(sa.bindparam("ids", expanding=True)))
)
# Claimable async work: queued and past its retry backoff, or running under a lease that ran out (its node died).
CLAIMABLE = (
    _i.c.mode == "async",
    sa.or_(
        sa.and_(_i.c.status == "queued", sa.or_(_i.c.not_before.is_(None), _i.c.not_before <= sa.bindparam("now"))),
        sa.and_(_i.c.status == "running", _i.c.lease_expires_at < sa.bindparam("now")),
    ),
)
# A node's leases: its id alone (sync calls, callback deliveries) or its id and a claim's nonce (async work).
_OWNED = sa.or_(_i.c.lease_owner == sa.bindparam("owner"),
                _i.c.lease_owner.like(sa.bindparam("owner_like", type_=sa.String), escape="\\"))
RELEASE_OWNED = (
    _i.update()
    .where(_i.c.mode == "async", _i.c.status == "running", _OWNED)
    .values(status="queued", lease_owner=None, lease_expires_at=None)
)
# A sync call with an Idempotency-Key is recorded as running before it runs; if its node stopped
# meanwhile, nobody will finish it: say so, so a repeated key gets an answer instead of waiting forever.
ABANDON_OWNED_SYNC = (
    _i.update()
    .where(_i.c.mode == "sync", _i.c.status == "running", _OWNED)
    .values(status="failed", lease_owner=None, lease_expires_at=None, finished_at=sa.bindparam("now"),
            error={"type": "NodeStopped", "message": "the node running this call stopped before it finished",
                   "stack": ""})
)
# Callback deliveries this node held when it stopped are free again at once.
RELEASE_OWNED_CALLBACKS = (
    _i.update()
    .where(_i.c.callback_status == "pending", _OWNED)
    .values(lease_owner=None, lease_expires_at=None)
)
# Every write that starts, ends or hands back an attempt is fenced by its lease token ("<node>:<nonce>",
# new with every claim). A node whose lease ran out, and whose work another claim took, changes nothing
# with a late write, even when the new claimer is the same node.
_FENCE = (_i.c.id == _key, _i.c.status == "running", _i.c.lease_owner == sa.bindparam("token"))
FENCED_UPDATE = _i.update().where(*_FENCE)
CLAIM_CALLBACKS = (
    _i.update()
    .where(_i.c.id.in_(
        sa.select(_i.c.id)
        .where(
            _i.c.callback_status == "pending",
            sa.or_(_i.c.not_before.is_(None), _i.c.not_before <= sa.bindparam("now")),
            sa.or_(_i.c.lease_expires_at.is_(None), _i.c.lease_expires_at < sa.bindparam("now")),
        )
        .order_by(_i.c.finished_at, _i.c.id)
        .limit(sa.bindparam("limit", type_=sa.Integer))
        .with_for_update(skip_locked=True)
    ))
    .values(lease_owner=sa.bindparam("owner"), lease_expires_at=sa.bindparam("expires"),
            callback_attempts=_i.c.callback_attempts + 1)
    .returning(*(c for c in _i.c if c.name != "event"))
)
CALLBACK_DONE = _i.update().where(
    _i.c.id == _key, _i.c.callback_status == "pending", _i.c.lease_owner == sa.bindparam("owner"),
    _i.c.callback_attempts == sa.bindparam("attempt"),
)
# What the retention sweep may delete: finished, and no result still to be posted to a callback (the
# subquery reads the callback_status index, not the rows, whose large values come before that column).
SWEEPABLE = (
    _i.c.status.in_(sorted(FINISHED_STATUSES)),
    _i.c.id.not_in(sa.select(_i.c.id).where(_i.c.callback_status == "pending")),
)
# Bytes an invocation keeps: event and output, and its logs (counted in characters: at most 64 KiB of them).
STORED_BYTES = (sa.func.coalesce(sa.func.length(_i.c.event), 0) + sa.func.coalesce(sa.func.length(_i.c.output), 0)
                 + sa.func.length(_i.c.logs))
TENANT_USAGE = sa.select(sa.func.coalesce(sa.func.sum(STORED_BYTES), 0)).where(_i.c.tenant == _tenant)
BY_IDEMPOTENCY_KEY = sa.select(_i).where(_i.c.tenant == _tenant, _i.c.idempotency_key == _key)
INVOCATION_FIELDS = tuple(f.name for f in fields(InvocationRecord))


def new_id() -> str:
    return uuid.uuid4().hex


def as_function(row: sa.Row) -> FunctionRecord:
    values = dict(row._mapping)
    values["env"] = dict(values["env"] or {})
    return FunctionRecord(**values)


def as_version(row: sa.Row) -> VersionRecord:
    values = dict(row._mapping)
    values["env"] = dict(values["env"] or {})
    return VersionRecord(**values)


def as_alias(row: sa.Row) -> AliasRecord:
    values = dict(row._mapping)
    extra, weight = values.pop("additional_version"), values.pop("additional_weight")
    values["additional"] = {int(extra): float(weight)} if extra is not None and weight is not None else {}
    version = values["version"]
    values["version"] = int(version) if version.isdigit() else version
    return AliasRecord(**values)


def as_invocation(row: sa.Row) -> InvocationRecord:
    return InvocationRecord(**row._mapping)


def as_api_key(row: sa.Row) -> ApiKeyRecord:
    return ApiKeyRecord(**row._mapping)


def as_build(row: sa.Row) -> BuildRecord:
    return BuildRecord(**row._mapping)
