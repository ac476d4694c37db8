"""`grpo train|sft|eval|demo|study`: the command line over configs, data, policy, trainers and eval.

    grpo train --config examples/configs/pmc_vqa_grpo_instruct.yaml run.steps=500
    torchrun --nproc_per_node 8 -m grpo_app train --config examples/configs/pmc_vqa_grpo_ddp.yaml
    grpo sft   --config examples/configs/synthetic_sft.yaml
    grpo eval  --config examples/configs/pmc_vqa_grpo_instruct.yaml --whole data.split=test model.path=...
    grpo demo  [--seed 0] [--quick]
    grpo study [--grid synthetic] [--seeds 0 1 2] [--steps 150]

What a run leaves in ``run.output_dir``: metrics.jsonl (every step), curves.png (the whole run,
resumed parts included), samples.jsonl + samples.html (prompts, completions, rewards, images),
eval_start.json / eval_final.json (held-out EvalResult before and after), checkpoints ckpt-*/.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

from grpo_core.config import TrainConfig, load_config
from grpo_core.data import build_records, make_prompt_fn

COMMANDS = {   # name → (one line for `grpo --help`, the paragraph of `grpo NAME --help`)
    "train": ("GRPO training from a YAML config (also one rank of a torchrun job)",
              "GRPO on the records of data.source from the policy at model.path: the warm-up section first "
              "(warmup.steps > 0, not on resume), a held-out eval at the start (run.eval_every > 0) and at the "
              "end, checkpoints, metrics.jsonl, curves.png and samples.html in run.output_dir. Resumes from the "
              "newest checkpoint there (run.resume)."),
    "sft": ("supervised fine-tuning baseline on the same records, prompts and eval",
            "Cross-entropy on the gold answers (sft.target: answer, or reasoning + answer) of data.source, then "
            "the same held-out eval as GRPO; the policy is saved to run.output_dir/policy."),
    "eval": ("evaluate a policy: held-out records, or a whole split (--whole)",
             "Greedy generation on the held-out records of the config (the slice GRPO never trains on, or "
             "data.eval_source), or with --whole on every record of data.source / data.split (e.g. a test split). "
             "Prints accuracy and format rate overall, by modality and by question type; --out writes the JSON, "
             "and samples.html beside it shows the first completions with their images."),
    "demo": ("the CPU demo: a tiny Qwen2-VL learns the synthetic scan task",
             "Format warm-up, GRPO for a training-time budget, the swapped-images control and an SFT baseline "
             "with the same training time; prints a table and writes runs/demo/demo-seed{S}.{json,png}."),
    "study": ("the study's grid as one resumable command: settings × seeds, a table and a plot",
              "GRPO from the instruct- and base-style init, + semantic judge, ECR, CWR, Dr. GRPO and SFT, each "
              "from the same starting model with the same budget, over several seeds; writes study.md / "
              "study.json / study.png and skips cells already done (docs/STUDY.md)."),
}


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


def _summary(res) -> dict:
    return {"accuracy": res.accuracy, "format_rate": res.format_rate, "n": res.n,
            "mean_completion_tokens": res.mean_completion_tokens, "mean_reasoning_words": res.mean_reasoning_words}


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

    records = list(load_dataset(d.source, format=d.format, split=d.split, skip_bad=d.skip_bad))
    return records[: d.limit] if d.limit else records


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


def build_parser() -> argparse.ArgumentParser:
    from .study import add_study_arguments

    ap = argparse.ArgumentParser(prog="grpo", description="GRPO for medical VQA on vision-language models. "
                                 "Configs: examples/configs/; every key: docs/CONFIG.md.")
    sub = ap.add_subparsers(dest="cmd", required=True, metavar="{" + ",".join(COMMANDS) + "}")
    for name in ("train", "sft", "eval"):
        p = sub.add_parser(name, help=COMMANDS[name][0], description=COMMANDS[name][1])
        p.add_argument("--config", help="YAML config (examples/configs/; keys in docs/CONFIG.md)")
        p.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. run.steps=500 optim.lr=2e-6")
        if name == "eval":
            p.add_argument("--out", help="write the EvalResult JSON here (samples.html goes beside it)")
            p.add_argument("--whole", action="store_true",
                           help="every record of data.source / data.split (data.limit applies, run.eval_limit not), "
                                "instead of the held-out slice")
            p.add_argument("--samples", type=int, default=16, help="completions shown in samples.html (0 = none)")
    p = sub.add_parser("demo", help=COMMANDS["demo"][0], description=COMMANDS["demo"][1])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--grpo-seconds", type=float, default=None, help="GRPO training-time budget (default 270)")
    p.add_argument("--quick", action="store_true", help="a few steps only (smoke run)")
    add_study_arguments(sub.add_parser("study", help=COMMANDS["study"][0], description=COMMANDS["study"][1]))
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.cmd == "demo":
            from .demo import run_demo
            return run_demo(seed=args.seed, out=args.out, grpo_seconds=args.grpo_seconds, quick=args.quick)
        if args.cmd == "study":
            from .study import run_study_cli
            return run_study_cli(args)
        cfg = load_config(args.config, args.overrides)
        if args.cmd == "train":
            return cmd_train(cfg)
        if args.cmd == "sft":
            return cmd_sft(cfg)
        return cmd_eval(cfg, args.out, whole=args.whole, samples=args.samples)
    except (ValueError, FileNotFoundError, ImportError) as e:
        print(f"grpo {args.cmd}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
