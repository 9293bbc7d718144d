"""Function names as the Lambda API takes them, and the ARNs it answers with.

``FunctionName`` may be ``name``, ``name:qualifier``, ``123456789012:function:name[:qualifier]`` or a
full ARN ``arn:aws:lambda:REGION:ACCOUNT:function:name[:qualifier]`` (at most 170 characters). An ARN
of another account or region names nothing on this node: not found, as Lambda answers for a function
that does not exist. The ``name:qualifier`` split is ``nimbus.gateway.names.split_qualifier``, the one
both APIs use.
"""

import re

from nimbus.errors import InvalidRequest
from nimbus.gateway.lambda_api import errors
from nimbus.gateway.names import split_qualifier

NAME_MAX = 170
PARTITION = "aws"
_ARN = re.compile(r"arn:aws[a-zA-Z-]*:lambda:([a-z0-9-]+):([0-9]{12}):function:(.+)")
_PARTIAL = re.compile(r"([0-9]{12}):function:(.+)")
_SIMPLE = re.compile(r"[a-zA-Z0-9_-]{1,64}")
_QUALIFIER = re.compile(r"\$LATEST|[a-zA-Z0-9_-]{1,128}")


def parse(value: str, account: str, region: str) -> tuple[str, str | None]:
    """``(name, qualifier or None)`` of a ``FunctionName``; an ARN must be this node's account and region."""
    if ":" not in value and _SIMPLE.fullmatch(value):  # the common case, first
        return value, None
    if not value or len(value) > NAME_MAX:
        raise errors.invalid(f"FunctionName must be 1 to {NAME_MAX} characters")
    rest = value
    if match := _ARN.fullmatch(value):
        arn_region, arn_account, rest = match.groups()
        if arn_region != region or arn_account != account:
            raise errors.not_found(f"Function not found: {value}")
    elif match := _PARTIAL.fullmatch(value):
        arn_account, rest = match.groups()
        if arn_account != account:
            raise errors.not_found(f"Function not found: {value}")
    try:
        name, qualifier = split_qualifier(rest)
    except InvalidRequest as exc:
        raise errors.invalid(f"FunctionName {value!r} is not valid: {exc}") from None
    if not _SIMPLE.fullmatch(name) or (qualifier is not None and not _QUALIFIER.fullmatch(qualifier)):
        raise errors.invalid(f"FunctionName {value!r} is not a name, name:qualifier or function ARN")
    return name, qualifier


def qualified(name_value: str, param: str | None, account: str, region: str) -> tuple[str, str | None]:
    """The name and the qualifier of a request: in the name, in ``Qualifier``, or both when they agree."""
    name, in_name = parse(name_value, account, region)
    if param is not None and not _QUALIFIER.fullmatch(param):
        raise errors.invalid(f"Qualifier {param!r} is not $LATEST, a version number or an alias name")
    if in_name is not None and param is not None and in_name != param:
        raise errors.invalid("The derived qualifier from the function name does not match the specified qualifier.")
    return name, in_name if in_name is not None else param


def function_arn(account: str, region: str, name: str, qualifier: str | None = None) -> str:
    arn = f"arn:{PARTITION}:lambda:{region}:{account}:function:{name}"
    return f"{arn}:{qualifier}" if qualifier else arn
