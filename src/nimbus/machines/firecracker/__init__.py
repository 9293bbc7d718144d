"""The Firecracker driver: each machine a microVM on a KVM host (see docs/architecture.md).

``driver`` makes machines (booted or restored from a snapshot), ``machine`` runs one through its start
steps, ``api`` speaks Firecracker's HTTP API, ``jail`` stages the jailer, ``vsock`` connects to the
agent; ``images`` and ``kernel`` build what guests boot, ``kvm`` probes whether this host can run them.
"""

from nimbus.machines.firecracker.driver import DEFAULT_BOOT_ARGS, FirecrackerConfig, FirecrackerDriver
from nimbus.machines.firecracker.machine import BOOT_STEPS, FirecrackerMachine, Snapshot, describe_exit, plan

__all__ = ["BOOT_STEPS", "DEFAULT_BOOT_ARGS", "FirecrackerConfig", "FirecrackerDriver", "FirecrackerMachine",
           "Snapshot", "describe_exit", "plan"]
