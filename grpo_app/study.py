"""`grpo study`: the experiment grid of arXiv 2505.13973 as one resumable command.

    grpo study                                            # the synthetic grid on CPU (defaults below)
    grpo study --steps 150 --out runs/study-smoke         # a quick look (nothing leaves chance)
    grpo study --seeds 0 1 2 3 4 --workers 2              # more seeds, 2 cells at once
    grpo study --grid pmc_vqa --steps 1000 --workers 8 --gpus 0,1,2,3,4,5,6,7 data.source=/data/PMC-VQA

Grid = settings × seeds. A setting is a config file and a command (``train`` = GRPO, ``sft``);
the built-in grids (``GRIDS``) are the study's seven settings on the synthetic task and on PMC-VQA;
``--grid FILE.yaml`` reads ``{settings: {name: {command: train|sft, config: path}}}``. A cell is one
setting at one seed, run in ``OUT/<setting>/seed<S>/`` with the same code as ``grpo train`` /
``grpo sft`` (metrics.jsonl, curves.png, samples.html, eval_final.json are all there).

Same start, same budget:
  - Start: when the configs ask for a format warm-up (synthetic: ``warmup.steps`` > 0) the study
    builds a tiny model and warms it once per seed into ``OUT/init/seed<S>/policy``; every cell of
    that seed starts from those weights (``model.path`` overridden, warm-up off). The base-style
    setting starts from the same weights prompted without the chat template (``model.template:
    plain``): the chat-wrapped format is what the warm-up taught, as instruction tuning does. With
    real models (no warm-up) each config's ``model.path`` is the start: instruct vs base by path.
  - Budget: ``--steps N`` optimizer steps in every cell (GRPO: N rollout batches of B prompts;
    SFT: N batches of ``sft.batch_size`` records; the synthetic SFT config uses B = 8 as GRPO does).
  - Semantic judge: on synthetic data a tiny judge trained once (grpo_app.judge) into
    ``OUT/judge`` (every semantic_judge reward of the grid points there); on real data the
    config's ``model_path``.
  - Same items: the start and every cell of a seed are scored on the same held-out items (the
    config's held-out records, cut to ``run.eval_limit``; ``--eval-size N`` makes it N), each
    item's score kept, so Δ vs start, the intervals and the orderings are paired
    (grpo_app.study_table). After training, each cell (and each start) is also evaluated with
    blank and swapped images (grpo_core.counterfactual): the visual-reliance columns.

Resume: a cell is done when its ``cell.json`` exists, the start model when its ``start.json``
does; GRPO cells checkpoint every ``--save-every`` steps and continue from there after a stop.
A finished cell is reused only when it was run with the same ``--steps``, overrides and
``--eval-size`` (stored in cell.json); otherwise the study stops and names the cell and the
difference (use another ``--out``, or delete that cell's folder). ``--only`` runs a subset; the
table still lists every finished cell of the grid that matches.
Output: ``OUT/study.md`` (table), ``study.json`` (every number), ``study.png`` (grid_table.plot).
"""

from __future__ import annotations

import json
import os
import time

import yaml

from .study_table import summarize, write_outputs

_CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "configs")
GRIDS = {   # grid → setting → (command, config file in examples/configs)
    "synthetic": {"grpo_instruct": ("train", "synthetic_grpo_instruct.yaml"),
                  "grpo_base": ("train", "synthetic_grpo_base.yaml"),
                  "semantic": ("train", "synthetic_semantic.yaml"),
                  "ecr": ("train", "synthetic_ecr.yaml"),
                  "cwr": ("train", "synthetic_cwr.yaml"),
                  "drgrpo": ("train", "synthetic_drgrpo.yaml"),
                  "sft": ("sft", "synthetic_sft.yaml")},
    "pmc_vqa": {"grpo_instruct": ("train", "pmc_vqa_grpo_instruct.yaml"),
                "grpo_base": ("train", "pmc_vqa_grpo_base.yaml"),
                "semantic": ("train", "pmc_vqa_grpo_semantic.yaml"),
                "ecr": ("train", "pmc_vqa_grpo_ecr.yaml"),
                "cwr": ("train", "pmc_vqa_grpo_cwr.yaml"),
                "drgrpo": ("train", "pmc_vqa_drgrpo.yaml"),
                "sft": ("sft", "pmc_vqa_sft.yaml")},
}
COMMANDS = ("train", "sft")
DEFAULT_STEPS = 2000     # the smallest budget measured to leave chance on the synthetic task
GRID_EVAL_SIZE = {"synthetic": 200}   # held-out items per seed by default (None: each config's)


