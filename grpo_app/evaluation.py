"""`grpo eval`: a policy on held-out items, with intervals, pass@k, image counterfactuals, a paired
comparison of two runs, and a run's checkpoints over time, always on the same items.

    grpo eval --config C [--samples 8]           accuracy (95 % CI) by group; pass@k from 8 samples
    grpo eval --config C --counterfactual        own / blank / swapped images (+ --no-image)
    grpo eval --config C --compare RUN_A RUN_B   both on the same items: difference, CI, p-value
    grpo eval --over-time RUN_DIR                a run's start and checkpoints: table + plot

A RUN (``--compare``, ``--over-time``) is a run folder (its newest checkpoint: ``ckpt-N/policy``;
an SFT run: ``policy/``), a checkpoint folder, a policy folder (config.json), or an EvalResult
JSON that ``grpo eval --out`` wrote (its items are read back, nothing is generated). Without
``--config`` the run's own resolved config (``ckpt-N/run_config.json``) is used when there is one.
The items are the config's held-out records (``run.eval_limit`` applies), so every policy compared
is scored on the same items; ``--compare`` refuses two result files whose items differ.
"""

from __future__ import annotations

import copy
import json
import os

from grpo_core.config import TrainConfig, load_config
from grpo_core.data import build_records


def eval_records(cfg: TrainConfig, whole: bool) -> list:
    """The records ``grpo eval`` scores: the held-out ones, or (``whole``) all of data.source's
    split."""
    d = cfg.data
    if (
        not whole or d.source == "synthetic"
    ):  # synthetic: the held-out items are generated, never trained on
        return build_records(d, cfg.run.seed, progress=cfg.run.progress)[1]
    from grpo_core.data import load_dataset

    return list(
        load_dataset(
            d.source,
            split=d.split,
            limit=d.limit,
            format=d.format,
            skip_bad=d.skip_bad,
            check_images=d.check_images,
            max_image_pixels=d.max_image_pixels,
            allow_outside_root=d.allow_outside_root,
            columns=d.columns,
            progress=cfg.run.progress,
        )
    )  # as build_records reads it


def scored_records(cfg: TrainConfig, whole: bool = False) -> list:
    """eval_records, cut to ``run.eval_limit`` for the held-out slice (the training evals')."""
    records = eval_records(cfg, whole)
    return records if whole or not cfg.run.eval_limit else records[: cfg.run.eval_limit]


def policy_dir(path: str) -> str:
    """The policy folder (config.json) a RUN names (module docstring)."""
    from grpo_core.checkpoint import list_checkpoints

    for cand in (path, os.path.join(path, "policy")):
        if os.path.exists(os.path.join(cand, "config.json")):
            return cand
    ckpts = [
        c
        for c in list_checkpoints(path)
        if os.path.exists(os.path.join(c, "policy", "config.json"))
    ]
    if ckpts:
        return os.path.join(ckpts[-1], "policy")
    raise FileNotFoundError(
        f"grpo eval: {path!r} is no policy folder (config.json), checkpoint (policy/) or run "
        "folder with ckpt-N/policy; give one of those, or an EvalResult JSON"
    )


def run_config(paths: list[str], config: str | None, overrides) -> TrainConfig:
    """--config, else the resolved config saved in the newest checkpoint of the first run folder
    (or checkpoint) among ``paths`` that has one; two result JSONs need none (the defaults)."""
    from grpo_core.checkpoint import RUN_CONFIG, list_checkpoints

    if config or all(p.endswith(".json") and os.path.isfile(p) for p in paths):
        return load_config(config, overrides)
    for path in paths:
        saved = [os.path.join(c, RUN_CONFIG) for c in list_checkpoints(path) + [path]]
        saved = [p for p in saved if os.path.exists(p)]
        if saved:
            return load_config(saved[-1], overrides)
    raise ValueError(f"grpo eval: none of {paths} holds a run config (ckpt-N/{RUN_CONFIG}); "
                     "pass the run's --config, so the items and the prompt are the ones it was "
                     "trained with")


