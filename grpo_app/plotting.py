"""PNG plots: a run's training curves, the demo's comparison, and the study's grid.

Every axis is labelled with its quantity and unit; a panel with nothing to show is left out
(e.g. the KL panel when β = 0 builds no reference model) instead of a flat line at zero.

- ``plot_history(history, path)``: reward, accuracy (train batches + held-out evals), completion
  length, KL to the reference (when logged), over GRPO steps. ``read_metrics(path)`` reads a
  whole ``metrics.jsonl``, so the plot of a resumed run shows every step, not only the new ones.
- ``plot_demo(result, path)``: held-out accuracy against wall time for GRPO, the same GRPO policy
  on swapped images (the control) and the SFT baseline, chance level, and GRPO's training reward.
- ``plot_over_time(points, path)``: held-out accuracy with its 95 % interval against the step of
  each checkpoint of a run (``grpo eval --over-time``).
- ``plot_study(summary, path)``: held-out accuracy per setting, mean with its 95 % interval over
  seeds and items (± sd when the cells carry no per-item scores), each seed a
  dot, the start (format-warmed model) as a line; format rate and reasoning length beside it.
"""

from __future__ import annotations

import math

from grpo_core import metrics_log


def _pyplot():
    """matplotlib.pyplot with the file backend, or None (and a note) when it is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        return plt
    except ImportError:
        print("plot skipped: matplotlib is not installed (pip install -e '.[bench]')")
        return None


def _save(plt, fig, path: str, title: str) -> str:
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def read_metrics(path: str) -> list[dict]:
    """Every step of a metrics.jsonl, each once, in order (grpo_core.metrics_log.read_metrics: a
    resumed run's repeated steps are superseded, a torn line is skipped), null read as NaN."""
    return metrics_log.read_metrics(path, missing=math.nan)


def _finite(xs, ys):
    pts = [(x, y) for x, y in zip(xs, ys) if isinstance(y, (int, float)) and math.isfinite(y)]
    return [p[0] for p in pts], [p[1] for p in pts]


def rolling_mean(ys: list[float], window: int) -> list[float]:
    """Mean of the last ``window`` values at each point (fewer at the start)."""
    out, acc = [], 0.0
    for i, y in enumerate(ys):
        acc += y
        if i >= window:
            acc -= ys[i - window]
        out.append(acc / min(i + 1, window))
    return out


def _line(ax, xs, ys, label, smooth=0, **kw):
    xs, ys = _finite(xs, ys)
    if not xs:
        return False
    if smooth and len(ys) > smooth:
        ax.plot(xs, ys, lw=0.6, alpha=0.35, **kw)
        ax.plot(xs, rolling_mean(ys, smooth), lw=1.4, label=f"{label} (mean of {smooth} steps)", **kw)
    else:
        ax.plot(xs, ys, lw=1.2, label=label, **kw)
    return True


def plot_history(history: list[dict], path: str, title: str = "GRPO", extra: dict | None = None) -> str | None:
    """The training curves of one run (see the module docstring); ``extra`` maps a label to
    (step, accuracy) points drawn on the accuracy panel. Returns the path, or None."""
    plt = _pyplot()
    if plt is None or not history:
        return None
    steps = [m["step"] for m in history]
    col = lambda k: [m.get(k, math.nan) for m in history]       # noqa: E731
    smooth = 20 if len(history) >= 100 else 0
    panels = []

    def reward(ax):
        return _line(ax, steps, col("reward"), "mean reward of the step's N completions", smooth)

    def accuracy(ax):
        drawn = _line(ax, steps, col("accuracy"), "train batches", smooth)
        drawn |= _line(ax, steps, col("format_rate"), "format rate, train", smooth, ls=":")
        ex, ey = _finite(steps, col("eval/accuracy"))
        if ex:
            ax.plot(ex, ey, "o-", ms=3, label="held-out (eval)")
        for name, pts in (extra or {}).items():
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], "s-", ms=3, label=name)
        ax.set_ylim(-0.02, 1.02)
        return drawn or bool(ex)

    def length(ax):
        return _line(ax, steps, col("completion_len"), "mean completion length", smooth)

    def kl(ax):
        return _line(ax, steps, col("kl"), "KL(π‖π_ref) estimate", smooth)

    def logged(*keys, nonzero=False):       # does the panel have anything to show?
        ys = [y for k in keys for y in _finite(steps, col(k))[1]]
        return bool(ys) and (not nonzero or any(y != 0 for y in ys))

    for draw, ylabel, shown in ((reward, "reward (weighted sum of rewards)", logged("reward")),
                                (accuracy, "accuracy (fraction correct)", logged("accuracy", "eval/accuracy") or extra),
                                (length, "completion length (tokens)", logged("completion_len")),
                                (kl, "KL to reference (nats/token)", logged("kl", nonzero=True))):
        if shown:                            # e.g. no KL panel with β = 0: not a flat line at zero
            panels.append((draw, ylabel))
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
    for ax, (draw, ylabel) in zip(axes[0], panels):
        draw(ax)
        ax.set_xlabel("GRPO step")
        ax.set_ylabel(ylabel, fontsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    return _save(plt, fig, path, title)


def plot_demo(result: dict, history: list[dict], path: str) -> str | None:
    """The demo's picture: held-out accuracy vs wall time of GRPO, swapped images and the SFT
    baseline (``result["curves"]``: name → [(seconds, accuracy)]), and GRPO's training reward."""
    plt = _pyplot()
    if plt is None:
        return None
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.8))
    styles = {"GRPO": "o-", "GRPO, images swapped": "x--", "SFT baseline (gold letters)": "s-"}
    for name, pts in result["curves"].items():
        if pts:
            a1.plot([p[0] for p in pts], [p[1] for p in pts], styles.get(name, "o-"), ms=3, label=name)
    a1.axhline(result.get("chance", 0.25), color="grey", lw=0.8, ls=":", label="chance")
    a1.set_xlabel("training wall time (s, one CPU thread)")
    a1.set_ylabel("held-out accuracy (fraction correct)")
    a1.set_ylim(-0.02, 1.02)
    a1.grid(alpha=0.3)
    a1.legend(fontsize=7)
    steps = [m["step"] for m in history]
    _line(a2, steps, [m.get("reward", math.nan) for m in history], "GRPO mean reward",
          20 if len(history) >= 100 else 0)
    a2.set_xlabel("GRPO step")
    a2.set_ylabel("reward (accuracy of the step's completions)")
    a2.set_ylim(-0.02, 1.02)
    a2.grid(alpha=0.3)
    a2.legend(fontsize=7)
    return _save(plt, fig, path, f"GRPO demo, seed {result['seed']}: {len(history)} GRPO steps in "
                                 f"{result['grpo_seconds']:.0f} s")


