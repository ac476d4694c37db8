"""Resume semantics: where a run continues from, and which of its settings may change on the way.

A run is what its FIXED settings define: the weights it started from, the data and its order, the
shape of a step, the objective. Continuing a checkpoint under other FIXED values would train a
mixture of two runs while reporting one, so that is an error unless the user forces it. The
settings that MAY CHANGE are budgets, cadences and knobs that leave the objective alone; they take
the new value, and each change is reported. Each config field declares its class and the reason
on itself (``option(..., resume=fixed(why) | may_change(what) | not_compared(why))``, config.py,
loss.py, sampling.py); ``FIXED`` / ``MAY_CHANGE`` here are read from those declarations. A key
with none is treated as FIXED, and tests/test_checkpoint.py fails when a field declares none.

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

import dataclasses
import json
import os
from dataclasses import dataclass, field

from .checkpoint import (
    RUN_CONFIG,
    CheckpointError,
    checkpoint_step,
    list_checkpoints,
    reading,
    recover_leftovers,
    verify_checkpoint,
)
from .optim import lr_factor


def resume_classes(obj=None, prefix: str = "") -> dict:
    """{"section.field": (class, reason)} from the ``resume=`` declarations on the config fields
    (grpo_core.options: "fixed" / "may_change" / "not_compared"); a nested section declared
    not_compared appears once, as "section." (its every key)."""
    if obj is None:
        from .config import TrainConfig

        obj = TrainConfig()
    out = {}
    for f in dataclasses.fields(obj):
        value, rule = getattr(obj, f.name), f.metadata.get("resume")
        if dataclasses.is_dataclass(value) and not (rule and rule[0] == "not_compared"):
            out.update(resume_classes(value, f"{prefix}{f.name}."))
        elif dataclasses.is_dataclass(value):
            out[f"{prefix}{f.name}."] = rule
        elif rule:
            out[prefix + f.name] = rule
    return out


_CLASSES = resume_classes()
# What may not change mid-run, and why (the "why" is printed in the error).
FIXED = {k: why for k, (kind, why) in _CLASSES.items() if kind == "fixed"}
# What may change, and what happens when it does (printed with each change).
MAY_CHANGE = {k: what for k, (kind, what) in _CLASSES.items() if kind == "may_change"}
# how to start, and the SFT trainer's own settings ("sft." = every key of that section)
NOT_COMPARED = tuple(k for k, (kind, _) in _CLASSES.items() if kind == "not_compared")


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
    mu, sched = c.get("grpo.mu", 1), c.get("optim.schedule", "constant")
    warm = c.get("optim.lr_warmup_steps", 0)
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
        with reading(path, RUN_CONFIG), open(cfg_path) as f:
            return json.load(f)
    import torch

    with reading(path, "trainer_state.pt"):
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


def plan_resume(output_dir: str, current: dict, resume: bool = True, force: bool = False,
                steps: int | None = None) -> ResumePlan:
    """Decide how the run in ``output_dir`` starts (see module doc); rank 0 only (it may rename).
    ``current``: ``dataclasses.asdict`` of the config; ``steps``: the run's length (default
    run.steps). Raises ResumeError or CheckpointError."""
    if not resume:
        earlier = _earlier_run(output_dir)
        if not earlier:
            return ResumePlan(None, 0, [f"starting a new run in {output_dir}"])
        if not force:
            raise ResumeError(f"run.resume=false, but {output_dir} holds an earlier run ({', '.join(earlier[-3:])}); "
                              "its checkpoints and metrics would mix with this run's. "
                              + _how_to_start_over(output_dir))
        dest = set_aside_previous_run(output_dir)
        return ResumePlan(None, 0, [f"starting a new run in {output_dir}; the earlier run's checkpoints and "
                                    f"metrics.jsonl were moved to {dest}"])
    path, notes = find_resumable_checkpoint(output_dir)
    if path is None:
        return ResumePlan(None, 0, notes + [f"starting a new run in {output_dir} (no checkpoint there)"])
    step = checkpoint_step(path)
    total = steps if steps is not None else current["run"]["steps"]
    notes.append(f"resuming from {path} (step {step} done; next step {step + 1} of {total})"
                 if step < total else
                 f"{path}: the run is finished (step {step} of run.steps={total} done); nothing to "
                 "train: raise run.steps to continue it, or pass --fresh to start over")
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
        raise TypeError(f"set_base_lr: expects the LambdaLR of grpo_core.optim.make_scheduler, "
                        f"got {type(scheduler).__name__}")
    scheduler.base_lrs = [lr] * len(optimizer.param_groups)
    for group, lam in zip(optimizer.param_groups, lams):
        group["initial_lr"] = lr
        group["lr"] = lr * lam(scheduler.last_epoch)       # what LambdaLR.get_lr computes
    scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]