def config_path(name: str) -> str:
    """A config file as given, or by its name in the repository's examples/configs."""
    if os.path.exists(name):
        return name
    path = os.path.join(_CONFIGS, name)
    if not os.path.exists(path):
        raise FileNotFoundError(f"study: config {name!r} not found (as a path, nor in {_CONFIGS})")
    return path


def load_grid(grid: str, only: list[str] | None = None) -> dict:
    """setting → (command, config path) of a built-in grid or a grid YAML file, in order."""
    if grid in GRIDS:
        settings = {k: (c, config_path(f)) for k, (c, f) in GRIDS[grid].items()}
    else:
        with open(grid) as f:
            data = yaml.safe_load(f) or {}
        entries = data.get("settings") if isinstance(data, dict) else None
        if not isinstance(entries, dict) or not entries:
            raise ValueError(f"study: {grid} must hold a mapping 'settings: {{name: {{command, config}}}}'")
        settings = {}
        for name, e in entries.items():
            if not isinstance(e, dict) or e.get("command", "train") not in COMMANDS or "config" not in e:
                raise ValueError(f"study: {grid}, setting {name!r}: needs config: <path> and "
                                 f"command: train|sft, got {e!r}")
            settings[name] = (e.get("command", "train"), config_path(e["config"]))
    if only:
        unknown = [s for s in only if s not in settings]
        if unknown:
            raise ValueError(f"study: --only names {unknown}, not settings of this grid: {list(settings)}")
        settings = {k: v for k, v in settings.items() if k in only}
    return settings


def judge_inside(cfg, study_out: str):
    """On synthetic data, every semantic_judge reward reads (and on first use trains) the judge
    at ``study_out/judge``: the study's files all live inside --out."""
    if cfg.data.source == "synthetic":
        for entry in cfg.grpo.rewards:
            if entry.get("name") == "semantic_judge":
                entry["model_path"] = os.path.join(study_out, "judge")
    return cfg


def cell_config(command: str, path: str, seed: int, out: str, steps: int, overrides: list[str], init: str | None,
                eval_size: int | None, save_every: int, study_out: str | None = None):
    """The TrainConfig of one cell: the setting's config + the study's overrides (seed, folder,
    budget, start model), then the user's overrides."""
    from grpo_core.config import load_config

    over = [f"run.seed={seed}", f"run.output_dir={out}", "run.progress=false"]
    if command == "train":     # no evals along the way (the start is evaluated once per seed); samples 5× a run
        over += [f"run.steps={steps}", f"run.save_every={save_every}", "run.eval_every=0",
                 f"run.log_completions_every={max(1, steps // 5)}"]
    else:
        over += [f"sft.steps={steps}"]
    if init:
        over += [f"model.path={init}", "model.tiny=false", "warmup.steps=0"]
    if eval_size:
        over += [f"data.eval_size={eval_size}", "run.eval_limit=null"]
    cfg = load_config(path, over + list(overrides))
    return judge_inside(cfg, study_out) if study_out else cfg


def study_key(steps: int | None, overrides, eval_size: int | None, command: str | None = None,
              ) -> dict:
    """What a finished cell (a start: no steps, no command) must have been run with to be reused."""
    key = {"overrides": list(overrides), "eval_size": eval_size}
    if steps is not None:
        key.update(steps=steps, command=command)
    return key


def check_reuse(path: str, want: dict, what: str) -> dict:
    """The JSON at ``path`` if it was made with ``want`` (study_key); else a ValueError naming
    the difference and what to do."""
    with open(path) as f:
        done = json.load(f)
    have = done.get("study_key")
    if have != want:
        have = have or {}
        diff = {k: have.get(k, "(not recorded)") for k in want if have.get(k) != want[k]}
        was = ", ".join(f"{k}={v!r}" for k, v in diff.items())
        asks = ", ".join(f"{k}={want[k]!r}" for k in diff)
        raise ValueError(f"study: {what} in {os.path.dirname(path)} was run with {was}; this call "
                         f"asks {asks}. Use another --out for the new setting, or delete "
                         f"{os.path.dirname(path)} to run it again")
    return done


def scores_of(items: list) -> dict:
    """item id → accuracy (the per-item scores the study pairs)."""
    return {it["id"]: it["accuracy"] for it in items}


