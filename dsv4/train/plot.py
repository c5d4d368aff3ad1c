"""The loss curve as a PNG through matplotlib, an optional extra (`pip install dsv4[plot]`).

Without matplotlib the plot is skipped with a one-line note; training never depends on it."""

from __future__ import annotations

import sys
from pathlib import Path


def plot_loss(
    history: list[dict], path: Path, keys: tuple[str, ...] = ("loss", "ce", "mtp_ce")
) -> Path | None:
    """Draw `keys` of the per-step records against the step into path.png; None when skipped."""
    if not history:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("loss curve skipped: matplotlib is not installed (pip install 'dsv4[plot]')", file=sys.stderr)
        return None
    steps = [r["step"] for r in history]
    fig, ax = plt.subplots(figsize=(7, 4))
    for k in keys:
        ax.plot(steps, [r[k] for r in history], label=k, lw=1)
    ax.set(xlabel="step", ylabel="cross-entropy (nats)", yscale="log", title="training loss")
    ax.legend()
    out = path.with_suffix(".png")
    fig.savefig(out, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return out
