"""How many blank machines a runtime needs, from its recent warm and cold starts.

The pool's target sizes itself: the call path only counts warm and cold starts; the pre-warm
loop folds the counts into an exponentially decayed rate and applies Little's law — blank machines
needed ≈ starts per second × seconds to boot a replacement, plus a Poisson margin — clamped to
``[min_warm, max_warm]``.
"""

import math

DEFAULT_BOOT_S = 0.1  # assumed boot time of a runtime's machine until one has been measured
BOOT_WEIGHT = 0.2  # weight of the newest boot in the moving average of boot times
MIN_STARTS = 2.0  # starts in the decayed window below which the rate counts as none


def blanks_needed(rate: float, boot_s: float, window_s: float) -> int:
    """Blank machines that cover ``rate`` warm/cold starts per second when a replacement takes ``boot_s``.

    Little's law gives the starts that arrive while one replacement boots (``load = rate × boot_s``);
    ``load + √load`` adds the usual margin for Poisson arrivals (square-root staffing) so a burst does
    not drain the stock. Fewer than ``MIN_STARTS`` left in the decayed window is no rate at all: 0 (else
    one lone start would keep a blank machine booted for ever, and the target would never reach 0).
    """
    if rate * window_s < MIN_STARTS:
        return 0
    load = rate * boot_s
    return math.ceil(load + math.sqrt(load))


class Demand:
    """One runtime's appetite for blank machines, estimated from its recent warm and cold starts.

    The call path touches only ``arrivals`` (one increment per warm or cold start), so acquiring stays
    O(1) and allocation-free; the pre-warm loop calls ``update`` to fold the count into ``rate`` (an
    exponentially decayed rate with time constant ``window_s``) and recompute ``target``.
    """

    __slots__ = ("arrivals", "rate", "boot_s", "target", "_updated")

    def __init__(self, target: int, now: float) -> None:
        self.arrivals = 0
        self.rate = 0.0
        self.boot_s = DEFAULT_BOOT_S
        self.target = target
        self._updated = now

    def booted(self, seconds: float) -> None:
        """Fold one measured boot into the moving average (the lead time of a replacement)."""
        self.boot_s += BOOT_WEIGHT * (max(0.0, seconds) - self.boot_s)

    def update(self, now: float, window_s: float, low: int, high: int) -> int:
        elapsed = max(0.0, now - self._updated)
        self._updated = now
        self.rate = self.rate * math.exp(-elapsed / window_s) + self.arrivals / window_s
        self.arrivals = 0
        self.target = min(high, max(low, blanks_needed(self.rate, self.boot_s, window_s)))
        return self.target
