"""Published versions and aliases, and the qualified look-up a call of ``name:qualifier`` makes.

A revision (``function_versions`` row) is immutable; publishing gives the latest one the next number
(``functions.last_published`` + 1, so a deleted number is never handed out again). An alias names a
published version, or ``$LATEST``, and may send a share of the calls to a second published version; the
choice is made per call, from a resolution cached like ``lookup_function`` (so an alias update reaches
every node within ``function_cache_s``).
"""

import random
import re
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy import exc as sa_exc
from sqlalchemy.ext.asyncio import AsyncConnection

from nimbus.errors import Conflict, InvalidRequest, NotFound
from nimbus.store import tables
from nimbus.store.database import boundary, integrity_kind
from nimbus.store.functions import FunctionsMixin
from nimbus.store.records import LATEST, AliasRecord, FunctionRecord, VersionRecord, utcnow
from nimbus.store.statements import (
    ALIASES_USING,
    FUNCTION_BY_ID,
    FUNCTION_ID,
    GET_ALIAS,
    GET_PUBLISHED,
    GET_VERSION,
    LIST_ALIASES,
    LIST_PUBLISHED,
    PUBLISHED_AS_FUNCTION,
    as_alias,
    as_function,
    as_version,
    new_id,
)

# Lambda's alias names: letters, digits, '-' and '_', not all digits (those are version numbers).
ALIAS_RE = re.compile(r"(?!^[0-9]+$)([a-zA-Z0-9-_]+)")
ALIAS_MAX = 128
DESCRIPTION_MAX = 256  # Lambda's limit on version and alias descriptions
NUMBER_DIGITS = 9  # a published number longer than this names nothing (and stays inside a 32-bit column)

_f = tables.functions
_v = tables.function_versions
_al = tables.aliases


@dataclass(frozen=True, slots=True)
class _Route:
    """A resolved qualifier: the revision to run and the version it runs as, and maybe a weighted second."""

    main: tuple[FunctionRecord, str]
    extra: tuple[FunctionRecord, str] | None = None
    weight: float = 0.0

    def pick(self) -> tuple[FunctionRecord, str]:
        if self.extra is not None and random.random() < self.weight:
            return self.extra
        return self.main


def parse_number(value: int | str) -> int:
    """A published version number from ``3`` or ``"3"``; ``InvalidRequest`` for anything else."""
    if isinstance(value, bool):
        raise InvalidRequest(f"version {value!r} is not a published version number")
    if isinstance(value, int):
        number = value
    elif isinstance(value, str) and value.isascii() and value.isdigit() and len(value) <= NUMBER_DIGITS:
        number = int(value)
    else:
        raise InvalidRequest(f"version {str(value)[:40]!r} is not a published version number")
    if not 1 <= number < 10 ** NUMBER_DIGITS:
        raise InvalidRequest(f"version {number} is not a published version number")
    return number


def check_alias_name(name: str) -> str:
    if not isinstance(name, str) or len(name) > ALIAS_MAX or not ALIAS_RE.fullmatch(name):
        raise InvalidRequest(f"alias name {str(name)[:ALIAS_MAX + 1]!r} must be 1 to {ALIAS_MAX} letters, digits, "
                             "'-' or '_', and not all digits")
    return name


def _check_description(description: str | None) -> str | None:
    if description is not None and len(description) > DESCRIPTION_MAX:
        raise InvalidRequest(f"the description is {len(description)} characters; the limit is {DESCRIPTION_MAX}")
    return description


def _alias_target(version: int | str, additional: dict | None) -> tuple[str, int | None, float | None]:
    """The (version, additional_version, additional_weight) columns of an alias, checked."""
    main = LATEST if version == LATEST else str(parse_number(version))
    if not additional:
        return main, None, None
    if not isinstance(additional, dict) or len(additional) > 1:
        raise InvalidRequest("an alias routes to at most one additional version")
    [(extra_key, weight)] = additional.items()
    if main == LATEST:
        raise InvalidRequest("an alias with an additional version must point at a published version, not $LATEST")
    extra = parse_number(extra_key)
    if isinstance(weight, bool) or not isinstance(weight, int | float) or not 0.0 <= float(weight) <= 1.0:
        raise InvalidRequest(f"the weight of version {extra} must be a number from 0 to 1")
    if str(extra) == main:
        raise InvalidRequest(f"the additional version must differ from the alias's version ({main})")
    return main, extra, float(weight)


