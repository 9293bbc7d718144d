"""``nimbus sdk``: build the AWS SDK python3 and nodejs machines get, ahead of the first node start.

A node builds it itself before its first machine boots, if this host has none; running this first (as
``make run`` and ``make test`` do) moves that wait out of the node's start and shows the resolvers' output
when it fails. No node is needed: it writes to NIMBUS_SDK_CACHE directly.
"""

import asyncio
from typing import Annotated

import typer

from nimbus.cli.client import fail
from nimbus.cli.output import note, table


def sdk(
    runtime: Annotated[list[str] | None, typer.Option("--runtime", "-r", help="python3 or nodejs (repeatable; "
                                                      "default: both).", show_default=False)] = None,
) -> None:
    """Build the bundled AWS SDK (boto3; the @aws-sdk v3 clients) unless this host has it; print where."""
    import logging

    from pydantic import ValidationError

    from nimbus.app import bundled_sdk
    from nimbus.compiler import sdk as bundled
    from nimbus.compiler.base import BuildFailed
    from nimbus.config import Settings
    from nimbus.errors import NimbusError

    try:
        settings = Settings()
    except (ValidationError, ValueError, OSError) as exc:
        fail(f"invalid configuration: {exc}", 2)
    unknown = sorted(set(runtime or ()) - set(bundled.RUNTIMES))
    if unknown:
        fail(f"no bundled SDK for {', '.join(unknown)}; runtimes with one: {', '.join(bundled.RUNTIMES)}", 2)
    if not settings.sdk_layer:
        note("NIMBUS_SDK_LAYER is off: machines get no bundled SDK; nothing to build")
        return
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        found = asyncio.run(bundled_sdk(settings, runtime or list(bundled.RUNTIMES)))
    except BuildFailed as exc:
        fail(str(exc))
    except NimbusError as exc:
        fail(str(exc))
    from pathlib import Path

    rows = [[name, " ".join(f"{pkg}@{version}" for pkg, version in bundled.versions(name, Path(path)).items()
                            if pkg in ("boto3", "botocore", "@aws-sdk/client-s3")), path]
            for name, path in found.items()]
    typer.echo(table(["RUNTIME", "VERSIONS", "PATH"], rows))
