"""The study's numbers: cells → one row per setting with 95 % intervals, the paper's orderings
tested on the same items, a markdown table, a plot.

    summary = summarize(grid, seeds, cells, starts)         # study.json
    write_outputs(summary, "runs/study")                    # study.md, study.json, study.png

A cell carries its per-item held-out scores (``scores``: item id → accuracy) and, when measured,
the same items under image counterfactuals (``cf_scores``: condition → id → accuracy); a start
carries its scores too (``starts``: seed → {"scores", "eval"}). Every number is taken on the items
that the compared cells share (within a seed, every cell and its start score the same items):

  accuracy        mean over seeds of the cell's accuracy; mean ± sd (n − 1) over seeds and a 95 %
                  bootstrap interval over seeds and items (grpo_core.stats.bootstrap_ci, nested)
  Δ vs start      per seed the paired per-item difference cell − start, then the same interval
  reliance        per seed the per-item drop own image − blank (or swapped) image, same interval
  orderings       the paper's claims "A > B": per seed the per-item A − B; the interval decides:
                  "A > B" when it lies above 0, "B > A" when below, else "not separated"; the exact
                  McNemar p pools the items of every seed (ignores the seed spread: read it second)
Format rate, completion length and reasoning length are mean ± sd over seeds; accuracy by
modality and by question type where the data has more than one. Settings keep the grid's order.
"""

from __future__ import annotations

import json
import math
import os


def _stats():
    """grpo_core.stats, imported on first use: `grpo study --help` must not load grpo_core (torch)."""
    from grpo_core import stats

    return stats


METRICS = {
    "accuracy": "accuracy",
    "format_rate": "format_rate",
    "completion_tokens": "mean_completion_tokens",
    "reasoning_words": "mean_reasoning_words",
}
REPORTED = {
    "grpo_instruct": 58.0,
    "sft": 52.0,
    "semantic": 59.9,
    "drgrpo": 61.1,
    "ecr": 50.2,
    "cwr": 54.7,
}  # PMC-VQA
ORDERINGS = [  # (higher, lower) as reported on PMC-VQA (arXiv 2505.13973)
    ("grpo_instruct", "sft"),
    ("semantic", "grpo_instruct"),
    ("drgrpo", "grpo_instruct"),
    ("grpo_instruct", "ecr"),
    ("cwr", "ecr"),
    ("grpo_instruct", "cwr"),
    ("grpo_instruct", "grpo_base"),
]
CONDITIONS = ("blank", "swapped")


def mean_sd(values: list[float]) -> dict:
    n = len(values)
    if not n:
        return {"mean": math.nan, "sd": math.nan, "values": []}
    m = sum(values) / n
    sd = math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return {"mean": m, "sd": sd, "values": values}


def interval(per_seed: list[list[float]]) -> dict | None:
    """{"mean" (of per-seed means), "ci" (nested bootstrap), "n_items"} of per-seed item values."""
    per_seed = [v for v in per_seed if v]
    if not per_seed:
        return None
    mean = sum(sum(v) / len(v) for v in per_seed) / len(per_seed)
    return {
        "mean": mean,
        "ci": list(_stats().bootstrap_ci(per_seed if len(per_seed) > 1 else per_seed[0])),
        "n_items": sum(len(v) for v in per_seed),
        "seeds": len(per_seed),
    }


def paired(a: dict, b: dict) -> list[float]:
    """a − b on the item ids both score (one seed)."""
    return [a[i] - b[i] for i in sorted(set(a) & set(b))]


def _groups(cells: list[dict], key: str) -> dict:
    """group name → accuracy mean ± sd over cells (one value per cell), where the data has ≥ 2 groups."""
    names = sorted({g for c in cells for g in c["eval"].get(key, {})})
    if len(names) < 2:
        return {}
    return {
        g: mean_sd([c["eval"][key][g]["accuracy"] for c in cells if g in c["eval"].get(key, {})])
        for g in names
    }


def _reliance(cells: list[dict]) -> dict:
    """condition → interval of the per-item drop (own image − condition), over seeds."""
    out = {}
    for k in CONDITIONS:
        drops = [
            paired(c["cf_scores"]["image"], c["cf_scores"][k])
            for c in cells
            if k in c.get("cf_scores", {})
        ]
        if drops:
            out[k] = interval(drops)
    return out