def load_at(cfg: TrainConfig, path: str):
    """The policy saved at ``path``, loaded with the config's model settings (template...)."""
    from .factory import load_policy

    m = copy.deepcopy(cfg.model)
    m.path, m.tiny = policy_dir(path), False
    return load_policy(m, seed=cfg.run.seed)


def _evaluate(cfg: TrainConfig, policy, records, samples: int = 0):
    from grpo_core.eval import evaluate

    return evaluate(
        policy,
        records,
        template=cfg.data.prompt,
        max_new_tokens=cfg.rollout.max_new_tokens,
        progress=cfg.run.progress,
        samples=samples,
        temperature=cfg.rollout.temperature,
        sample_seed=cfg.run.seed,
    )


def cmd_eval(
    cfg: TrainConfig,
    out: str | None,
    whole: bool = False,
    show: int = 16,
    samples: int = 0,
    counterfactual: bool = False,
    no_image: bool = False,
) -> int:
    from grpo_core.samples import eval_rows, write_samples

    from .factory import load_policy

    records = scored_records(cfg, whole)  # data errors before any model loads
    policy = load_policy(cfg.model, seed=cfg.run.seed)
    if counterfactual:
        from grpo_core.counterfactual import DEFAULT_VARIANTS, evaluate_counterfactual

        cf = evaluate_counterfactual(
            policy,
            records,
            DEFAULT_VARIANTS + (("none",) if no_image else ()),
            seed=cfg.run.seed,
            template=cfg.data.prompt,
            progress=cfg.run.progress,
            max_new_tokens=cfg.rollout.max_new_tokens,
        )
        print(cf.table())
        if out:
            cf.to_json(out)
        res = cf.variants["image"]
    else:
        res = _evaluate(cfg, policy, records, samples)
        print(res.table())
        if out:
            res.to_json(out)
    if show:
        folder = os.path.dirname(os.path.abspath(out)) if out else cfg.run.output_dir
        page = write_samples(folder, 0, eval_rows(records, res.items, show), split="eval")
        print(f"samples: {page}")
    return 0


def _scores(cfg: TrainConfig, run: str, records) -> dict:
    """item id → accuracy of RUN on ``records`` (read from an EvalResult JSON, or generated)."""
    if run.endswith(".json") and os.path.isfile(run):
        with open(run) as f:
            data = json.load(f)
        items = data.get("items") or data.get("variants", {}).get("image", {}).get("items")
        if not items:
            raise ValueError(
                f"grpo eval --compare: {run} holds no per-item results ('items'); write one with "
                "grpo eval --out"
            )
        return {it["id"]: float(it["accuracy"]) for it in items}
    res = _evaluate(cfg, load_at(cfg, run), records)
    return {it["id"]: float(it["accuracy"]) for it in res.items}


def compare(cfg: TrainConfig, run_a: str, run_b: str) -> dict:
    """Both runs on the same items → grpo_core.stats.paired_test (A − B), with the runs named."""
    from grpo_core.stats import paired_test

    files = all(r.endswith(".json") and os.path.isfile(r) for r in (run_a, run_b))
    records = [] if files else scored_records(cfg)  # two result files: nothing to generate
    a, b = _scores(cfg, run_a, records), _scores(cfg, run_b, records)
    if set(a) != set(b):
        only_a, only_b = sorted(set(a) - set(b)), sorted(set(b) - set(a))
        raise ValueError(
            f"grpo eval --compare: the runs were scored on different items ({len(only_a)} only in "
            f"{run_a}, e.g. {only_a[:3]}; {len(only_b)} only in {run_b}, e.g. {only_b[:3]}); "
            "evaluate both with the same config"
        )
    ids = sorted(a)
    return {
        "a": run_a,
        "b": run_b,
        **paired_test([a[i] for i in ids], [b[i] for i in ids], seed=cfg.run.seed),
    }


