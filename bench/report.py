"""Turn the suite's collected results into one markdown report and PNG plots.

Every benchmark script writes ``{"meta": {...}, "rows": [{...}, ...]}``. A row names its
implementation in a provider column and its time in a time column; the other non-metric fields
(N, V, G, mode, ...) are the row's case. For each case the reference provider of that benchmark
(e.g. the plain-PyTorch path, HF generate, TRL) is the denominator of two ratio columns:

    speedup = t_ref / t          (> 1: faster than the reference, same run, same case)
    mem/ref = mem / mem_ref      (< 1: less peak memory)

Kernels also get "% of roofline" = achieved GB/s / the device's HBM bandwidth, where achieved
GB/s comes from the script's own bytes-moved formula (its "GB/s" column, or "bytes" / time).
Peak bandwidths come from bench/common.py (known GPUs only); elsewhere the column is left out.
"""

from __future__ import annotations

import math
import os

PROVIDER_COLS = ("provider", "impl", "backend", "engine")
TIME_COLS = (("ms", 1e-3), ("median_ms", 1e-3), ("time_ms", 1e-3), ("s", 1.0), ("median_s", 1.0))
MEM_COLS = ("peak_mem_mb", "peak_mb", "mem_mb", "peak_memory_mb", "peak_mib")
def find_col(row: dict, names) -> str | None:
    return next((c for c in names if c in row), None)


def time_col(row: dict) -> tuple[str, float] | None:
    return next(((c, unit) for c, unit in TIME_COLS if c in row), None)


NOT_CASE = {"s", "steps", "reps", "completion_len", "note", "mem_kind", "threads"}


def metric_keys(rows: list[dict]) -> set:
    """Fields that are measurements, not part of a row's case: any field that is a float or None
    in some row, memory / time / rate names, and free-text notes."""
    keys = set(NOT_CASE) | set(MEM_COLS)
    for r in rows:
        for k, v in r.items():
            low = k.lower()
            if v is None or isinstance(v, float) or any(
                    s in low for s in ("ms", "mem", "gb", "bytes", "flops", "per_s")):
                keys.add(k)
    return keys


def case_key(row: dict, skip: set) -> tuple:
    return tuple(sorted((k, str(v)) for k, v in row.items() if k not in skip))


def add_ratios(rows: list[dict], reference: str | None, peak_bytes_per_s: float | None = None) -> list[str]:
    """Add speedup / mem-ratio (and % roofline) columns in place; returns the added column names."""
    if not rows:
        return []
    prov, tc = find_col(rows[0], PROVIDER_COLS), time_col(rows[0])
    added: list[str] = []
    if prov and tc and reference and any(r.get(prov) == reference for r in rows):
        skip = metric_keys(rows) | {prov}
        refs = {case_key(r, skip): r for r in rows if r.get(prov) == reference}
        mem = next((c for c in MEM_COLS if any(c in r for r in rows)), None)
        for r in rows:
            ref = refs.get(case_key(r, skip))
            if ref is None or not r.get(tc[0]) or not ref.get(tc[0]):
                continue
            r[f"speedup_vs_{reference}"] = ref[tc[0]] / r[tc[0]]
            if mem and r.get(mem) and ref.get(mem):
                r[f"mem_vs_{reference}"] = r[mem] / ref[mem]
        added += [f"speedup_vs_{reference}"] + ([f"mem_vs_{reference}"] if mem else [])
    if peak_bytes_per_s and tc and not any(r.get("roofline_pct") is not None for r in rows):
        for r in rows:                        # scripts that give GB/s (or bytes) but no roofline yet
            gbps = r.get("GB/s", r.get("gbps"))
            if gbps is None and r.get("bytes") and r.get(tc[0]):
                gbps = r["bytes"] / (r[tc[0]] * tc[1]) / 1e9
            if gbps is not None:
                r["pct_roofline"] = 100.0 * gbps * 1e9 / peak_bytes_per_s
        if any("pct_roofline" in r for r in rows):
            added.append("pct_roofline")
    return added


def fmt(v) -> str:
    if isinstance(v, float):
        return "" if math.isnan(v) else f"{v:.4g}"
    return "" if v is None else str(v)


def table(rows: list[dict]) -> list[str]:
    cols: list[str] = []
    for r in rows:
        cols += [c for c in r if c not in cols and not isinstance(r[c], (list, dict))]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    return lines + ["| " + " | ".join(fmt(r.get(c)) for c in cols) + " |" for r in rows]


