"""Resume semantics: where a run continues from, and which of its settings may change on the way.

A run is what its FIXED settings define: the weights it started from, the data and its order, the
shape of a step, the objective. Continuing a checkpoint under other FIXED values would train a
mixture of two runs while reporting one, so that is an error unless the user forces it. The
settings that MAY CHANGE are budgets, cadences and knobs that leave the objective alone; they take
the new value, and each change is reported. One place lists both (``FIXED`` / ``MAY_CHANGE``,
keys ``section.field`` of ``dataclasses.asdict(TrainConfig)``); a key in neither is treated as
FIXED, and tests/test_checkpoint.py fails when a config field is left unclassified.

Start of a run (``plan_resume``), rank 0::

    run.resume=true                 recover leftovers → newest checkpoint that verifies (damaged ones
                                    reported, fallback) → compare its run_config.json with the
                                    current config → FIXED differs: ResumeError (unless
                                    run.resume_force=true: continue, reported as forced)
    run.resume=false                output_dir holds no checkpoint: new run. Holds some: ResumeError
                                    (two runs would mix), unless run.resume_force=true: the earlier
                                    run's ckpt-* and metrics.jsonl move to previous-run-K/ first

The learning rate lives in three places after ``load_checkpoint`` (the optimizer's param groups,
the scheduler's ``base_lrs``, ``initial_lr``), all restored from the checkpoint: ``set_base_lr``
puts the configured value back, so a changed ``optim.lr`` takes effect (the old code kept the
saved one silently). Changing ``run.steps`` rebuilds the schedule with the new total: a decaying
schedule (cosine, linear) is re-stretched from the resume step on, and its LR jumps there
(``schedule_note`` says by how much; docs/CHECKPOINTS.md works an example).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

from .checkpoint import (
    RUN_CONFIG,
    CheckpointError,
    _reading,
    checkpoint_step,
    list_checkpoints,
    recover_leftovers,
    verify_checkpoint,
)
from .optim import lr_factor

# What may not change mid-run, and why (the "why" is printed in the error).
FIXED = {
    **dict.fromkeys(("model.path", "model.kind", "model.template"), "the model the run trains"),
    **dict.fromkeys(("model.dtype", "model.lora_rank", "model.lora_alpha", "model.freeze_vision"),
                    "the parameters the optimizer state belongs to"),
    **dict.fromkeys(("model.min_pixels", "model.max_pixels"), "what the model sees of each image"),
    **dict.fromkeys(("data.source", "data.format", "data.split", "data.eval_source", "data.eval_size",
                     "data.train_size", "data.image_size", "data.synthetic_task", "data.lesion_sigma",
                     "data.lesion_amplitude", "data.limit", "data.eval_split", "data.columns"),
                    "the training records (the saved data position indexes them)"),
    **dict.fromkeys(("data.prompt", "data.shuffle_options"), "the prompts the policy is trained on"),
    **dict.fromkeys(("rollout.group_size", "rollout.prompts_per_step", "rollout.max_new_tokens",
                     "rollout.temperature", "rollout.top_p", "rollout.top_k", "rollout.min_p"),
                    "the sampling distribution and the shape of a step"),
    **dict.fromkeys(("grpo.adv_scale", "grpo.agg", "grpo.clip_low", "grpo.clip_high", "grpo.dual_clip",
                     "grpo.beta", "grpo.kl", "grpo.kl_placement", "grpo.mu", "grpo.skip_zero_std_groups",
                     "grpo.max_len", "grpo.rewards", "grpo.ref", "grpo.ratio_level", "grpo.policy_loss", "grpo.delta",
                     "grpo.cispo_max", "grpo.sapo_tau_pos", "grpo.sapo_tau_neg", "grpo.entropy_coef",
                     "grpo.top_entropy_quantile", "grpo.kl_bias_correction", "grpo.baseline",
                     "grpo.mask_truncated_completions"), "the objective"),
    **dict.fromkeys(("grpo.dynamic_sampling", "grpo.dynamic_sampling_max_rounds"),
                    "which groups a step trains on, and how fast the data position moves"),
    **dict.fromkeys(("grpo.ref_sync_steps", "grpo.ref_sync_alpha"), "the reference the KL term holds the policy to"),
    **dict.fromkeys(("optim.weight_decay", "optim.betas"), "stored with the optimizer state"),
    **dict.fromkeys(("optim.warmup_steps", "optim.schedule"), "the shape of the LR schedule"),
    "run.seed": "every random draw of every step",
}

# What may change, and what happens when it does (printed with each change).
MAY_CHANGE = {
    "optim.lr": "the new peak LR applies from the resume step on",              # set_base_lr
    "optim.max_grad_norm": "applies from the resume step on",
    "run.steps": "the run stops at the new count; a decaying LR schedule is re-stretched",
    "run.time_budget_s": "counted from this start",
    **dict.fromkeys(("run.eval_every", "run.eval_limit", "run.save_every", "run.keep_last", "run.progress",
                     "run.output_dir", "run.max_nonfinite_steps"), "applies from the resume step on"),
    **dict.fromkeys(("model.device", "model.gradient_checkpointing", "model.tiny", "run.bf16_autocast",
                     "grpo.backend", "grpo.micro_batch_prompts", "dist.mode", "dist.backend",
                     "dist.timeout_s", "dist.reshard_after_forward"),
                    "how steps are computed, not what: results agree up to rounding"),
    **dict.fromkeys(("rollout.max_batch_sequences", "rollout.compact_below", "rollout.graphs",
                     "rollout.compile"),
                    "how rollouts are batched, not what is drawn: samples agree up to rounding"),
    "data.skip_bad": "records may be dropped; later batches then differ from an uninterrupted run",
    **dict.fromkeys(("data.check_images", "data.max_image_pixels", "data.allow_outside_root"),
                    "which bad rows are found may change; with skip_bad, later batches then differ"),
    **dict.fromkeys(("run.log_completions", "run.log_completions_every", "run.report_to"),
                    "logging only: applies from the resume step on"),                      # grpo_core.samples / reporting
    **dict.fromkeys(("warmup.steps", "warmup.batch_size", "warmup.lr"),
                    "the warm-up runs only before step 1 of a new run, never on resume"),  # grpo_app.warmup
}

NOT_COMPARED = ("run.resume", "run.resume_force", "sft.")   # how to start, and the SFT trainer's own settings


class ResumeError(RuntimeError):
    """Resuming would mix two runs; the message says which settings and what to do."""


@dataclass
class ResumePlan:
    path: str | None                  # checkpoint to load (None: a new run)
    step: int = 0                     # the step it holds
    notes: list = field(default_factory=list)   # what happened and what changed: print each line


# ---- which checkpoint ----------------------------------------------------------------------------
def find_resumable_checkpoint(output_dir: str, recover: bool = True) -> tuple[str | None, list[str]]:
    """(newest checkpoint that verifies, notes). Damaged ones are named in the notes and skipped;
    None when there is no checkpoint at all; CheckpointError when there are only damaged ones.
    ``recover``: run ``recover_leftovers`` first (rank 0 only)."""
    notes = recover_leftovers(output_dir) if recover else []
    damaged = []
    for path in reversed(list_checkpoints(output_dir)):
        try:
            verify_checkpoint(path)
        except CheckpointError as e:
            damaged.append(str(e))
            notes.append(f"{e} -- skipped, trying the previous checkpoint")
            continue
        if damaged:
            notes.append(f"falling back to {path}, the newest checkpoint that verifies")
        return path, notes
    if damaged:
        raise CheckpointError(f"no usable checkpoint in {output_dir}; every one is damaged:\n  - "
                              + "\n  - ".join(damaged) + "\nMove them away to start over, or point "
                              "run.output_dir at a copy of the run that has a good checkpoint.")
    return None, notes


# ---- comparing configs -------------------------------------------------------------------------
def flatten(d: dict, prefix: str = "") -> dict:
    """{"section.field": value} of a nested dict; tuples become lists (as after a JSON round trip)."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = json.loads(json.dumps(v))
    return out


