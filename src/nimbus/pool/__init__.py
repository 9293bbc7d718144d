"""The machines of one node and which one serves a call (see docs/architecture.md).

``pool.py`` hands machines out and takes them back (hot, forked, warm, cold; the pre-warm and health
loops), ``snapshots.py`` keeps the function templates machines are forked from, ``demand.py`` sizes each
runtime's stock of blank machines, ``loading.py`` says what Init sends and ``codecache.py`` keeps the
code it sends.
"""

from nimbus.pool.codecache import CodeCache
from nimbus.pool.demand import Demand, blanks_needed
from nimbus.pool.loading import error_of
from nimbus.pool.pool import CodeLoader, LayerPath, Lease, Pool

__all__ = ["CodeCache", "CodeLoader", "Demand", "LayerPath", "Lease", "Pool", "blanks_needed", "error_of"]
