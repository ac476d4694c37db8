"""What each `grpo` subcommand does, as functions of a TrainConfig (the parser lives in grpo_app.cli).

    cmd_train(cfg)            GRPO (warm-up, start eval, train, final eval, curves, samples)
    cmd_sft(cfg)              the SFT baseline
    cmd_eval(cfg, out, whole) held-out records, or a whole split

What a run leaves in ``run.output_dir``: metrics.jsonl (every step), curves.png (the whole run,
resumed parts included), samples.jsonl + samples.html (prompts, completions, rewards, images),
eval_start.json / eval_final.json (held-out EvalResult before and after), checkpoints ckpt-*/.
"""

from __future__ import annotations

import json
import os

import torch

from grpo_core.config import TrainConfig
from grpo_core.data import build_records, make_prompt_fn


def make_eval_fn(cfg: TrainConfig, records, progress=False, samples_dir: str | None = None, step_of=None):
    """policy → {"accuracy", "format_rate"} on the first ``run.eval_limit`` records; with ``samples_dir``
    the first ``2 · run.log_completions`` completions go to its samples.jsonl/.html (split "eval")."""
    from grpo_core.eval import evaluate
    from grpo_core.samples import eval_rows, write_samples

    recs = records[: cfg.run.eval_limit or len(records)]

    def fn(policy):
        res = evaluate(policy, recs, template=cfg.data.prompt, max_new_tokens=cfg.rollout.max_new_tokens,
                       progress=progress)
        if samples_dir and cfg.run.log_completions:
            write_samples(samples_dir, step_of() if step_of else 0, eval_rows(recs, res.items, 2 * cfg.run.log_completions),
                          split="eval")
        fn.last = res
        return {"accuracy": res.accuracy, "format_rate": res.format_rate}
    return fn


def cmd_train(cfg: TrainConfig) -> int:
    """Single process, or one rank of a torchrun job (dist.mode=ddp|fsdp2): see grpo_core.distributed."""
    from grpo_core import distributed as D
    from grpo_core.checkpoint import latest_checkpoint
    from grpo_core.trainer import GRPOTrainer

    from .factory import load_policy
    from .judge import prepare_judges
    from .plotting import plot_history, read_metrics
    from .warmup import format_warmup

    out = cfg.run.output_dir
    with D.session(cfg.dist) as dist:
        main = dist.is_main
        torch.manual_seed(cfg.run.seed)
        train, held = build_records(cfg.data, cfg.run.seed)       # data errors before any model loads
        prepare_judges(cfg, progress=cfg.run.progress and main, build=main)   # a missing synthetic judge: rank 0 trains it
        dist.barrier()
        if cfg.model.tiny and not dist.is_main:
            dist.barrier()                    # rank 0 builds the tiny model first (same path for all)
        policy = load_policy(cfg.model, seed=cfg.run.seed)
        if cfg.model.tiny and dist.is_main:
            dist.barrier()
        if main:                              # the memory plan of this run (grpo_app.plan)
            from .plan import log_plan
            log_plan(cfg, dist.world)
        resuming = bool(cfg.run.resume and latest_checkpoint(out))
        if cfg.warmup.steps and not resuming:  # every rank the same deterministic warm-up
            w = format_warmup(policy, train, cfg, progress=cfg.run.progress and main)
            if main:
                print(f"format warm-up: {w['steps']} SFT steps on random answers, loss {w['loss_first']:.2f} -> "
                      f"{w['loss_last']:.2f} ({w['seconds']:.0f} s)")
        trainer = None
        eval_fn = make_eval_fn(cfg, held, samples_dir=out if main else None, step_of=lambda: trainer.step_idx)
        trainer = GRPOTrainer(policy, train, cfg, eval_records=held, eval_fn=eval_fn, dist=dist)
        start = None
        if cfg.run.eval_every and not resuming:   # the first point of the held-out curve
            with trainer.replica.gathered():
                start = eval_fn(policy)
            if main:
                eval_fn.last.to_json(os.path.join(out, "eval_start.json"))
                print(json.dumps({"start_eval": start}))
        history = trainer.train()
        trainer.save()                        # every rank: fsdp2 gathers, rank 0 writes
        # eval is replicated on every rank (under fsdp2 it needs all of them to gather the weights)
        final_fn = make_eval_fn(cfg, held, progress=cfg.run.progress and main, samples_dir=out if main else None,
                                step_of=lambda: trainer.step_idx)
        with trainer.replica.gathered():
            final = final_fn(policy)
        if main:
            final_fn.last.to_json(os.path.join(out, "eval_final.json"))
            print(json.dumps({"start_eval": start, "final_eval": final} if start else {"final_eval": final}, indent=2))
            log = os.path.join(out, "metrics.jsonl")
            whole = read_metrics(log) if os.path.exists(log) else history    # resumed runs: every step
            if whole:
                png = plot_history(whole, os.path.join(out, "curves.png"), title=f"GRPO: {out}",
                                   extra={"held-out before GRPO": [(0, start["accuracy"])] if start else []})
                print(f"curves: {png}   samples: {os.path.join(out, 'samples.html')}")
    return 0