def _row(name: str, command: str, path: str, mine: list[dict], starts: dict) -> dict:
    row = {
        "setting": name,
        "command": command,
        "config": os.path.relpath(path),
        "seeds": [c["seed"] for c in mine],
        "steps": mine[0]["steps"],
        "minutes_per_cell": mean_sd([c["seconds"] / 60 for c in mine])["mean"],
        "by_modality": _groups(mine, "by_modality"),
        "by_question_type": _groups(mine, "by_question_type"),
    }
    for out_key, eval_key in METRICS.items():
        row[out_key] = mean_sd([float(c["eval"][eval_key]) for c in mine])
    row["accuracy_ci"] = interval([list(c["scores"].values()) for c in mine if c.get("scores")])
    with_start = [c for c in mine if c["seed"] in starts]
    row["delta_accuracy"] = (
        mean_sd([c["eval"]["accuracy"] - starts[c["seed"]]["eval"]["accuracy"] for c in with_start])
        if with_start
        else None
    )
    row["delta_ci"] = interval(
        [
            paired(c["scores"], starts[c["seed"]]["scores"])
            for c in with_start
            if c.get("scores") and starts[c["seed"]].get("scores")
        ]
    )
    row["reliance"] = _reliance(mine)
    return row


def ordering(hi: str, lo: str, cells: list[dict]) -> dict | None:
    """The claim "hi > lo" tested on the items both settings score, seed by seed (docstring)."""
    by = {(c["setting"], c["seed"]): c for c in cells if c.get("scores")}
    seeds = sorted({s for (n, s) in by if n == hi} & {s for (n, s) in by if n == lo})
    if not seeds:
        return None
    diffs = [paired(by[(hi, s)]["scores"], by[(lo, s)]["scores"]) for s in seeds]
    res = interval(diffs)
    pairs = [
        (by[(hi, s)]["scores"][i], by[(lo, s)]["scores"][i])
        for s in seeds
        for i in sorted(set(by[(hi, s)]["scores"]) & set(by[(lo, s)]["scores"]))
    ]
    b = sum(1 for x, y in pairs if x == 1 and y == 0)
    c = sum(1 for x, y in pairs if x == 0 and y == 1)
    lo_ci, hi_ci = res["ci"]
    verdict = f"{hi} > {lo}" if lo_ci > 0 else f"{lo} > {hi}" if hi_ci < 0 else "not separated"
    return {
        "claim": f"{hi} > {lo}",
        "difference": res["mean"],
        "ci": res["ci"],
        "seeds": seeds,
        "n_items": res["n_items"],
        "mcnemar_p": _stats().mcnemar_exact(b, c),
        "verdict": verdict,
        "reproduced": lo_ci > 0,
    }


def summarize(grid: dict, seeds, cells: list[dict], starts: dict) -> dict:
    """``starts``: seed → {"eval": the start's numbers, "scores": id → accuracy, "cf_scores"}."""
    starts = {s: v for s, v in starts.items() if v and s in seeds}
    rows = []
    for name, (command, path) in grid.items():
        mine = sorted(
            (c for c in cells if c["setting"] == name and c["seed"] in seeds),
            key=lambda c: c["seed"],
        )
        if mine:
            rows.append(_row(name, command, path, mine, starts))
    start = None
    if starts:
        start = {
            k: mean_sd([float(v["eval"][e]) for v in starts.values()])["mean"]
            for k, e in METRICS.items()
        }
        start["accuracy_ci"] = interval(
            [list(v["scores"].values()) for v in starts.values() if v.get("scores")]
        )
        start["reliance"] = _reliance(list(starts.values()))
    done = {r["setting"] for r in rows}
    orders = [
        o
        for hi, lo in ORDERINGS
        if hi in done and lo in done
        if (o := ordering(hi, lo, [c for c in cells if c["seed"] in seeds]))
    ]
    return {
        "seeds": list(seeds),
        "settings": rows,
        "start": start,
        "cells": len(cells),
        "orderings": orders,
    }


def _ci(d: dict | None, signed: bool = False) -> str:
    """'49.0 [35.1, 62.3]' in percent (points with a sign when ``signed``), '–' when missing."""
    if not d:
        return "–"
    f = "{:+.1f}" if signed else "{:.1f}"
    return (
        f"{f.format(100 * d['mean'])} [{f.format(100 * d['ci'][0])}, {f.format(100 * d['ci'][1])}]"
    )


def _pct(d: dict | None) -> str:
    if not d or d["mean"] != d["mean"]:
        return "–"
    return f"{100 * d['mean']:.1f} ± {100 * d['sd']:.1f}"


