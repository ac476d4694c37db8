"""One PNG of the training curves: reward, accuracy, completion length, KL over steps."""

from __future__ import annotations

import math

PANELS = (("reward", "reward (mean)"), ("accuracy", "train accuracy"), ("completion_len", "completion length"),
          ("kl", "KL to reference"))


def plot_history(history: list[dict], path: str, title: str = "GRPO", extra: dict | None = None) -> str | None:
    """Write the curves to ``path``; returns None (and says so) when matplotlib is missing.

    ``extra`` maps a label to a list of (step, value) points drawn on the accuracy panel, e.g.
    held-out accuracy evaluated every few steps.
    """
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("plot skipped: matplotlib is not installed (pip install -e '.[bench]')")
        return None
    fig, axes = plt.subplots(1, len(PANELS), figsize=(4 * len(PANELS), 3.2))
    steps = [m["step"] for m in history]
    for ax, (key, label) in zip(axes, PANELS):
        ys = [m.get(key, math.nan) for m in history]
        ax.plot(steps, ys, lw=1.2, label=label)
        if key == "accuracy" and extra:
            for name, pts in extra.items():
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", ms=3, label=name)
            ax.legend(fontsize=7)
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