def counterfactual_scores(policy, cfg, seed: int) -> dict:
    """condition → id → accuracy of ``policy`` with own / blank / swapped images, cell's items."""
    from grpo_core.counterfactual import evaluate_counterfactual

    from .evaluation import scored_records

    cf = evaluate_counterfactual(policy, scored_records(cfg), ("image", "blank", "swapped"),
                                 seed=seed, template=cfg.data.prompt, progress=False,
                                 max_new_tokens=cfg.rollout.max_new_tokens)
    return {k: scores_of(r.items) for k, r in cf.variants.items()}


def build_start(grid: dict, seed: int, out: str, overrides: list[str], eval_size: int | None) -> str | None:
    """The shared format-warmed start of one seed (module docstring), scored on the cells' items
    (``start.json``: numbers, per-item scores, counterfactual scores); None without warm-up."""
    from grpo_core.config import load_config

    warm = {n: load_config(p, [f"run.seed={seed}"] + list(overrides)) for n, (c, p) in grid.items() if c == "train"}
    warm = {n: c for n, c in warm.items() if c.warmup.steps > 0}
    if not warm:
        return None
    keys = {n: (c.data.prompt, c.data.source, c.data.lesion_sigma, c.data.lesion_amplitude, c.data.image_size,
                c.data.train_size, c.warmup.steps, c.warmup.lr, c.warmup.batch_size) for n, c in warm.items()}
    if len(set(keys.values())) > 1:
        raise ValueError(f"study: the settings warm up differently ({keys}); one start model per seed needs the same "
                         "data.prompt, data and warmup sections in every config")
    folder = os.path.join(out, "init", f"seed{seed}")
    policy_dir = os.path.join(folder, "policy")
    key = study_key(None, overrides, eval_size)
    if os.path.exists(os.path.join(folder, "start.json")):
        check_reuse(os.path.join(folder, "start.json"), key, f"the start model of seed {seed}")
        return policy_dir
    from grpo_core.data import build_records
    from grpo_core.eval import evaluate

    from .evaluation import scored_records
    from .factory import load_policy
    from .warmup import format_warmup

    cfg = next(iter(warm.values()))
    cfg.model.path, cfg.model.tiny, cfg.run.seed = os.path.join(folder, "tiny"), True, seed
    if eval_size:
        cfg.data.eval_size, cfg.run.eval_limit = eval_size, None
    train = build_records(cfg.data, seed)[0]
    policy = load_policy(cfg.model, seed=seed)
    info = format_warmup(policy, train, cfg)
    policy.save_pretrained(policy_dir)
    res = evaluate(policy, scored_records(cfg), template=cfg.data.prompt, progress=False,
                   max_new_tokens=cfg.rollout.max_new_tokens)   # every cell's items (this seed)
    res.to_json(os.path.join(folder, "eval_start.json"))
    start = {"study_key": key, "seed": seed,
             "eval": {k: v for k, v in res.to_dict().items() if k != "items"},
             "scores": scores_of(res.items), "cf_scores": counterfactual_scores(policy, cfg, seed)}
    with open(os.path.join(folder, "start.json"), "w") as f:
        json.dump(start, f, indent=2)
    print(f"  start model, seed {seed}: {info['steps']} warm-up steps, held-out accuracy {res.accuracy:.1%}, "
          f"format {res.format_rate:.1%} ({info['seconds']:.0f} s)", flush=True)
    return policy_dir


def prepare_grid_judges(grid: dict, seed: int, overrides: list[str], out: str) -> None:
    from grpo_core.config import load_config

    from .judge import prepare_judges

    for command, path in grid.values():
        if command == "train":
            cfg = load_config(path, [f"run.seed={seed}"] + overrides)
            prepare_judges(judge_inside(cfg, out), progress=False)


def _prepare(task: tuple):
    """One preparation task (a seed's start model, or the judge) → ((kind, seed), result)."""
    import torch

    torch.set_num_threads(1)
    if task[0] == "start":
        _, seed, grid, out, overrides, eval_size = task
        return ("start", seed), build_start(grid, seed, out, overrides, eval_size)
    _, seed, grid, overrides, out = task
    prepare_grid_judges(grid, seed, overrides, out)
    return ("judge", seed), None


