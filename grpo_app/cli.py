"""`grpo train|sft|eval|demo|study`: the command line over configs, data, policy, trainers and eval.

    grpo train --config examples/configs/pmc_vqa_grpo_instruct.yaml run.steps=500
    torchrun --nproc_per_node 8 -m grpo_app train --config examples/configs/pmc_vqa_grpo_ddp.yaml
    grpo sft   --config examples/configs/synthetic_sft.yaml
    grpo eval  --config examples/configs/pmc_vqa_grpo_instruct.yaml --whole data.split=test model.path=...
    grpo eval  --config C --counterfactual | --samples 8 | --compare RUN_A RUN_B
    grpo eval  --over-time RUN_DIR
    grpo demo  [--seed 0] [--quick]
    grpo study [--grid synthetic] [--seeds 0 1 2] [--steps 2000]
    grpo resume-plan runs/grpo [--config ...] [overrides]     (or: --seal runs/grpo/ckpt-N)
    grpo plan  --config examples/configs/pmc_vqa_grpo_ddp.yaml --model qwen2-vl-7b --gpus 8

The subcommands' work is in grpo_app.commands (train, sft, eval), grpo_app.demo and grpo_app.study.
Nothing here imports torch or grpo_core before the arguments are parsed: ``grpo --help`` and a
mistyped command answer at once (grpo_core, and torch with it, load after parsing).
"""

from __future__ import annotations

import argparse
import sys

LAZY = ("cmd_eval", "cmd_resume_plan", "cmd_sft", "cmd_train", "make_eval_fn")   # cli.cmd_train, ...


def __getattr__(name):
    """The commands re-exported from grpo_app.commands, imported on first use (it imports torch)."""
    if name in LAZY:
        from . import commands
        return getattr(commands, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
             "Greedy generation on the held-out records of the config (the slice GRPO never trains "
             "on, or data.eval_source; run.eval_limit applies), or with --whole on every record "
             "of data.source / data.split (e.g. a test split). Prints accuracy with its 95 % "
             "bootstrap interval and format rate overall, by modality and by question type; "
             "--samples N adds "
             "pass@k; --counterfactual evaluates own, blank and swapped images (visual reliance); "
             "--compare A B tests two runs on the same items; --over-time RUN scores every "
             "checkpoint of a run. --out writes the JSON, and samples.html beside it shows the "
             "first completions with their images."),
    "demo": ("the CPU demo: a tiny Qwen2-VL learns the synthetic scan task",
             "Format warm-up, GRPO for a training-time budget, the swapped-images control and an SFT baseline "
             "with the same training time; prints a table and writes runs/demo/demo-seed{S}.{json,png}."),
    "study": ("the study's grid as one resumable command: settings × seeds, a table and a plot",
              "GRPO from the instruct- and base-style init, + semantic judge, ECR, CWR, Dr. GRPO and SFT, each "
              "from the same starting model with the same budget, over several seeds; writes study.md / "
              "study.json / study.png (95 % intervals, paired orderings, visual reliance) and "
              "reuses finished cells run with the same steps and overrides (docs/STUDY.md)."),
    "resume-plan": ("say how a run in OUTPUT_DIR would start, or --seal an old checkpoint",
                    "Recovers leftovers of interrupted saves (renames/deletes, as a start "
                    "would), names damaged checkpoints, compares the newest good one's settings "
                    "with the config (docs/CHECKPOINTS.md). --seal writes the manifest of a "
                    "checkpoint from before manifests, once its trainer state loads."),
    "plan": ("the per-GPU memory table of a config, before anything is loaded",
             "Weights (fp32 masters, bf16 copies), gradients, optimizer states, the reference, "
             "activations per micro-batch, the rollout's KV cache, the loss buffers and host RAM "
             "for the config's step; the peak, whether it fits --gpu-mem, and the cheapest change "
             "that makes it fit (grpo_core.memory_plan)."),
}


OVERRIDE_HELP = {   # examples of the keys each command reads (grpo_app.commands.READS)
    "train": "section.key=value overrides, e.g. run.steps=500 optim.lr=2e-6",
    "sft": "section.key=value overrides of the keys sft reads, e.g. sft.steps=500 "
           "sft.optim.lr=3e-4 (run.steps / optim.* are GRPO's: an error here)",
    "eval": "section.key=value overrides of the keys eval reads, e.g. model.path=runs/x/policy "
            "data.split=test run.eval_limit=200",
}


