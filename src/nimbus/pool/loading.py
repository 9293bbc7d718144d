"""What a machine is sent to load one version (``Init``), and what its answer means.

Shared by a start (warm or cold) and the making of a function template (``snapshots.py``): both load a
version into a machine the same way.
"""

from nimbus import packages, protocol, runtimes
from nimbus.agent.contract import INIT_TIMEOUT_S, LAYER_DIR
from nimbus.deployment import Deployment
from nimbus.errors import InitFailed, MachineDied, MachineTimeout
from nimbus.machines.base import Machine

DEFAULT_INIT_TIMEOUT_S = INIT_TIMEOUT_S  # the agent's provided runtime gives up just before, to say why


def _filename(dep: Deployment, code: bytes) -> str:
    """The file name Init gives the code: a package's tells the agent whether it came as a tree or a zip."""
    if dep.package:
        return protocol.ZIP_FILENAME if packages.is_zip(code) else protocol.TREE_FILENAME
    return runtimes.get(dep.runtime).machine_filename(dep.handler)


async def initialise(machine: Machine, dep: Deployment, code: bytes, start: str, *, account_id: str, region: str,
                     sdk: str | None) -> dict:
    """Send ``dep``'s Init with ``code``; the ``init_ok`` reply, or ``InitFailed`` (the caller ends the machine).

    ``sdk``: where the machine sees its runtime's bundled AWS SDK, if it has one.
    """
    header = {
        "type": protocol.INIT,
        "runtime": dep.runtime,
        "handler": dep.handler,
        "filename": _filename(dep, code),
        "env": dep.env,
        "memory_mb": dep.memory_mb,
        "timeout_s": dep.timeout_s,
        "function_name": dep.function_name,
        "function_version": dep.executed_version,  # "$LATEST" or the published number
        "account_id": account_id,
        "region": region,
    }
    if dep.layer_sha256:
        header["layer"] = LAYER_DIR
    if sdk is not None:
        header["sdk"] = sdk
    try:
        reply, _ = await machine.request(header, code, timeout=max(DEFAULT_INIT_TIMEOUT_S, dep.timeout_s))
    except MachineTimeout:
        raise InitFailed({"type": "InitTimeout", "message": "the code did not load in time", "stack": ""},
                         start) from None
    except MachineDied as exc:
        raise InitFailed({"type": "RuntimeExit", "message": f"the runtime exited while loading: {exc}",
                          "stack": ""}, start) from None
    if reply.get("type") != protocol.INIT_OK:
        raise InitFailed(error_of(reply), start)
    return reply


def error_of(reply: dict) -> dict:
    """The {type, message, stack} of an agent's error frame, trusting nothing about its shape."""
    err = reply.get("error")
    if not isinstance(err, dict):
        err = {}
    return {
        "type": str(err.get("type") or "InitError")[:200],
        "message": str(err.get("message") or "the function failed to load")[:4096],
        "stack": str(err.get("stack") or "")[:16384],
    }