def classify(key: str) -> str:
    """"fixed", "may_change" or "not_compared" (unknown keys are fixed: the safe side)."""
    if key in MAY_CHANGE:
        return "may_change"
    if any(key == p or (p.endswith(".") and key.startswith(p)) for p in NOT_COMPARED):
        return "not_compared"
    return "fixed"


def schedule_note(saved: dict, current: dict, step: int) -> str | None:
    """What a new ``run.steps`` does to the LR at optimizer step ``step · μ`` (None: no change)."""
    s, c = flatten(saved), flatten(current)
    mu, warm, sched = c.get("grpo.mu", 1), c.get("optim.warmup_steps", 0), c.get("optim.schedule", "constant")
    if sched == "constant" or s.get("run.steps") == c.get("run.steps"):
        return None
    k = step * mu
    old, new = (lr_factor(k, warm, n * mu, sched) for n in (s["run.steps"], c["run.steps"]))
    return (f"{sched} schedule re-stretched to {c['run.steps']} steps: at step {step} the LR goes from "
            f"{old:.3f}·lr (old plan) to {new:.3f}·lr, then decays to 0 at step {c['run.steps']}")


def compare_configs(saved: dict, current: dict, step: int | None = None) -> tuple[list[str], list[str]]:
    """(errors: FIXED settings that differ, changes: everything else that differs), one line each,
    on nested dicts as ``dataclasses.asdict(TrainConfig)`` gives (``step``: enrich run.steps)."""
    s, c = flatten(saved), flatten(current)
    errors, changes = [], []
    for key in sorted(set(s) | set(c)):
        kind = classify(key)
        if kind == "not_compared" or s.get(key) == c.get(key):
            continue
        if key not in c:
            changes.append(f"{key}: in the checkpoint's config, unknown to this version (ignored)")
        elif key not in s:
            changes.append(f"{key}: not in the checkpoint's config (added since); using {c[key]!r}")
        elif kind == "fixed":
            errors.append(f"{key}: {s[key]!r} in the checkpoint, {c[key]!r} now ({FIXED.get(key, 'not classified')})")
        else:
            line = f"{key}: {s[key]!r} -> {c[key]!r} ({MAY_CHANGE[key]})"
            if key == "run.steps" and step is not None and (note := schedule_note(saved, current, step)):
                line += f"; {note}"
            changes.append(line)
    return errors, changes


