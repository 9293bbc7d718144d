"""How a function is named in a request: ``name`` or ``name:qualifier``, for /api/v1 and the Lambda API alike.

The qualifier is ``$LATEST``, a published version number, or an alias (``Store.lookup_qualified``
resolves it). Function names cannot hold ``:`` (``schemas.NAME_PATTERN``), so the first one splits.
"""

from nimbus.errors import InvalidRequest


def split_qualifier(name: str) -> tuple[str, str | None]:
    """``"fn:prod"`` → ``("fn", "prod")``; ``"fn"`` → ``("fn", None)``. An empty qualifier is refused."""
    base, sep, qualifier = name.partition(":")
    if not sep:
        return name, None
    if not qualifier:
        raise InvalidRequest(f"{name[:200]!r} ends in ':' without a version or alias after it")
    return base, qualifier


def merge_qualifier(name: str, qualifier: str | None) -> tuple[str, str | None]:
    """The name and qualifier of a request that may give one in the name and one as ``?qualifier=``: the two
    must agree when both are given."""
    base, in_name = split_qualifier(name)
    if qualifier is not None and qualifier == "":
        raise InvalidRequest("the qualifier is empty")
    if in_name is not None and qualifier is not None and in_name != qualifier:
        raise InvalidRequest(f"the name says qualifier {in_name[:130]!r} but ?qualifier= says {qualifier[:130]!r}")
    return base, in_name if in_name is not None else qualifier