class VersionsMixin(FunctionsMixin):
    """Publish, list and delete numbered versions; create, read, update and delete aliases."""

    # ---------------------------------------------------------------- published versions

    async def publish_version(self, name_or_id: str, tenant: str, *, description: str | None = None) -> VersionRecord:
        """Publish the latest revision as the next number; if it is published already, that version. ``NotFound``."""
        _check_description(description)
        with boundary(f"publish a version of {name_or_id!r}"):
            async with self._write() as conn:
                function_id = await self._lock_function(conn, name_or_id, tenant)
                current = as_function((await conn.execute(FUNCTION_BY_ID, {"key": function_id})).one())
                if current.published is None:
                    number = int(await conn.scalar(
                        sa.select(_f.c.last_published).where(_f.c.id == function_id)) or 0) + 1
                    values: dict = {"published": number}
                    if description is not None:  # the version's own: $LATEST keeps its description
                        values["published_description"] = description
                    await conn.execute(_v.update().where(_v.c.id == current.version_id).values(**values))
                    await conn.execute(_f.update().where(_f.c.id == function_id).values(last_published=number))
                row = (await conn.execute(GET_VERSION, {"key": current.version_id})).one()
        await self._announce("routes")
        return as_version(row)

    async def list_published(self, name_or_id: str, tenant: str) -> list[VersionRecord]:
        """The function's published versions, by ascending number. ``NotFound``."""
        with boundary(f"list versions of {name_or_id!r}"):
            async with self._read() as conn:
                function_id = await self._function_id(conn, name_or_id, tenant)
                rows = (await conn.execute(LIST_PUBLISHED, {"key": function_id})).all()
        return [as_version(row) for row in rows]

    async def get_published(self, name_or_id: str, tenant: str, number: int) -> VersionRecord:
        """Published version ``number``. ``NotFound``."""
        number = _known_number(number, name_or_id)
        with boundary(f"read version {number} of {name_or_id!r}"):
            async with self._read() as conn:
                function_id = await self._function_id(conn, name_or_id, tenant)
                row = (await conn.execute(GET_PUBLISHED, {"key": function_id, "number": number})).first()
        if row is None:
            raise _no_version(name_or_id, number)
        return as_version(row)

    async def delete_published(self, name_or_id: str, tenant: str, number: int) -> VersionRecord:
        """Unpublish version ``number`` (the revision stays while ``$LATEST`` or a queued call may need it; its
        number is not reused). ``NotFound``; ``Conflict`` while an alias routes calls to it. Returns it."""
        number = _known_number(number, name_or_id)
        with boundary(f"delete version {number} of {name_or_id!r}"):
            async with self._write() as conn:
                function_id = await self._lock_function(conn, name_or_id, tenant)
                row = (await conn.execute(GET_PUBLISHED, {"key": function_id, "number": number})).first()
                if row is None:
                    raise _no_version(name_or_id, number)
                users = (await conn.execute(
                    ALIASES_USING, {"key": function_id, "number": number, "text": str(number)})).scalars().all()
                if users:
                    raise Conflict(f"version {number} of {name_or_id!r} is used by alias(es) {', '.join(users)}; "
                                   "point them elsewhere first")
                await conn.execute(_v.update().where(_v.c.id == row.id).values(published=None,
                                                                               published_description=None))
        # Every node retires the machines of the version it no longer serves.
        await self._announce("version_deleted", version_id=row.id, number=row.published)
        return as_version(row)

    # ---------------------------------------------------------------- aliases

    async def create_alias(self, name_or_id: str, tenant: str, alias: str, *, version: int | str,
                           additional: dict | None = None, description: str = "") -> AliasRecord:
        """A new alias. ``Conflict`` if it exists; ``NotFound`` for a missing function or version;
        ``InvalidRequest`` for a bad name, version or weight."""
        check_alias_name(alias)
        _check_description(description)
        main, extra, weight = _alias_target(version, additional)
        now = utcnow()
        with boundary(f"create alias {alias!r} of {name_or_id!r}"):
            async with self._write() as conn:
                function_id = await self._lock_function(conn, name_or_id, tenant)
                if (await conn.execute(GET_ALIAS, {"key": function_id, "alias": alias})).first() is not None:
                    raise Conflict(f"alias {alias!r} of {name_or_id!r} already exists")
                await self._check_published(conn, function_id, name_or_id, main, extra)
                try:
                    await conn.execute(_al.insert(), {
                        "id": new_id(), "function_id": function_id, "tenant": tenant, "name": alias, "version": main,
                        "additional_version": extra, "additional_weight": weight, "description": description or "",
                        "revision_id": new_id(), "created_at": now, "updated_at": now,
                    })
                except sa_exc.IntegrityError as exc:
                    if integrity_kind(exc) == "unique":
                        raise Conflict(f"alias {alias!r} of {name_or_id!r} already exists") from None
                    raise
                row = (await conn.execute(GET_ALIAS, {"key": function_id, "alias": alias})).one()
        await self._announce("routes")
        return as_alias(row)

    async def get_alias(self, name_or_id: str, tenant: str, alias: str) -> AliasRecord:
        """One alias. ``NotFound``."""
        with boundary(f"read alias {alias!r} of {name_or_id!r}"):
            async with self._read() as conn:
                function_id = await self._function_id(conn, name_or_id, tenant)
                row = (await conn.execute(GET_ALIAS, {"key": function_id, "alias": alias})).first()
        if row is None:
            raise _no_alias(name_or_id, alias)
        return as_alias(row)

    async def list_aliases(self, name_or_id: str, tenant: str) -> list[AliasRecord]:
        """The function's aliases by name. ``NotFound``."""
        with boundary(f"list aliases of {name_or_id!r}"):
            async with self._read() as conn:
                function_id = await self._function_id(conn, name_or_id, tenant)
                rows = (await conn.execute(LIST_ALIASES, {"key": function_id})).all()
        return [as_alias(row) for row in rows]

    async def update_alias(self, name_or_id: str, tenant: str, alias: str, *, version: int | str | None = None,
                           additional: dict | None = None, description: str | None = None) -> AliasRecord:
        """Point an alias elsewhere (a rollback is one of these). None keeps a field; ``additional={}`` drops
        the weighted version. ``NotFound``; ``InvalidRequest``."""
        _check_description(description)
        with boundary(f"update alias {alias!r} of {name_or_id!r}"):
            async with self._write() as conn:
                function_id = await self._lock_function(conn, name_or_id, tenant)
                row = (await conn.execute(GET_ALIAS, {"key": function_id, "alias": alias})).first()
                if row is None:
                    raise _no_alias(name_or_id, alias)
                current = as_alias(row)
                main, extra, weight = _alias_target(
                    version if version is not None else current.version,
                    additional if additional is not None else current.additional)
                await self._check_published(conn, function_id, name_or_id, main, extra)
                values = {"version": main, "additional_version": extra, "additional_weight": weight,
                          "revision_id": new_id(), "updated_at": utcnow()}
                if description is not None:
                    values["description"] = description
                await conn.execute(_al.update().where(_al.c.id == current.id).values(**values))
                row = (await conn.execute(GET_ALIAS, {"key": function_id, "alias": alias})).one()
        await self._announce("routes")
        return as_alias(row)

    async def delete_alias(self, name_or_id: str, tenant: str, alias: str) -> None:
        """Delete an alias. ``NotFound``."""
        with boundary(f"delete alias {alias!r} of {name_or_id!r}"):
            async with self._write() as conn:
                function_id = await self._lock_function(conn, name_or_id, tenant)
                done = await conn.execute(_al.delete().where(_al.c.function_id == function_id, _al.c.name == alias))
                if not done.rowcount:
                    raise _no_alias(name_or_id, alias)
        await self._announce("routes")

    # ---------------------------------------------------------------- the invoke path

    async def lookup_qualified(self, name_or_id: str, tenant: str,
                               qualifier: str | None) -> tuple[FunctionRecord, str]:
        """The record a call of ``name:qualifier`` runs and the version it runs as (``$LATEST`` or "N").

        None or ``$LATEST``: the latest revision; digits: that published version; else an alias, whose
        weighted choice is made here, per call. Cached like ``lookup_function`` (the records are shared:
        callers must not change them). ``NotFound`` for an unknown version or alias.
        """
        if qualifier is None or qualifier == LATEST:
            return await self.lookup_function(name_or_id, tenant), LATEST
        key = (tenant, name_or_id, qualifier)
        known, route = self._functions.peek(key)
        if not known:
            route = await self._functions.get(key, lambda: self._resolve(name_or_id, tenant, qualifier))
        return route.pick()

    async def _resolve(self, name_or_id: str, tenant: str, qualifier: str) -> _Route:
        if qualifier.isascii() and qualifier.isdigit():
            number = _known_number(qualifier, name_or_id)
            with boundary(f"read version {number} of {name_or_id!r}"):
                async with self._read() as conn:
                    function_id = await self._function_id(conn, name_or_id, tenant)
                    return _Route(await self._published_record(conn, function_id, name_or_id, number))
        check_alias_name(qualifier)
        with boundary(f"read alias {qualifier!r} of {name_or_id!r}"):
            async with self._read() as conn:
                function_id = await self._function_id(conn, name_or_id, tenant)
                row = (await conn.execute(GET_ALIAS, {"key": function_id, "alias": qualifier})).first()
                if row is None:
                    raise _no_alias(name_or_id, qualifier)
                alias = as_alias(row)
                if alias.version == LATEST:
                    latest = as_function((await conn.execute(FUNCTION_BY_ID, {"key": function_id})).one())
                    return _Route((latest, LATEST))
                main = await self._published_record(conn, function_id, name_or_id, int(alias.version))
                if not alias.additional:
                    return _Route(main)
                [(number, weight)] = alias.additional.items()
                extra = await self._published_record(conn, function_id, name_or_id, number)
                return _Route(main, extra, weight)

    # ---------------------------------------------------------------- helpers

    async def _published_record(self, conn: AsyncConnection, function_id: str, name: str,
                                number: int) -> tuple[FunctionRecord, str]:
        row = (await conn.execute(PUBLISHED_AS_FUNCTION, {"key": function_id, "number": number})).first()
        if row is None:
            raise _no_version(name, number)
        return as_function(row), str(number)

    async def _function_id(self, conn: AsyncConnection, key: str, tenant: str) -> str:
        function_id = await conn.scalar(FUNCTION_ID, {"key": key, "tenant": tenant})
        if function_id is None:
            raise NotFound(f"function {key!r} not found")
        return function_id

    async def _check_published(self, conn: AsyncConnection, function_id: str, name: str, main: str,
                               extra: int | None) -> None:
        numbers = ([int(main)] if main != LATEST else []) + ([extra] if extra is not None else [])
        for number in numbers:
            if (await conn.execute(GET_PUBLISHED, {"key": function_id, "number": number})).first() is None:
                raise _no_version(name, number)


def _known_number(number: int | str, name: str) -> int:
    """A number that could be published; any other names no version (``NotFound``)."""
    try:
        return parse_number(number)
    except InvalidRequest:
        raise NotFound(f"version {str(number)[:40]!r} of {name!r} not found") from None


def _no_version(name: str, number: int) -> NotFound:
    return NotFound(f"version {number} of {name!r} not found")


def _no_alias(name: str, alias: str) -> NotFound:
    return NotFound(f"alias {alias[:ALIAS_MAX + 1]!r} of {name!r} not found")