def plot_study(summary: dict, path: str, title: str = "study") -> str | None:
    """Bars per setting: held-out accuracy (mean, 95 % CI, seeds as dots), format, reasoning."""
    plt = _pyplot()
    rows = summary.get("settings", [])
    if plt is None or not rows:
        return None
    names = [r["setting"] for r in rows]
    x = list(range(len(names)))
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.9))
    for ax, key, ylabel in ((axes[0], "accuracy", "held-out accuracy (fraction correct)"),
                            (axes[1], "format_rate", "format rate (fraction well formed)"),
                            (axes[2], "reasoning_words", "reasoning length (words in <think>)")):
        means = [r[key]["mean"] for r in rows]
        err = [r[key]["sd"] for r in rows]
        if key == "accuracy" and all(r.get("accuracy_ci") for r in rows):   # the 95 % interval
            cis = [r["accuracy_ci"]["ci"] for r in rows]
            err = [[max(0.0, m - c[0]) for m, c in zip(means, cis)],
                   [max(0.0, c[1] - m) for m, c in zip(means, cis)]]
        ax.bar(x, means, yerr=err, capsize=3, color="#8fb3d9", edgecolor="#35608f")
        for i, r in enumerate(rows):
            vals = r[key]["values"]
            ax.plot([i] * len(vals), vals, "k.", ms=4)
        start = summary.get("start", {}).get(key)
        if start is not None:
            ax.axhline(start, color="#c0392b", lw=1, ls="--", label="start (format-warmed model)")
            ax.legend(fontsize=7)
        ax.set_xticks(x, names, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel(ylabel, fontsize=8)
        ax.grid(alpha=0.3, axis="y")
    axes[0].set_ylim(0, 1)
    axes[1].set_ylim(0, 1.05)
    return _save(plt, fig, path, title)


def plot_over_time(points: list[dict], path: str, title: str = "over time") -> str | None:
    """Held-out accuracy (95 % interval as error bars) vs checkpoint step, same items at each."""
    plt = _pyplot()
    if plt is None or not points:
        return None
    steps = [p["step"] for p in points]
    acc = [p["accuracy"] for p in points]
    err = [[a - p["ci"][0] for a, p in zip(acc, points)],
           [p["ci"][1] - a for a, p in zip(acc, points)]]
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    ax.errorbar(steps, acc, yerr=err, fmt="o-", capsize=3, color="#35608f",
                label=f"held-out accuracy, {points[0]['n']} items (95 % bootstrap CI)")
    ax.set_xlabel("GRPO step (checkpoint)")
    ax.set_ylabel("held-out accuracy (fraction correct)")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(plt, fig, path, title)