def read_run_config(path: str) -> dict | None:
    """The resolved config checkpoint ``path`` was written with (run_config.json, or the JSON string
    older checkpoints kept in trainer_state.pt), or None when it holds none."""
    cfg_path = os.path.join(path, RUN_CONFIG)
    if os.path.exists(cfg_path):
        with _reading(path, RUN_CONFIG), open(cfg_path) as f:
            return json.load(f)
    import torch

    with _reading(path, "trainer_state.pt"):
        state = torch.load(os.path.join(path, "trainer_state.pt"), map_location="cpu", weights_only=True)
    return json.loads(state["config"]) if isinstance(state.get("config"), str) else None


# ---- the start of a run ------------------------------------------------------------------------
def _how_to_start_over(output_dir: str) -> str:
    return (f"To start a new run instead, use another run.output_dir, or set run.resume=false "
            f"run.resume_force=true to move the earlier run's checkpoints and metrics.jsonl in {output_dir} "
            "to previous-run-K/ first.")


def set_aside_previous_run(output_dir: str) -> str:
    """Move ckpt-* (and leftovers) and metrics.jsonl of ``output_dir`` into a new previous-run-K/."""
    k = 1
    while os.path.exists(dest := os.path.join(output_dir, f"previous-run-{k}")):
        k += 1
    os.makedirs(dest)
    for name in sorted(os.listdir(output_dir)):
        if name == "metrics.jsonl" or name.startswith("ckpt-"):
            os.replace(os.path.join(output_dir, name), os.path.join(dest, name))
    return dest


def _earlier_run(output_dir: str) -> list[str]:
    if not os.path.isdir(output_dir):
        return []
    return sorted(d for d in os.listdir(output_dir) if d.startswith("ckpt-"))


