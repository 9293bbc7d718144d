"""The machines of one node and which one serves a call (see docs/architecture.md).

``pool.py`` hands machines out and takes them back (hot, warm, cold; the pre-warm and health loops),
``demand.py`` sizes each runtime's stock of blank machines, ``codecache.py`` keeps the code that Init
sends.
"""

from nimbus.pool.codecache import CodeCache
from nimbus.pool.demand import Demand, blanks_needed
from nimbus.pool.pool import CodeLoader, LayerPath, Lease, Pool, error_of

__all__ = ["CodeCache", "CodeLoader", "Demand", "LayerPath", "Lease", "Pool", "blanks_needed", "error_of"]
