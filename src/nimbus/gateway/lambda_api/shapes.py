"""FunctionConfiguration and AliasConfiguration as botocore's model names and types them.

Records are the store's: ``FunctionRecord`` for ``$LATEST``, ``VersionRecord`` for a published version.
``State: Active`` and ``LastUpdateStatus: Successful`` always: a create or update answers only once its
build and layer exist, so there is nothing pending for boto3's waiters to wait for.
"""

import base64
import math
import sys
import uuid
from datetime import datetime

from nimbus.gateway.lambda_api.names import function_arn

LATEST = "$LATEST"
LANGUAGE_RUNTIMES = {"python3": f"python3.{sys.version_info.minor}"}  # the host's Python runs functions


def last_modified(when: datetime) -> str:
    """Lambda's format: ``2024-05-01T12:00:00.000+0000``."""
    return when.strftime("%Y-%m-%dT%H:%M:%S.") + f"{when.microsecond // 1000:03d}+0000"


def code_sha256(hex_digest: str) -> str:
    """Lambda's CodeSha256: the base64 of the sha256 digest of the code (the zip, for packages)."""
    return base64.b64encode(bytes.fromhex(hex_digest)).decode()


def revision_id(revision: str) -> str:
    """A revision's id as the dashed UUID Lambda's RevisionId is."""
    try:
        return str(uuid.UUID(revision))
    except ValueError:
        return revision


def runtime_name(runtime: str) -> str:
    return LANGUAGE_RUNTIMES.get(runtime, runtime)


def configuration(record, *, account: str, region: str, version: str = LATEST,
                  arn_qualifier: str | None = None) -> dict:
    """A FunctionConfiguration of ``record`` as ``version`` (``$LATEST`` or a published number)."""
    name = getattr(record, "function_name", None) or record.name
    revision = getattr(record, "version_id", None) or record.id
    when = getattr(record, "updated_at", None) or record.created_at
    view = {
        "FunctionName": name,
        "FunctionArn": function_arn(account, region, name, arn_qualifier),
        "Runtime": runtime_name(record.runtime),
        "Handler": record.handler,
        "CodeSize": record.code_size,
        "Description": getattr(record, "description", "") or "",
        "Timeout": max(1, math.ceil(float(record.timeout_s))),
        "MemorySize": int(record.memory_mb),
        "LastModified": last_modified(when),
        "CodeSha256": code_sha256(record.code_sha256),
        "Version": version,
        "RevisionId": revision_id(revision),
        "State": "Active",
        "LastUpdateStatus": "Successful",
        "PackageType": "Zip",
        "Architectures": ["x86_64"],
        "TracingConfig": {"Mode": "PassThrough"},
        "EphemeralStorage": {"Size": 512},
        "LoggingConfig": {"LogFormat": "Text", "LogGroup": f"/aws/lambda/{name}"},
    }
    if getattr(record, "role", None):
        view["Role"] = record.role
    if record.env:
        view["Environment"] = {"Variables": dict(record.env)}
    return view


def alias_configuration(alias, *, account: str, region: str) -> dict:
    view = {
        "AliasArn": function_arn(account, region, alias.function_name, alias.name),
        "Name": alias.name,
        "FunctionVersion": str(alias.version),
        "Description": alias.description or "",
        "RevisionId": revision_id(alias.revision_id),
    }
    if alias.additional:
        view["RoutingConfig"] = {"AdditionalVersionWeights": {str(v): float(w) for v, w in alias.additional.items()}}
    return view