def build_parser() -> argparse.ArgumentParser:
    from .study import add_study_arguments

    ap = argparse.ArgumentParser(prog="grpo", description="GRPO for medical VQA on vision-language models. "
                                 "Configs: examples/configs/; every key: docs/CONFIG.md.")
    sub = ap.add_subparsers(dest="cmd", required=True, metavar="{" + ",".join(COMMANDS) + "}")
    for name in ("train", "sft", "eval"):
        p = sub.add_parser(name, help=COMMANDS[name][0], description=COMMANDS[name][1])
        p.add_argument("--config", help="YAML config (examples/configs/; keys in docs/CONFIG.md)")
        p.add_argument("overrides", nargs="*", help=OVERRIDE_HELP[name])
        if name == "eval":
            p.add_argument("--out", help="write the EvalResult JSON here (samples.html goes beside it)")
            p.add_argument("--whole", action="store_true",
                           help="every record of data.source / data.split (data.limit applies, run.eval_limit not), "
                                "instead of the held-out slice")
            p.add_argument("--show", type=int, default=16,
                           help="completions shown in samples.html (0 = none)")
            p.add_argument("--samples", type=int, default=0,
                           help="also sample N completions per item (T = rollout.temperature): "
                                "pass@k")
            p.add_argument("--counterfactual", action="store_true",
                           help="each item with its own, a blank and another item's image: "
                                "visual reliance")
            p.add_argument("--no-image", action="store_true",
                           help="with --counterfactual: also text only")
            p.add_argument("--compare", nargs=2, metavar=("RUN_A", "RUN_B"),
                           help="two runs / checkpoints / policy folders / eval JSONs on the "
                                "same items: the difference, its 95 %% interval and a paired "
                                "p-value (exact McNemar)")
            p.add_argument("--over-time", metavar="RUN_DIR",
                           help="the start and every checkpoint of a run on the same items: "
                                "table and plot")
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
    help_, description = COMMANDS["resume-plan"]
    p = sub.add_parser("resume-plan", help=help_, description=description)
    p.add_argument("output_dir", help="the run's output_dir (or, with --seal, one checkpoint)")
    p.add_argument("overrides", nargs="*", help="section.key=value, as for grpo train")
    p.add_argument("--config", help="the run's YAML config")
    p.add_argument("--seal", action="store_true",
                   help="write manifest.json for a checkpoint that loads")
    from .plan import add_plan_arguments
    add_plan_arguments(sub.add_parser("plan", help=COMMANDS["plan"][0],
                                      description=COMMANDS["plan"][1]))
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from grpo_core.checkpoint import CheckpointError  # after parsing: these import torch
    from grpo_core.resume import ResumeError
    from grpo_core.safeguards import RunStopped

    try:
        if args.cmd == "demo":
            from .demo import run_demo
            return run_demo(seed=args.seed, out=args.out, grpo_seconds=args.grpo_seconds, quick=args.quick)
        if args.cmd == "study":
            from .study import run_study_cli
            return run_study_cli(args)
        if args.cmd == "resume-plan":
            from .commands import cmd_resume_plan
            return cmd_resume_plan(args.output_dir, args.config, args.overrides, args.seal)
        if args.cmd == "plan":
            from .plan import run_plan_cli
            return run_plan_cli(args)
        overrides = list(args.overrides)
        if getattr(args, "fresh", False):
            overrides += ["run.resume=false", "run.resume_force=true"]
        elif getattr(args, "force_resume", False):
            overrides += ["run.resume_force=true"]
        from grpo_core.config import load_config
        from grpo_core.threads import apply_threads

        from . import commands

        commands.check_overrides(args.cmd, args.overrides)        # keys this command does not read
        if args.cmd == "eval" and (args.compare or args.over_time):
            from .evaluation import cmd_compare, cmd_over_time, run_config

            cfg = run_config([args.over_time] if args.over_time else args.compare, args.config,
                             overrides)
            apply_threads(cfg.run.threads, cfg.model.device)
            if args.over_time:
                return cmd_over_time(cfg, args.over_time, args.out)
            return cmd_compare(cfg, *args.compare, args.out)
        cfg = load_config(args.config, overrides)
        apply_threads(cfg.run.threads, cfg.model.device)
        if args.cmd == "train":
            return commands.cmd_train(cfg)
        if args.cmd == "sft":
            return commands.cmd_sft(cfg)
        return commands.cmd_eval(cfg, args.out, whole=args.whole, show=args.show, samples=args.samples,
                                 counterfactual=args.counterfactual, no_image=args.no_image)
    except RunStopped as e:                  # interrupted, diverged, disk full, folder locked
        print(f"grpo {args.cmd}: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:                # Ctrl-C outside the training loop (loading, warm-up)
        print(f"grpo {args.cmd}: interrupted outside the training steps; the checkpoints in "
              "run.output_dir (if any) are kept", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, ImportError, ResumeError, CheckpointError, FloatingPointError) as e:
        print(f"grpo {args.cmd}: error: {e}", file=sys.stderr)   # what, where and what to do; no traceback
        return 2


if __name__ == "__main__":
    sys.exit(main())
