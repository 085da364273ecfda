"""Timeline plot of a simulated run: load, replicas per role and policy, attainment per bin.

Ticks are binned (about 300 bins over the run) so a 14-day run draws as quickly and as small
as an hour-long one; the PNG stays well under 200 KB at the default size.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from kleave.sim.metrics import FloatArray
from kleave.sim.runner import Run

BINS = 300


def _binned(t: FloatArray, values: FloatArray, edges: FloatArray, *, mean: bool) -> FloatArray:
    index = np.clip(np.searchsorted(edges, t, side="left") - 1, 0, len(edges) - 2)
    sums = np.asarray(np.bincount(index, weights=values, minlength=len(edges) - 1), np.float64)
    if not mean:
        return sums
    counts = np.bincount(index, minlength=len(edges) - 1)
    return np.asarray(sums / np.maximum(counts, 1), dtype=np.float64)


def plot(run: Run, path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = run.results
    t = results[0].timeline.t_s
    span = float(t[-1]) if len(t) else 1.0
    hours = span > 6 * 3600
    unit, div = ("hours", 3600.0) if hours else ("minutes", 60.0)
    edges = np.linspace(0.0, span + 1e-9, min(BINS, len(t)) + 1)
    centers = (edges[:-1] + edges[1:]) / 2 / div
    width = float(edges[1] - edges[0])
    fig, axes = plt.subplots(4, 1, figsize=(10, 9), sharex=True, dpi=80)
    load = _binned(t, results[0].timeline.arrivals, edges, mean=False) / width
    axes[0].plot(centers, load, color="black", lw=1)
    axes[0].set_ylabel("arrivals/s")
    axes[0].set_title(f"{Path(run.options.trace).name} (rate scale {run.scale:g}, {run.engine})")
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for n, result in enumerate(results):
        c = colors[n % len(colors)]
        tl = result.timeline
        for ax, role in ((axes[1], "prefill"), (axes[2], "decode")):
            ax.plot(
                centers,
                _binned(t, tl.replicas[role], edges, mean=True),
                color=c,
                lw=1.2,
                label=result.policy,
            )
        arrivals = _binned(t, tl.arrivals, edges, mean=False)
        met = _binned(t, tl.met, edges, mean=False)
        share = np.where(arrivals > 0, met / np.maximum(arrivals, 1e-12), np.nan)
        axes[3].plot(centers, share * 100, color=c, lw=1.0, label=result.policy)
    axes[1].set_ylabel("prefill replicas")
    axes[2].set_ylabel("decode replicas")
    axes[3].set_ylabel("SLO met %")
    axes[3].set_ylim(max(0.0, float(np.nanmin([0.0, *axes[3].get_ylim()]))), 101)
    axes[3].set_xlabel(unit)
    axes[1].legend(loc="upper left", fontsize=8, ncol=len(results))
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