def plan_resume(output_dir: str, current: dict, resume: bool = True, force: bool = False) -> ResumePlan:
    """Decide how the run in ``output_dir`` starts (see module doc); rank 0 only (it may rename).
    ``current``: ``dataclasses.asdict`` of the config. Raises ResumeError or CheckpointError."""
    if not resume:
        earlier = _earlier_run(output_dir)
        if not earlier:
            return ResumePlan(None, 0, [f"starting a new run in {output_dir}"])
        if not force:
            raise ResumeError(f"run.resume=false, but {output_dir} holds an earlier run ({', '.join(earlier[-3:])}); "
                              "its checkpoints and metrics would mix with this run's. " + _how_to_start_over(output_dir))
        dest = set_aside_previous_run(output_dir)
        return ResumePlan(None, 0, [f"starting a new run in {output_dir}; the earlier run's checkpoints and "
                                    f"metrics.jsonl were moved to {dest}"])
    path, notes = find_resumable_checkpoint(output_dir)
    if path is None:
        return ResumePlan(None, 0, notes + [f"starting a new run in {output_dir} (no checkpoint there)"])
    step = checkpoint_step(path)
    notes.append(f"resuming from {path} (step {step} done; next step {step + 1} of {current['run']['steps']})")
    saved = read_run_config(path)
    if saved is None:
        notes.append(f"{path} holds no run config (written by an older grpo_core): settings not compared")
        return ResumePlan(path, step, notes)
    errors, changes = compare_configs(saved, current, step)
    if errors and not force:
        raise ResumeError(f"cannot resume {path}: settings that cannot change mid-run differ from the run "
                          "that wrote it:\n  " + "\n  ".join(errors) + "\nRestore them to continue that run, or "
                          "set run.resume_force=true to continue it with the new values anyway. "
                          + _how_to_start_over(output_dir))
    notes += [f"FORCED (run.resume_force=true): {e}" for e in errors] + [f"changed: {c}" for c in changes]
    return ResumePlan(path, step, notes)


def set_base_lr(optimizer, scheduler, lr: float) -> None:
    """Make the configured peak ``lr`` the one in force after ``load_checkpoint`` restored the saved
    one: base_lrs, initial_lr and the current LR = lr · factor(k) of the (rebuilt) schedule.
    With an unchanged lr this rewrites the same numbers (bit-identical resume)."""
    lams = getattr(scheduler, "lr_lambdas", None)
    if lams is None:
        raise TypeError(f"set_base_lr: expects the LambdaLR of grpo_core.optim.make_scheduler, got {type(scheduler).__name__}")
    scheduler.base_lrs = [lr] * len(optimizer.param_groups)
    for group, lam in zip(optimizer.param_groups, lams):
        group["initial_lr"] = lr
        group["lr"] = lr * lam(scheduler.last_epoch)       # what LambdaLR.get_lr computes
    scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]


# ---- command line: what would a resume do? -------------------------------------------------------
def main(argv=None) -> int:
    import argparse
    import dataclasses

    from .checkpoint import write_manifest
    from .config import load_config

    ap = argparse.ArgumentParser(prog="python -m grpo_core.resume", description=(
        "Say how a run in OUTPUT_DIR would start: leftovers recovered (this renames/deletes, as a start "
        "would), damaged checkpoints named, settings compared. Or --seal a checkpoint from before manifests."))
    ap.add_argument("output_dir", help="the run's output_dir (or, with --seal, one checkpoint)")
    ap.add_argument("overrides", nargs="*", help="section.key=value, as for grpo train")
    ap.add_argument("--config", help="the run's YAML config")
    ap.add_argument("--seal", action="store_true", help="write manifest.json for a checkpoint that loads")
    a = ap.parse_intermixed_args(argv)
    try:
        if a.seal:
            import torch

            with _reading(a.output_dir, "trainer_state.pt"):   # readable before it is vouched for
                torch.load(os.path.join(a.output_dir, "trainer_state.pt"), map_location="cpu", weights_only=True)
            write_manifest(a.output_dir, checkpoint_step(a.output_dir))
            verify_checkpoint(a.output_dir)
            print(f"sealed {a.output_dir}: manifest written, checksums and weights verified")
            return 0
        cfg = load_config(a.config, list(a.overrides) + [f"run.output_dir={a.output_dir}"])
        plan = plan_resume(a.output_dir, dataclasses.asdict(cfg), cfg.run.resume, getattr(cfg.run, "resume_force", False))
    except (ResumeError, CheckpointError) as e:
        print(f"error: {e}")
        return 1
    print("\n".join(plan.notes))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