def cmd_sft(cfg: TrainConfig) -> int:
    from grpo_core.sft import SFTTrainer

    from .factory import load_policy
    from .warmup import with_reasoning

    torch.manual_seed(cfg.run.seed)
    train, held = build_records(cfg.data, cfg.run.seed)           # data errors before any model loads
    if cfg.sft.target == "reasoning" and cfg.data.source == "synthetic":
        train = with_reasoning(train)         # synthetic records carry no reasoning: name the gold answer
    policy = load_policy(cfg.model, seed=cfg.run.seed)
    prompt_fn = make_prompt_fn(cfg.data.prompt, cfg.data.shuffle_options, cfg.run.seed)
    SFTTrainer(policy, train, cfg.sft, prompt_fn, cfg.data.prompt, cfg.run.seed).train(progress=cfg.run.progress)
    out = cfg.run.output_dir
    os.makedirs(out, exist_ok=True)
    policy.save_pretrained(os.path.join(out, "policy"))
    fn = make_eval_fn(cfg, held, progress=cfg.run.progress, samples_dir=out, step_of=lambda: cfg.sft.steps)
    final = fn(policy)
    fn.last.to_json(os.path.join(out, "eval_final.json"))
    print(json.dumps({"final_eval": final}, indent=2))
    return 0


def eval_records(cfg: TrainConfig, whole: bool) -> list:
    """The records ``grpo eval`` scores: the held-out ones, or (``whole``) all of data.source's split."""
    d = cfg.data
    if not whole or d.source == "synthetic":   # synthetic: the held-out items are generated, never trained on
        return build_records(d, cfg.run.seed)[1]
    from grpo_core.data import load_dataset

    return list(load_dataset(d.source, split=d.split, limit=d.limit, format=d.format, skip_bad=d.skip_bad,
                             check_images=d.check_images, max_image_pixels=d.max_image_pixels,
                             allow_outside_root=d.allow_outside_root, columns=d.columns))   # as build_records reads it


def cmd_eval(cfg: TrainConfig, out: str | None, whole: bool = False, samples: int = 16) -> int:
    from grpo_core.eval import evaluate
    from grpo_core.samples import eval_rows, write_samples

    from .factory import load_policy

    records = eval_records(cfg, whole)                            # data errors before any model loads
    if not whole and cfg.run.eval_limit:
        records = records[: cfg.run.eval_limit]
    policy = load_policy(cfg.model, seed=cfg.run.seed)
    res = evaluate(policy, records, template=cfg.data.prompt, max_new_tokens=cfg.rollout.max_new_tokens,
                   progress=cfg.run.progress)
    print(res.table())
    if out:
        res.to_json(out)
    if samples:
        folder = os.path.dirname(os.path.abspath(out)) if out else cfg.run.output_dir
        page = write_samples(folder, 0, eval_rows(records, res.items, samples), split="eval")
        print(f"samples: {page}")
    return 0
