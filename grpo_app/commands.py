"""What each `grpo` subcommand does, as functions of a TrainConfig (the parser lives in grpo_app.cli).

    cmd_train(cfg)            GRPO (warm-up, start eval, train, final eval, curves, samples)
    cmd_sft(cfg)              the SFT baseline
    cmd_eval(cfg, out, whole) held-out records, or a whole split (grpo_app.evaluation: also
                              pass@k, counterfactuals, --compare, --over-time)
    cmd_resume_plan(...)      how a run in a folder would start (or --seal an old checkpoint)

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
from grpo_core.precision import resolve_export_dtype

from .evaluation import cmd_eval, eval_records  # noqa: F401  (grpo eval: grpo_app.evaluation)

# The config keys each command reads (a section, or one key); an override of any other key is an
# error (`grpo sft ... run.steps=3` ran sft.steps = 2,000 steps). train reads every key. A YAML
# --config may hold other keys (one file serves train, sft and eval), so only overrides are checked.
_EVAL_READS = ("model", "data", "rollout.max_new_tokens", "run.seed", "run.eval_limit",
               "run.progress", "run.output_dir", "run.log_completions", "run.threads", "run.eval_samples")
READS = {"sft": _EVAL_READS + ("sft", "run.export_dtype"), "eval": _EVAL_READS}
INSTEAD = {"sft": {"run.steps": "sft.steps", "optim": "sft.optim"}}   # the key meant, by its prefix


def check_overrides(command: str, overrides) -> None:
    """ValueError for an override ``key=value`` whose key ``command`` does not read (READS)."""
    reads = READS.get(command)
    for item in overrides if reads else ():
        key = item.split("=", 1)[0].strip()
        if "=" not in item or any(key == r or key.startswith(r + ".") for r in reads):
            continue
        hint = next((f"; did you mean {new + key[len(old):]}?"
                     for old, new in INSTEAD.get(command, {}).items()
                     if key == old or key.startswith(old + ".")), ".")
        raise ValueError(f"grpo {command} does not read {key} (override {item!r}){hint} It reads "
                         f"{', '.join(r if '.' in r else r + '.*' for r in reads)}.")


def make_eval_fn(cfg: TrainConfig, records, progress=False, samples_dir: str | None = None,
                 step_of=None, announce: bool = False):
    """policy → {"accuracy", "format_rate"} (+ "pass@k" with ``run.eval_samples``) on the first
    ``run.eval_limit`` records; with ``samples_dir``
    the first ``2 · run.log_completions`` completions go to its samples.jsonl/.html (split "eval");
    ``announce``: print one line per eval after step 0 (the evals along the way of `grpo train`)."""
    from grpo_core.eval import evaluate
    from grpo_core.samples import eval_rows, write_samples

    recs = records[: cfg.run.eval_limit or len(records)]

    def fn(policy):
        res = evaluate(policy, recs, template=cfg.data.prompt, max_new_tokens=cfg.rollout.max_new_tokens,
                       progress=progress, samples=cfg.run.eval_samples,
                       temperature=cfg.rollout.temperature, sample_seed=cfg.run.seed)
        if samples_dir and cfg.run.log_completions:
            write_samples(samples_dir, step_of() if step_of else 0,
                          eval_rows(recs, res.items, 2 * cfg.run.log_completions),
                          split="eval")
        fn.last = res
        step = step_of() if step_of else 0
        if announce and step:
            from grpo_core.progress import say
            say(f"held-out eval at step {step}: accuracy {res.accuracy:.3f}, "
                f"format {res.format_rate:.3f} ({len(res.items)} records)")
        return {"accuracy": res.accuracy, "format_rate": res.format_rate,
                **{f"pass@{k}": v for k, v in res.pass_at_k.items()}}
    return fn


def cmd_train(cfg: TrainConfig) -> int:
    """Single process, or one rank of a torchrun job (dist.mode=ddp|fsdp2): see grpo_core.distributed."""
    from grpo_core import distributed as D
    from grpo_core.checkpoint import latest_checkpoint
    from grpo_core.safeguards import RunLock, check_output_dir
    from grpo_core.trainer import GRPOTrainer

    from .factory import load_policy
    from .judge import prepare_judges
    from .plotting import plot_history, read_metrics
    from .warmup import format_warmup

    out = cfg.run.output_dir
    check_output_dir(out)                     # a file, read-only: one line, before any model loads
    with D.session(cfg.dist) as dist, RunLock(out, enabled=dist.is_main) as lock:   # one run/folder
        main = dist.is_main
        for note in lock.notes:
            print(f"grpo: {note}", flush=True)
        torch.manual_seed(cfg.run.seed)
        train, held = build_records(cfg.data, cfg.run.seed,   # data errors before any model loads
                                    progress=cfg.run.progress and main)
        # a missing synthetic judge: rank 0 trains it
        prepare_judges(cfg, progress=cfg.run.progress and main, build=main)
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
        eval_fn = make_eval_fn(cfg, held, samples_dir=out if main else None,
                               step_of=lambda: trainer.step_idx, announce=main)
        trainer = GRPOTrainer(policy, train, cfg, eval_fn=eval_fn, dist=dist)
        start = None
        if cfg.run.eval_every and not resuming:   # the first point of the held-out curve
            with trainer.replica.gathered(), trainer.autocast:   # evals compute in model.dtype
                start = eval_fn(policy)
            if main:
                eval_fn.last.to_json(os.path.join(out, "eval_start.json"))
                print(json.dumps({"start_eval": start}))
        history = trainer.train(save_at_end=True)   # every rank: fsdp2 gathers, rank 0 writes
        # eval is replicated on every rank (under fsdp2 it needs all of them to gather the weights)
        final_fn = make_eval_fn(cfg, held, progress=cfg.run.progress and main, samples_dir=out if main else None,
                                step_of=lambda: trainer.step_idx)
        with trainer.replica.gathered(), trainer.autocast:
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
    """The SFT baseline under the run harness: metrics.jsonl, checkpoints, resume, as for GRPO."""
    from grpo_core.config import to_dict
    from grpo_core.safeguards import check_output_dir
    from grpo_core.sft import SFTTrainer

    from .factory import load_policy
    from .warmup import with_reasoning

    check_output_dir(cfg.run.output_dir)      # a file, read-only: one line, before any model loads
    torch.manual_seed(cfg.run.seed)
    train, held = build_records(cfg.data, cfg.run.seed,       # data errors before any model loads
                                progress=cfg.run.progress)
    if cfg.sft.target == "reasoning" and cfg.data.source == "synthetic":
        train = with_reasoning(train)         # synthetic records carry no reasoning: name the gold answer
    policy = load_policy(cfg.model, seed=cfg.run.seed)
    prompt_fn = make_prompt_fn(cfg.data.prompt, cfg.data.shuffle_options, cfg.run.seed)
    sft = SFTTrainer(policy, train, cfg.sft, prompt_fn, cfg.data.prompt, cfg.run.seed,
                     dtype=cfg.model.dtype)
    sft.train(cfg.run, config=to_dict(cfg))
    out = cfg.run.output_dir
    os.makedirs(out, exist_ok=True)
    policy.save_pretrained(os.path.join(out, "policy"),
                           dtype=resolve_export_dtype(cfg.run.export_dtype, cfg.model.dtype, policy.device))
    fn = make_eval_fn(cfg, held, progress=cfg.run.progress, samples_dir=out, step_of=lambda: cfg.sft.steps)
    final = fn(policy)
    fn.last.to_json(os.path.join(out, "eval_final.json"))
    print(json.dumps({"final_eval": final}, indent=2))
    return 0


def cmd_resume_plan(output_dir: str, config: str | None, overrides: list,
                    seal: bool = False) -> int:
    """Say how a run in ``output_dir`` would start (leftovers recovered: this renames/deletes, as a
    start would; damaged checkpoints named; settings compared), or with ``seal`` write the manifest
    of a checkpoint from before manifests (after checking that its trainer state loads)."""
    import dataclasses

    from grpo_core.checkpoint import checkpoint_step, reading, verify_checkpoint, write_manifest
    from grpo_core.config import load_config
    from grpo_core.resume import plan_resume

    if seal:
        with reading(output_dir, "trainer_state.pt"):            # readable before it is vouched for
            torch.load(os.path.join(output_dir, "trainer_state.pt"), map_location="cpu",
                       weights_only=True)
        write_manifest(output_dir, checkpoint_step(output_dir))
        verify_checkpoint(output_dir)
        print(f"sealed {output_dir}: manifest written, checksums and weights verified")
        return 0
    cfg = load_config(config, list(overrides) + [f"run.output_dir={output_dir}"])
    plan = plan_resume(output_dir, dataclasses.asdict(cfg), cfg.run.resume, cfg.run.resume_force)
    print("\n".join(plan.notes))
    return 0