def run_cell(job: dict) -> dict:
    """One cell, in this process: train or SFT through the CLI's functions, then record its result."""
    import torch

    from .commands import cmd_sft, cmd_train
    from .judge import prepare_judges

    torch.set_num_threads(job["threads"])
    t0 = time.perf_counter()
    cfg = cell_config(job["command"], job["config"], job["seed"], job["dir"], job["steps"], job["overrides"],
                      job["init"], job["eval_size"], job["save_every"], job["out"])
    prepare_judges(cfg, progress=False)
    import contextlib
    import io
    with contextlib.redirect_stdout(io.StringIO()):    # the cell's own JSON prints; the study prints one line
        (cmd_train if job["command"] == "train" else cmd_sft)(cfg)
    with open(os.path.join(job["dir"], "eval_final.json")) as f:
        final = json.load(f)
    seconds = time.perf_counter() - t0
    from .evaluation import load_at

    cf = counterfactual_scores(load_at(cfg, job["dir"]), cfg, job["seed"])   # the saved policy
    cell = {"setting": job["setting"], "seed": job["seed"], "command": job["command"],
            "steps": job["steps"],
            "study_key": study_key(job["steps"], job["overrides"], job["eval_size"],
                                   job["command"]),
            "seconds": seconds, "counterfactual_seconds": time.perf_counter() - t0 - seconds,
            "load_average": list(os.getloadavg()),
            "eval": {k: v for k, v in final.items() if k != "items"},
            "scores": scores_of(final["items"]), "cf_scores": cf}
    with open(os.path.join(job["dir"], "cell.json"), "w") as f:
        json.dump(cell, f, indent=2)
    return cell


def _init_worker(gpu_queue):
    if gpu_queue is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu_queue.get()


def run_study(grid_name="synthetic", seeds=(0, 1, 2), steps=DEFAULT_STEPS, out="runs/study", only=None, overrides=(),
              workers=1, threads=1, gpus=None, eval_size=None, save_every=50,
              table_only=False) -> dict:
    """Every cell of the grid (those already done are read back), then the table and plot.
    ``table_only``: run nothing (no start model, judge or cell); the table of the finished cells,
    e.g. while another ``grpo study`` is still running the rest."""
    import torch

    torch.set_num_threads(threads)
    whole, grid = load_grid(grid_name), load_grid(grid_name, only)
    os.makedirs(out, exist_ok=True)
    t0 = time.perf_counter()
    print(f"study: {len(grid)} settings × {len(seeds)} seeds, {steps} steps each, into {out}", flush=True)
    # before any cell: the start model of each seed and the judge (built once: parallel cells
    # must not race); the whole grid's start, so that a subset (--only) starts where it does
    prep = [("start", s, whole, out, list(overrides), eval_size) for s in seeds] + \
        [("judge", seeds[0], grid, list(overrides), out)]
    done = {} if table_only else dict(_pool_map(_prepare, prep, workers, gpus))
    inits = {s: done.get(("start", s)) for s in seeds}
    jobs, cells = [], []
    for s in seeds:
        for name, (command, path) in whole.items():
            d = os.path.join(out, name, f"seed{s}")
            key = study_key(steps, overrides, eval_size, command)
            if os.path.exists(os.path.join(d, "cell.json")):
                try:
                    cells.append(check_reuse(os.path.join(d, "cell.json"), key,
                                             f"cell {name} seed {s}"))
                except ValueError as e:
                    if name in grid:
                        raise
                    print(f"  left out of the table: {e}", flush=True)   # not asked for: not re-run
                continue
            if name in grid:
                jobs.append(dict(setting=name, seed=s, command=command, config=path, dir=d,
                                 steps=steps, init=inits[s], overrides=list(overrides),
                                 threads=threads, eval_size=eval_size, save_every=save_every,
                                 out=out))
    if table_only:
        print(f"  {len(cells)} cells done; {len(jobs)} not run (--table-only): "
              + ", ".join(f"{j['setting']} seed {j['seed']}" for j in jobs[:12])
              + (" …" if len(jobs) > 12 else ""), flush=True)
        jobs = []
    print(f"  {len(cells)} cells already done, {len(jobs)} to run", flush=True)
    for cell in _run_jobs(jobs, workers, gpus, len(cells), len(cells) + len(jobs)):
        cells.append(cell)
    summary = summarize(whole, seeds, cells, {s: _read_start(out, s) for s in seeds})
    summary.update(grid=grid_name, steps=steps, seconds_this_invocation=time.perf_counter() - t0,
                   load_average_end=list(os.getloadavg()), workers=workers, threads=threads)
    paths = write_outputs(summary, out)
    print(f"study: table {paths['md']}, plot {paths['png']}, numbers {paths['json']}", flush=True)
    return summary