def markdown(suite: dict) -> str:
    m = suite["meta"]
    out = [f"# grpo_core benchmarks — {m['device']}", "",
           f"date: {m['date']}  ", f"command: `{m['command']}`  ", f"torch {m['torch']}, git {m['git']}, "
           f"load average at start {m['load_start']}, at end {m['load_end']}, total {m['seconds']:.0f} s", ""]
    out += [f"note: {n}  " for n in m.get("notes", [])]
    for name, b in suite["benchmarks"].items():
        out += ["", f"## {name} ({b['status']}, {b.get('seconds', 0):.1f} s)", ""]
        if b["status"] != "ok":
            out += [f"```\n{b.get('error', '').strip()[-1500:]}\n```"]
            continue
        merged: dict = {}                      # runs of one script (a sweep) → one table
        for part in b["parts"]:
            if part["file"] in merged:
                merged[part["file"]]["rows"] = merged[part["file"]]["rows"] + part["rows"]
                merged[part["file"]]["runs"].append(part.get("argv", []))
            else:
                merged[part["file"]] = dict(part, runs=[part.get("argv", [])])
        for part in merged.values():
            pm = part.get("meta", {})
            ref = part.get("reference")
            out += [f"### {pm.get('title') or pm.get('bench') or name} ({part['file']})", ""]
            if pm.get("command"):
                out.append(f"command: `{pm['command']}`  ")
            if len(part["runs"]) > 1:
                out.append("runs of the sweep (arguments): " + "; ".join(f"`{' '.join(r) or '(defaults)'}`"
                                                                         for r in part["runs"]) + "  ")
            if ref and part.get("ratio_columns"):
                out.append(f"ratios against `{ref}` measured in this run (speedup = t_{ref} / t)  ")
            for key in ("bytes", "memory"):
                if pm.get(key):
                    out.append(f"{key}: {pm[key]}  ")
            out += [f"note: {n}  " for n in pm.get("notes", [])] + [""]
            out += table(part["rows"]) if part["rows"] else ["(no rows)"]
            out.append("")
    if suite.get("plots"):
        out += ["", "## plots", ""] + [f"![{os.path.basename(p)}]({os.path.basename(p)})" for p in suite["plots"]]
    return "\n".join(out) + "\n"


# ---- plots -------------------------------------------------------------------------------------


def _sweep(rows: list[dict], x: str, other: str) -> list[dict]:
    """Rows of the sweep over `x`: those at the most common value of `other`."""
    counts: dict = {}
    for r in rows:
        counts[r[other]] = counts.get(r[other], 0) + 1
    fixed = max(counts, key=lambda v: (counts[v], v))
    return [r for r in rows if r[other] == fixed]


def plot_loss(rows: list[dict], path_stem: str, title: str) -> list[str]:
    """PNGs of the full step (fwd + bwd) vs tokens N and vs vocabulary V, one figure per op and
    swept axis, one line per provider: the speedup over the reference and the peak-memory ratio,
    each measured in the same run (columns ``speedup_vs_<ref>`` / ``mem_vs_<ref>`` from add_ratios).

    Ratios, not raw times: providers of one case are timed back to back, so load from other jobs
    moves both and mostly cancels in the ratio, while raw times of separate cases swing with it.
    The reference is the dashed line at 1. Rows without ratio columns plot nothing."""
    rows = [dict(r, tokens=r.get("tokens", r["N"] * r.get("T", 1))) for r in rows if "N" in r and "V" in r]
    mode = find_col(rows[0], ("mode", "pass")) if rows else None
    rows = [r for r in rows if r.get(mode, "full") == "full"]
    speed = next((c for r in rows for c in r if c.startswith("speedup_vs_")), None)
    if not rows or speed is None:
        return []
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("plots skipped: matplotlib is not installed (pip install -e '.[bench]')")
        return []
    ref = speed[len("speedup_vs_"):]
    mem = f"mem_vs_{ref}" if any(r.get(f"mem_vs_{ref}") is not None for r in rows) else None
    prov = find_col(rows[0], PROVIDER_COLS)
    mem_kind = next((r["mem_kind"] for r in rows if r.get("mem_kind")), "")
    metrics = [(speed, f"speedup over {ref} (× faster, same run)")]
    metrics += [(mem, f"peak memory / {ref}'s ({mem_kind or 'measured'})")] if mem else []
    written = []
    for op in sorted({str(r.get("op", "")) for r in rows}):
        op_rows = [r for r in rows if str(r.get("op", "")) == op]
        for x, other in (("tokens", "V"), ("V", "tokens")):
            sweep = _sweep(op_rows, x, other)
            if len({r[x] for r in sweep}) < 2:
                continue
            fig, axes = plt.subplots(1, len(metrics), figsize=(5.5 * len(metrics), 3.8), squeeze=False)
            for ax, (col, label) in zip(axes[0], metrics):
                lines: dict = {}
                for r in sweep:
                    if r.get(col) is not None and r.get(prov) != ref:
                        lines.setdefault(str(r.get(prov)), []).append((r[x], r[col]))
                for name, pts in sorted(lines.items()):
                    pts.sort()
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", ms=3, lw=1.2, label=name)
                ax.axhline(1.0, color="grey", ls="--", lw=1, label=f"{ref} (reference)")
                ax.set_xscale("log", base=2)
                ax.set_xlabel(f"{'completion tokens N·T' if x == 'tokens' else 'vocabulary size V'} "
                              f"({other} = {sweep[0][other]:,})")
                ax.set_ylabel(label)
                ax.set_ylim(bottom=0)
                ax.grid(alpha=0.3, which="both")
                ax.legend(fontsize=7)
            fig.suptitle(f"{title} — {op}, fwd+bwd, vs {x}", fontsize=10)
            fig.tight_layout()
            path = f"{path_stem}_{op or 'loss'}_vs_{x}.png"
            fig.savefig(path, dpi=110)
            plt.close(fig)
            written.append(path)
    return written
