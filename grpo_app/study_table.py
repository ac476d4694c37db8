"""The study's numbers: cells → one row per setting (mean ± sd over seeds), a markdown table, a plot.

    summary = summarize(grid, seeds, cells, start_files)    # study.json
    write_outputs(summary, "runs/study")                    # study.md, study.json, study.png

Per setting, over its seeds (sample sd, n − 1 in the denominator; 0 for one seed):
held-out accuracy, format rate, completion length (tokens), reasoning length (words inside
<think>), Δ accuracy against the start model of the same seed, and accuracy by modality and by
question type where the data has more than one. Settings keep the grid's order.
"""

from __future__ import annotations

import json
import math
import os

METRICS = {"accuracy": "accuracy", "format_rate": "format_rate", "completion_tokens": "mean_completion_tokens",
           "reasoning_words": "mean_reasoning_words"}
REPORTED = {"grpo_instruct": 58.0, "sft": 52.0, "semantic": 59.9, "drgrpo": 61.1, "ecr": 50.2, "cwr": 54.7}   # PMC-VQA


def mean_sd(values: list[float]) -> dict:
    n = len(values)
    if not n:
        return {"mean": math.nan, "sd": math.nan, "values": []}
    m = sum(values) / n
    sd = math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return {"mean": m, "sd": sd, "values": values}


def _load(path: str) -> dict | None:
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def _groups(cells: list[dict], key: str) -> dict:
    """group name → accuracy mean ± sd over cells (one value per cell), where the data has ≥ 2 groups."""
    names = sorted({g for c in cells for g in c["eval"].get(key, {})})
    if len(names) < 2:
        return {}
    return {g: mean_sd([c["eval"][key][g]["accuracy"] for c in cells if g in c["eval"].get(key, {})]) for g in names}


def summarize(grid: dict, seeds, cells: list[dict], start_files: dict) -> dict:
    starts = {s: _load(p) for s, p in start_files.items()}
    starts = {s: v for s, v in starts.items() if v}
    rows = []
    for name, (command, path) in grid.items():
        mine = sorted((c for c in cells if c["setting"] == name and c["seed"] in seeds), key=lambda c: c["seed"])
        if not mine:
            continue
        row = {"setting": name, "command": command, "config": os.path.relpath(path), "seeds": [c["seed"] for c in mine],
               "steps": mine[0]["steps"], "minutes_per_cell": mean_sd([c["seconds"] / 60 for c in mine])["mean"],
               "by_modality": _groups(mine, "by_modality"), "by_question_type": _groups(mine, "by_question_type")}
        for out_key, eval_key in METRICS.items():
            row[out_key] = mean_sd([float(c["eval"][eval_key]) for c in mine])
        deltas = [c["eval"]["accuracy"] - starts[c["seed"]]["accuracy"] for c in mine if c["seed"] in starts]
        row["delta_accuracy"] = mean_sd(deltas) if deltas else None
        rows.append(row)
    start = None
    if starts:
        start = {k: mean_sd([float(v[e]) for v in starts.values()])["mean"] for k, e in METRICS.items()}
    return {"seeds": list(seeds), "settings": rows, "start": start, "cells": len(cells)}


def _pct(d: dict | None) -> str:
    if not d or d["mean"] != d["mean"]:
        return "–"
    return f"{100 * d['mean']:.1f} ± {100 * d['sd']:.1f}"


def markdown(summary: dict) -> str:
    """The study's table (and the by-modality table when the data has modalities)."""
    rows, start = summary["settings"], summary.get("start")
    seeds = ", ".join(str(s) for s in summary["seeds"])
    out = [f"Held-out accuracy, mean ± sd over seeds {seeds}, {rows[0]['steps'] if rows else 0} steps per cell "
           f"(grid `{summary.get('grid', '?')}`).", "",
           "| setting | accuracy % | Δ vs start (points) | format % | completion tokens | reasoning words | PMC-VQA reported % |",
           "|---|---:|---:|---:|---:|---:|---:|"]
    if start:
        out.append(f"| start (format-warmed model) | {100 * start['accuracy']:.1f} | | {100 * start['format_rate']:.1f} | "
                   f"{start['completion_tokens']:.1f} | {start['reasoning_words']:.1f} | |")
    for r in rows:
        d = r["delta_accuracy"]
        delta = f"{100 * d['mean']:+.1f} ± {100 * d['sd']:.1f}" if d else "–"
        out.append(f"| {r['setting']} | {_pct(r['accuracy'])} | {delta} | {_pct(r['format_rate'])} | "
                   f"{r['completion_tokens']['mean']:.1f} | {r['reasoning_words']['mean']:.1f} | "
                   f"{REPORTED.get(r['setting'], '–')} |")
    for key, title in (("by_modality", "modality"), ("by_question_type", "question type")):
        groups = sorted({g for r in rows for g in r[key]})
        if groups:
            out += ["", f"Accuracy % by {title} (mean ± sd over seeds):", "",
                    "| setting | " + " | ".join(groups) + " |", "|---|" + "---:|" * len(groups)]
            out += [f"| {r['setting']} | " + " | ".join(_pct(r[key].get(g)) for g in groups) + " |" for r in rows]
    return "\n".join(out) + "\n"


def write_outputs(summary: dict, out: str) -> dict:
    from .plotting import plot_study

    paths = {k: os.path.join(out, f"study.{k}") for k in ("md", "json", "png")}
    with open(paths["md"], "w") as f:
        f.write(markdown(summary))
    with open(paths["json"], "w") as f:
        json.dump(summary, f, indent=2)
    paths["png"] = plot_study(summary, paths["png"], title=f"study grid `{summary.get('grid', '')}`, "
                                                           f"seeds {summary['seeds']}")
    return paths
