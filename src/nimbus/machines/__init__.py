"""The machine manager: drivers that run the guest agent in isolated machines, picked by name.

The registry maps a driver name to ``"module:Class"`` and imports the module only when that driver is
loaded, so importing ``nimbus.machines`` stays cheap and a host without one driver's dependencies can
still use another. Only drivers that exist are listed.
"""

from __future__ import annotations

import importlib

TYPE_CHECKING = False  # not typing.TYPE_CHECKING: importing typing (and pathlib) would cost milliseconds
if TYPE_CHECKING:
    from pathlib import Path

    from nimbus.machines.base import Driver

DRIVERS: dict[str, str] = {
    "bwrap": "nimbus.machines.bwrap:BwrapDriver",
    "firecracker": "nimbus.machines.firecracker:FirecrackerDriver",
}


def driver_class(name: str) -> type:
    """Import and return the driver class registered as ``name`` (``ValueError`` when unknown)."""
    try:
        target = DRIVERS[name]
    except KeyError:
        known = ", ".join(sorted(DRIVERS))
        raise ValueError(f"unknown machine driver {name!r}; known drivers: {known}") from None
    module_name, _, attr = target.partition(":")
    return getattr(importlib.import_module(module_name), attr)


def load_driver(name: str, home: Path, **options) -> Driver:
    """Build the driver registered as ``name``; its per-node state lives under ``home``.

    ``options`` are the driver's own keyword arguments (``use_templates`` for bwrap, ``config`` for
    firecracker).
    """
    from pathlib import Path

    return driver_class(name)(Path(home), **options)


__all__ = ["DRIVERS", "driver_class", "load_driver"]
