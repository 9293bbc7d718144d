"""The ``nodejs`` runtime: one persistent ``node`` child per machine, running ``node_runner.js``.

The child is started at ``init`` (not per call), loads the handler once and keeps it, as Lambda does.
Requests go to it on a pipe that becomes its fd 3 and replies come back on a pipe that becomes its fd 4,
both in ``nimbus.protocol`` frames (:class:`nimbus.agent.child.FramedChild`); its fds 1 and 2 are the
agent's, so its output lands in the same captured log as Python's would. If the child dies during a call
(``process.exit``, a crash, the OOM killer) the call fails with ``RuntimeExit`` and the machine is marked
dead.

A function with a dependency layer (the contents of a ``node_modules`` directory, at ``/opt/layer``)
finds its packages through ``NODE_PATH`` from CommonJS, and through a ``node_modules`` symlink to the
layer in the task directory from ES modules, whose resolution ignores ``NODE_PATH``. A function that
ships its own ``node_modules`` keeps it: its ES modules then see only that.
"""

import os

from nimbus import protocol
from nimbus.agent.base import Call, FunctionSpec, InvocationError, check_result_size, new_trace_id
from nimbus.agent.child import FramedChild, reported_error
from nimbus.agent.contract import RESULT_MAX

NODE = "node"  # found on PATH
RUNNER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "node_runner.js")


def link_layer(spec: FunctionSpec) -> None:
    """Link ``/var/task/node_modules`` to the layer, unless the package has its own (see the module docstring)."""
    modules = os.path.join(spec.task_dir, "node_modules")
    if not os.path.lexists(modules):
        try:
            os.symlink(spec.layer, modules)
        except OSError as exc:
            raise InvocationError("LayerUnavailable", f"cannot link {modules} to the layer: {exc}",
                                  fatal=True) from None


def use_layer(spec: FunctionSpec) -> None:
    """Make the layer's packages resolvable for the node child about to start (see the module docstring)."""
    link_layer(spec)
    # After any NODE_PATH of the function's own: its entries win, as its own node_modules does.
    own = os.environ.get("NODE_PATH")
    os.environ["NODE_PATH"] = f"{own}{os.pathsep}{spec.layer}" if own else spec.layer


class NodeRuntime:
    """Drives the node child: spawn, ``init``, then one ``exec`` at a time."""

    def __init__(self, spec: FunctionSpec) -> None:
        self.spec = spec
        self.child = FramedChild("the node process")

    def prepare(self) -> None:
        """The task directory's link to the layer, made before the directory turns read-only."""
        if self.spec.layer is not None:
            link_layer(self.spec)

    def load(self) -> None:
        """Start node and have it import the handler."""
        if self.spec.layer is not None:
            use_layer(self.spec)
        self.child.start([NODE, RUNNER], search_path=True)
        request = {
            "type": protocol.INIT,
            "task_dir": self.spec.task_dir,
            "handler": self.spec.handler,
            "function_name": self.spec.name,
            "function_version": self.spec.version,
            "memory_mb": self.spec.memory_mb,
            "arn": self.spec.arn,
            "log_group_name": self.spec.log_group_name,
            "log_stream_name": self.spec.log_stream_name,
            "result_max": RESULT_MAX,
        }
        header, _ = self.child.request(request)
        if header["type"] != protocol.INIT_OK:
            raise reported_error(header, fatal=True)

    def invoke(self, event: bytes, call: Call) -> bytes:
        """Run one call in node and return its JSON result."""
        request = {"type": protocol.EXEC, "invocation_id": call.invocation_id, "deadline_ms": call.remaining_ms(),
                   "trace_id": new_trace_id(), "arn": call.arn(self.spec)}
        if call.client_context is not None:
            request["client_context"] = call.client_context
        header, blob = self.child.request(request, event)
        if header["type"] != protocol.RESULT:
            raise reported_error(header)
        return check_result_size(blob)

    def close(self) -> None:
        """Close the channel (node exits on its end) and reap the child."""
        self.child.stop()


def runtime(spec: FunctionSpec) -> NodeRuntime:
    """Entry point of the runtime registry in ``nimbus.agent.main``."""
    return NodeRuntime(spec)