def _unfinished(rows: list[dict], seeds) -> list[str]:
    """A line naming the seeds a setting's row lacks (cells not finished yet), or nothing."""
    lacking = [f"{r['setting']} ({', '.join(str(s) for s in seeds if s not in r['seeds'])})"
               for r in rows if set(seeds) - set(r["seeds"])]
    if not lacking:
        return []
    return ["", "**Not finished yet**, missing seeds: " + "; ".join(lacking) + "."]


def markdown(summary: dict) -> str:
    """The study's table, the orderings, and the by-modality table when the data has modalities."""
    rows, start = summary["settings"], summary.get("start")
    seeds = ", ".join(str(s) for s in summary["seeds"])
    out = [
        f"Held-out accuracy over seeds {seeds}, {rows[0]['steps'] if rows else 0} steps per "
        f"cell (grid `{summary.get('grid', '?')}`): mean [95 % bootstrap interval over seeds and "
        "items]; every cell and its start scored on the same items. Reliance: accuracy drop "
        "when each item's image is blanked / swapped with another item's (points).",
        *_unfinished(rows, summary["seeds"]),
        "",
        "| setting | accuracy % | ± sd (n seeds) | Δ vs start (points) | reliance: blank "
        "| reliance: swapped | format % | completion tokens | reasoning words "
        "| PMC-VQA reported % |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    if start:
        acc = (
            _ci(start["accuracy_ci"])
            if start.get("accuracy_ci")
            else f"{100 * start['accuracy']:.1f}"
        )
        rel = start.get("reliance", {})
        out.append(
            f"| start (format-warmed model) | {acc} | | | {_ci(rel.get('blank'), True)} | "
            f"{_ci(rel.get('swapped'), True)} | {100 * start['format_rate']:.1f} | "
            f"{start['completion_tokens']:.1f} | {start['reasoning_words']:.1f} | |"
        )
    for r in rows:
        acc = (
            _ci(r["accuracy_ci"]) if r.get("accuracy_ci") else f"{100 * r['accuracy']['mean']:.1f}"
        )
        d = r.get("delta_ci") or (r["delta_accuracy"] and {**r["delta_accuracy"], "ci": None})
        delta = _ci(d, True) if d and d.get("ci") else (f"{100 * d['mean']:+.1f}" if d else "–")
        rel = r.get("reliance", {})
        out.append(
            f"| {r['setting']} | {acc} | {100 * r['accuracy']['sd']:.1f} ({len(r['seeds'])}) | "
            f"{delta} | "
            f"{_ci(rel.get('blank'), True)} | {_ci(rel.get('swapped'), True)} | "
            f"{_pct(r['format_rate'])} | "
            f"{r['completion_tokens']['mean']:.1f} | {r['reasoning_words']['mean']:.1f} | "
            f"{REPORTED.get(r['setting'], '–')} |"
        )
    if summary.get("orderings"):
        out += [
            "",
            "The study's orderings, each tested on the same items (per seed, paired; interval over "
            "seeds and items):",
            "",
            "| claim (PMC-VQA) | difference (points) [95 % CI] | verdict here "
            "| McNemar p (items pooled) |",
            "|---|---:|---|---:|",
        ]
        out += [
            f"| {o['claim']} | {_ci({'mean': o['difference'], 'ci': o['ci']}, True)} | "
            f"{'**' + o['verdict'] + '**' if o['verdict'] != 'not separated' else o['verdict']} | "
            f"{o['mcnemar_p']:.2g} |"
            for o in summary["orderings"]
        ]
    for key, title in (("by_modality", "modality"), ("by_question_type", "question type")):
        groups = sorted({g for r in rows for g in r[key]})
        if groups:
            out += [
                "",
                f"Accuracy % by {title} (mean ± sd over seeds):",
                "",
                "| setting | " + " | ".join(groups) + " |",
                "|---|" + "---:|" * len(groups),
            ]
            out += [
                f"| {r['setting']} | " + " | ".join(_pct(r[key].get(g)) for g in groups) + " |"
                for r in rows
            ]
    return "\n".join(out) + "\n"


def write_outputs(summary: dict, out: str) -> dict:
    from .plotting import plot_study

    paths = {k: os.path.join(out, f"study.{k}") for k in ("md", "json", "png")}
    with open(paths["md"], "w") as f:
        f.write(markdown(summary))
    with open(paths["json"], "w") as f:
        json.dump(summary, f, indent=2)
    paths["png"] = plot_study(
        summary,
        paths["png"],
        title=f"study grid `{summary.get('grid', '')}`, seeds {summary['seeds']}",
    )
    return paths