def _read_start(out: str, seed: int) -> dict | None:
    path = os.path.join(out, "init", f"seed{seed}", "start.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def _pool_map(fn, items, workers, gpus):
    """Yield fn(item) for each item, in-process when workers = 1, else from a spawn pool (one
    process per task; with ``gpus`` each worker sees one GPU), in the order they finish."""
    if workers <= 1 or len(items) <= 1:
        yield from map(fn, items)
        return
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = None
    if gpus:
        queue = ctx.Manager().Queue()
        for g in gpus.split(","):
            queue.put(g.strip())
    with ctx.Pool(min(workers, len(items)), initializer=_init_worker, initargs=(queue,), maxtasksperchild=1) as pool:
        yield from pool.imap_unordered(fn, items)


def _run_jobs(jobs, workers, gpus, done, total):
    """Yield each finished cell's result, with one line printed per cell."""
    for k, c in enumerate(_pool_map(run_cell, jobs, workers, gpus), done + 1):
        e = c["eval"]
        print(f"  [{k}/{total}] {c['setting']} seed {c['seed']}: accuracy {e['accuracy']:.1%}, format "
              f"{e['format_rate']:.1%}, reasoning {e['mean_reasoning_words']:.1f} words "
              f"({c['seconds']:.0f} s)", flush=True)
        yield c


def add_study_arguments(p) -> None:
    p.add_argument("--grid", default="synthetic",
                   help=f"built-in grid {sorted(GRIDS)} or a YAML file {{settings: {{name: {{command, config}}}}}}")
    p.add_argument("--only", default=None, help="comma-separated settings to run (default: all of the grid)")
    p.add_argument("--seeds", nargs="+", default=["0", "1", "2"],
                   help="seeds (integers); a key=value after them is an override")
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="optimizer steps per cell (the budget)")
    p.add_argument("--eval-size", type=int, default=None,
                   help=f"held-out items per eval (default: {GRID_EVAL_SIZE} by grid, else each "
                        "config's)")
    p.add_argument("--out", default="runs/study")
    p.add_argument("--workers", type=int, default=None,
                   help="cells run at once (processes); default: one per GPU of --gpus, else one "
                        "per usable CPU core (at most 8)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per cell")
    p.add_argument("--gpus", default=None, help="comma-separated GPU ids, one per worker (CUDA_VISIBLE_DEVICES)")
    p.add_argument("--save-every", type=int, default=50, help="GRPO checkpoint interval, for resuming a cell")
    p.add_argument("--table-only", action="store_true",
                   help="run nothing: write the table of the cells finished so far (e.g. while "
                        "another grpo study still runs the rest into the same --out)")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides applied to every cell")


def split_seeds(tokens: list[str]) -> tuple[list[int], list[str]]:
    """--seeds' tokens → (seeds, overrides): ``--seeds 0 1 run.x=1`` = seeds 0, 1 + an override."""
    seeds, over = [], []
    for t in tokens:
        if "=" in t:
            over.append(t)
        elif t.lstrip("-").isdigit():
            seeds.append(int(t))
        else:
            raise ValueError(f"study: --seeds takes integers (then key=value overrides), got {t!r}")
    return seeds, over


def default_workers(gpus: str | None) -> int:
    """One cell per GPU of ``gpus``; on CPU one per usable core, at most 8 (one thread each)."""
    if gpus:
        return len([g for g in gpus.split(",") if g.strip()])
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, min(8, cores or 1))


def run_study_cli(args) -> int:
    seeds, more = split_seeds(args.seeds)
    if args.workers is None:
        args.workers = default_workers(args.gpus)
    if args.eval_size is None:
        args.eval_size = GRID_EVAL_SIZE.get(args.grid)
    if args.steps < 1 or args.workers < 1 or args.threads < 1 or not seeds:
        raise ValueError("study: --steps, --workers and --threads must be ≥ 1 and --seeds non-empty")
    run_study(args.grid, tuple(seeds), args.steps, args.out,
              args.only.split(",") if args.only else None, list(args.overrides) + more,
              args.workers, args.threads, args.gpus, args.eval_size, args.save_every,
              table_only=args.table_only)
    return 0