def cmd_compare(cfg: TrainConfig, run_a: str, run_b: str, out: str | None) -> int:
    from grpo_core.stats import describe

    t = compare(cfg, run_a, run_b)
    print(f"A = {run_a}\nB = {run_b}")
    for k in ("a", "b"):
        print(f"  {k.upper()}: accuracy {t[k]:.2%} on {t['n']} items")
    print(describe(t))
    if t["test"] == "mcnemar_exact":
        print(f"  items only A gets right: {t['a_only']}, only B: {t['b_only']}")
    if out:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "w") as f:
            json.dump(t, f, indent=2)
    return 0


def _run_start(cfg: TrainConfig, ckpt: str):
    """The model a run started from: its checkpoint's recorded model.path (a study cell starts
    from its seed's warmed model, not the config's), else the config's."""
    import dataclasses

    try:
        with open(os.path.join(ckpt, "run_config.json")) as f:
            path = json.load(f)["model"]["path"]
    except (OSError, KeyError, TypeError, ValueError):
        return cfg.model
    if not os.path.exists(os.path.join(path, "config.json")):
        return cfg.model
    return dataclasses.replace(cfg.model, path=path, tiny=False)


def over_time(cfg: TrainConfig, run_dir: str) -> list[dict]:
    """The start (model.path) and every checkpoint of ``run_dir``, each on the same items →
    [{"step", "path", "n", "accuracy", "ci", "format_rate"}], by step."""
    from grpo_core.checkpoint import checkpoint_step, list_checkpoints

    from .factory import load_policy

    records = scored_records(cfg)
    points = []
    ckpts = [
        c
        for c in list_checkpoints(run_dir)
        if os.path.exists(os.path.join(c, "policy", "config.json"))
    ]
    if not ckpts:
        raise FileNotFoundError(
            f"grpo eval --over-time: {run_dir!r} holds no checkpoint with a policy/ "
            "(ckpt-N/policy); set run.save_every > 0 and run.keep_last: 0 to keep them all"
        )
    model = _run_start(cfg, ckpts[0])
    starts = (
        [(0, model.path, lambda: load_policy(model, seed=cfg.run.seed))]
        if os.path.exists(os.path.join(model.path, "config.json"))
        else []
    )
    for step, path, make in starts + [
        (checkpoint_step(c), c, lambda c=c: load_at(cfg, c)) for c in ckpts
    ]:
        res = _evaluate(cfg, make(), records)
        points.append(
            {
                "step": step,
                "path": path,
                "n": res.n,
                "accuracy": res.accuracy,
                "ci": res.accuracy_ci,
                "format_rate": res.format_rate,
            }
        )
        lo, hi = (100 * x for x in res.accuracy_ci)
        print(f"  step {step:>6}: accuracy {res.accuracy:.2%} [{lo:.1f}, {hi:.1f}]  ({path})",
              flush=True)
    return points


def over_time_table(points: list[dict]) -> str:
    from grpo_core.eval import ci_text

    lines = [
        "| step | items | accuracy % | 95 % CI | format % | policy |",
        "|---:|---:|---:|---|---:|---|",
    ]
    lines += [
        f"| {p['step']} | {p['n']} | {100 * p['accuracy']:.1f} | {ci_text(p['ci'])} | "
        f"{100 * p['format_rate']:.1f} | `{p['path']}` |"
        for p in points
    ]
    return "\n".join(lines) + "\n"


def cmd_over_time(cfg: TrainConfig, run_dir: str, out: str | None) -> int:
    from .plotting import plot_over_time

    points = over_time(cfg, run_dir)
    table = over_time_table(points)
    print(table)
    base = (
        out[:-5]
        if out and out.endswith(".json")
        else (out or os.path.join(run_dir, "eval_over_time"))
    )
    os.makedirs(os.path.dirname(os.path.abspath(base)), exist_ok=True)
    with open(base + ".json", "w") as f:
        json.dump(points, f, indent=2)
    with open(base + ".md", "w") as f:
        f.write(table)
    png = plot_over_time(points, base + ".png", title=f"held-out accuracy over training: {run_dir}")
    print(f"over time: {base}.json, {base}.md" + (f", {png}" if png else ""))
    return 0
