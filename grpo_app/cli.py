"""`grpo train|sft|eval|demo|study`: the command line over configs, data, policy, trainers and eval.

    grpo train --config examples/configs/pmc_vqa_grpo_instruct.yaml run.steps=500
    torchrun --nproc_per_node 8 -m grpo_app train --config examples/configs/pmc_vqa_grpo_ddp.yaml
    grpo sft   --config examples/configs/synthetic_sft.yaml
    grpo eval  --config examples/configs/pmc_vqa_grpo_instruct.yaml --whole data.split=test model.path=...
    grpo demo  [--seed 0] [--quick]
    grpo study [--grid synthetic] [--seeds 0 1 2] [--steps 150]
    grpo plan  --config examples/configs/pmc_vqa_grpo_ddp.yaml --model qwen2-vl-7b --gpus 8

The subcommands' work is in grpo_app.commands (train, sft, eval), grpo_app.demo and grpo_app.study.
"""

from __future__ import annotations

import argparse
import sys

from grpo_core.checkpoint import CheckpointError
from grpo_core.config import load_config
from grpo_core.resume import ResumeError

from .commands import cmd_eval, cmd_sft, cmd_train, make_eval_fn  # noqa: F401  (re-exported: grpo_app.cli.cmd_train)

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
    "plan": ("the per-GPU memory table of a config, before anything is loaded",
             "Weights (fp32 masters, bf16 copies), gradients, optimizer states, the reference, activations per "
             "micro-batch, the rollout's KV cache, the loss buffers and host RAM for the config's step; the peak, "
             "whether it fits --gpu-mem, and the cheapest change that makes it fit (grpo_core.memory_plan)."),
}


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
        if name == "train":
            p.add_argument("--fresh", action="store_true",
                           help="start a new run even if run.output_dir holds one (it moves to previous-run-K/)")
            p.add_argument("--force-resume", action="store_true",
                           help="resume even though a fixed setting changed (model, data, objective...): "
                                "the run then mixes two configurations; it is reported as forced")
    p = sub.add_parser("demo", help=COMMANDS["demo"][0], description=COMMANDS["demo"][1])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--grpo-seconds", type=float, default=None, help="GRPO training-time budget (default 270)")
    p.add_argument("--quick", action="store_true", help="a few steps only (smoke run)")
    add_study_arguments(sub.add_parser("study", help=COMMANDS["study"][0], description=COMMANDS["study"][1]))
    from .plan import add_plan_arguments
    add_plan_arguments(sub.add_parser("plan", help=COMMANDS["plan"][0], description=COMMANDS["plan"][1]))
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
        if args.cmd == "plan":
            from .plan import run_plan_cli
            return run_plan_cli(args)
        overrides = list(args.overrides)
        if getattr(args, "fresh", False):
            overrides += ["run.resume=false", "run.resume_force=true"]
        elif getattr(args, "force_resume", False):
            overrides += ["run.resume_force=true"]
        cfg = load_config(args.config, overrides)
        if args.cmd == "train":
            return cmd_train(cfg)
        if args.cmd == "sft":
            return cmd_sft(cfg)
        return cmd_eval(cfg, args.out, whole=args.whole, samples=args.samples)
    except (ValueError, FileNotFoundError, ImportError, ResumeError, CheckpointError, FloatingPointError) as e:
        print(f"grpo {args.cmd}: error: {e}", file=sys.stderr)   # what, where and what to do; no traceback
        return 2


if __name__ == "__main__":
    sys.exit(main())
