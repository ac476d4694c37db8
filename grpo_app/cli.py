"""`grpo train|sft|eval|demo`: the command line over configs, data, policy, trainers and eval.

    grpo train --config examples/configs/pmc_vqa_grpo_instruct.yaml run.steps=500
    torchrun --nproc_per_node 8 -m grpo_app train --config examples/configs/pmc_vqa_grpo_ddp.yaml
    grpo sft   --config examples/configs/synthetic_sft.yaml
    grpo eval  --config examples/configs/synthetic_grpo_instruct.yaml model.path=runs/grpo/ckpt-000100/policy
    grpo demo  [--seed 0] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

from grpo_core.config import TrainConfig, load_config
from grpo_core.data import build_records, make_prompt_fn


def make_eval_fn(cfg: TrainConfig, records, progress=False):
    from grpo_core.eval import evaluate

    def fn(policy):
        res = evaluate(policy, records[: cfg.run.eval_limit or len(records)], template=cfg.data.prompt,
                       max_new_tokens=cfg.rollout.max_new_tokens, progress=progress)
        return {"accuracy": res.accuracy, "format_rate": res.format_rate}
    return fn


def cmd_train(cfg: TrainConfig) -> int:
    """Single process, or one rank of a torchrun job (dist.mode=ddp|fsdp2): see grpo_core.distributed."""
    from grpo_core import distributed as D
    from grpo_core.trainer import GRPOTrainer

    from .factory import load_policy
    from .plotting import plot_history

    with D.session(cfg.dist) as dist:
        torch.manual_seed(cfg.run.seed)
        train, held = build_records(cfg.data, cfg.run.seed)       # data errors before any model loads
        if cfg.model.tiny and not dist.is_main:
            dist.barrier()                    # rank 0 builds the tiny model first (same path for all)
        policy = load_policy(cfg.model, seed=cfg.run.seed)
        if cfg.model.tiny and dist.is_main:
            dist.barrier()
        eval_fn = make_eval_fn(cfg, held)
        trainer = GRPOTrainer(policy, train, cfg, eval_records=held, eval_fn=eval_fn, dist=dist)
        history = trainer.train()
        trainer.save()                        # every rank: fsdp2 gathers, rank 0 writes
        # eval is replicated on every rank (under fsdp2 it needs all of them to gather the weights)
        with trainer.replica.gathered():
            final = make_eval_fn(cfg, held, progress=cfg.run.progress and dist.is_main)(policy)
        if dist.is_main:
            print(json.dumps({"final_eval": final}, indent=2))
            if history:
                plot_history(history, os.path.join(cfg.run.output_dir, "curves.png"))
    return 0


def cmd_sft(cfg: TrainConfig) -> int:
    from grpo_core.sft import SFTTrainer

    from .factory import load_policy

    torch.manual_seed(cfg.run.seed)
    train, held = build_records(cfg.data, cfg.run.seed)           # data errors before any model loads
    policy = load_policy(cfg.model, seed=cfg.run.seed)
    prompt_fn = make_prompt_fn(cfg.data.prompt, cfg.data.shuffle_options, cfg.run.seed)
    SFTTrainer(policy, train, cfg.sft, prompt_fn, cfg.data.prompt, cfg.run.seed).train(progress=cfg.run.progress)
    os.makedirs(cfg.run.output_dir, exist_ok=True)
    policy.save_pretrained(os.path.join(cfg.run.output_dir, "policy"))
    print(json.dumps({"final_eval": make_eval_fn(cfg, held, progress=cfg.run.progress)(policy)}, indent=2))
    return 0


def cmd_eval(cfg: TrainConfig, out: str | None) -> int:
    from grpo_core.eval import evaluate

    from .factory import load_policy

    _, held = build_records(cfg.data, cfg.run.seed)               # data errors before any model loads
    policy = load_policy(cfg.model, seed=cfg.run.seed)
    res = evaluate(policy, held[: cfg.run.eval_limit or len(held)], template=cfg.data.prompt,
                   max_new_tokens=cfg.rollout.max_new_tokens, progress=cfg.run.progress)
    print(res.table())
    if out:
        res.to_json(out)
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="grpo", description="GRPO for medical VQA on vision-language models")
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("train", "sft", "eval"):
        p = sub.add_parser(name)
        p.add_argument("--config", help="YAML config (see examples/configs/)")
        p.add_argument("overrides", nargs="*", help="section.key=value overrides")
        if name == "eval":
            p.add_argument("--out", help="write the eval result JSON here")
    p = sub.add_parser("demo", help="the CPU demo: tiny Qwen2-VL learns the synthetic scan task")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--grpo-seconds", type=float, default=None, help="GRPO wall-time budget")
    p.add_argument("--quick", action="store_true", help="a few steps only (smoke run)")
    args = ap.parse_args(argv)
    try:
        if args.cmd == "demo":
            from .demo import run_demo
            return run_demo(seed=args.seed, out=args.out, grpo_seconds=args.grpo_seconds, quick=args.quick)
        cfg = load_config(args.config, args.overrides)
        if args.cmd == "train":
            return cmd_train(cfg)
        if args.cmd == "sft":
            return cmd_sft(cfg)
        return cmd_eval(cfg, args.out)
    except (ValueError, FileNotFoundError) as e:
        print(f"grpo {args.cmd}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
