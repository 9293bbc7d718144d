"""The bwrap driver: each machine a bubblewrap sandbox on this host (see docs/architecture.md).

``driver`` builds the command lines and owns the machines, ``machine`` runs one sandbox, ``template``
forks machines from a per-runtime sandbox on root nodes.
"""

from nimbus.machines.bwrap.driver import BwrapDriver, check_layer, enforcement, find_bwrap
from nimbus.machines.bwrap.machine import BWRAP_PROCS, BwrapMachine, describe_exit
from nimbus.machines.bwrap.template import Template, TemplateMachine

__all__ = ["BWRAP_PROCS", "BwrapDriver", "BwrapMachine", "Template", "TemplateMachine", "check_layer",
           "describe_exit", "enforcement", "find_bwrap"]
