"""The latency histogram for the README: warm (hot) calls vs cold starts, on one log-scaled axis."""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display here; must precede pyplot
import matplotlib.pyplot as plt
import numpy as np


def latency_histogram(path: Path, series: dict[str, list[float]], title: str) -> None:
    """One PNG: a histogram per series of latencies given in milliseconds, log-spaced bins."""
    values = [v for samples in series.values() for v in samples if v > 0]
    bins = np.geomspace(min(values) * 0.9, max(values) * 1.1, 80)
    fig, ax = plt.subplots(figsize=(9, 4.5), dpi=110)
    for (label, samples), color in zip(series.items(), ("tab:blue", "tab:orange", "tab:green", "tab:red"),
                                       strict=False):
        p50 = float(np.median(samples))
        ax.hist(samples, bins=bins, alpha=0.6, color=color, label=f"{label} (n={len(samples)}, p50 {p50:.2f} ms)")
        ax.axvline(p50, color=color, linestyle="--", linewidth=1)
    ax.set_xscale("log")
    ax.set_xlabel("latency per call over HTTP (ms, log scale)")
    ax.set_ylabel("calls")
    ax.set_title(title)
    ax.legend()
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
