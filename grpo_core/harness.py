"""One run loop for every trainer: GRPO, SFT, the format warm-up and the demo's timed trainings.

    Harness(trainer, run, steps=...).run()
      output_dir checked (one-line errors), locked (grpo_core.safeguards.RunLock)
      ─► resume: rank 0 plans (grpo_core.resume.plan_resume), every rank loads the checkpoint
      ─► loop: trainer.step() ─► non-finite streak ─► eval cadence ─► metrics.jsonl, samples,
               reporters, progress ─► checkpoint every run.save_every steps ─► Ctrl-C / SIGTERM
               ─► time budget (training seconds only: evals, logging and saves are not counted)
      ─► the final checkpoint (``save_at_end``)

A trainer gives the harness ``step() -> metrics``, ``step_idx``, ``policy`` and ``history``; to be
checkpointed also ``save() -> path`` and ``resume(path, verify)``; optionally ``last_samples()``
(samples.jsonl), ``replica.gathered()`` (evals under FSDP2), ``dist`` and ``updates_per_step``
(steps whose ``nonfinite_steps`` reaches it made no update at all). With ``run.output_dir`` None
(the warm-up) nothing is written: progress, the time budget and evals only.

Checkpoints are written only for healthy weights (grpo_core.safeguards.weight_health: finite, and
no jump in magnitude against the last good checkpoint, or the start of the run); the previous
checkpoint stays until a later one is written, and a stop names the last good one. A rollout that
meets NaN/inf logits (NonFiniteLogitsError) is a step without an update: it counts toward
``run.max_nonfinite_steps`` like a NaN loss does.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import signal
import time

import torch

from .checkpoint import checkpoint_path, latest_checkpoint
from .metrics_log import MetricsLog
from .reporting import Reporters, progress_bar
from .resume import plan_resume
from .rollout import NonFiniteLogitsError
from .safeguards import (
    DivergedError,
    Interrupted,
    RunLock,
    StopRequest,
    check_output_dir,
    checkpoint_estimate,
    is_jump,
    is_out_of_space,
    no_space,
    weight_health,
)
from .samples import due as samples_due
from .samples import write_samples


class NonFiniteTrainingError(FloatingPointError):
    """Training produced NaN/inf (loss, gradients or weights) and cannot go on safely."""


class _Local:
    """The DistContext of a single process (what a trainer without ``dist`` runs under)."""

    is_main, active, rank = True, False, 0

    def all_reduce(self, x, op="sum"):
        return x

    def barrier(self):
        pass


class Harness:
    """Drive ``trainer`` for ``steps`` steps under ``run`` (a RunConfig; see the module doc).

    ``eval_fn(policy) -> {name: value}``: every ``run.eval_every`` steps (logged as eval/<name>);
    ``eval_every_s``: instead every that many training seconds, and at the start and end
    (the demo's curves; results in ``self.evals`` as (training seconds, {name: value})).
    ``config``: the resolved config dict (run_config.json, reporters, resume comparison).
    ``bar``: metric name → format, shown beside the progress bar. ``step_fn``: what one step
    calls (default ``trainer.step``).
    """

    def __init__(self, trainer, run, steps: int, *, name: str = "grpo", eval_fn=None,
                 eval_every_s: float = 0.0, config: dict | None = None, bar: dict | None = None,
                 save_at_end: bool = False, handle_signals: bool = True, step_fn=None):
        self.trainer, self.run, self.steps, self.name = trainer, run, steps, name
        self.eval_fn, self.eval_every_s, self.config = eval_fn, eval_every_s, config or {}
        self.bar_fields = bar or {"loss": ".3f"}
        self.out = run.output_dir or None
        self.dist = getattr(trainer, "dist", None) or _Local()
        self.save_at_end, self.handle_signals = save_at_end and self.out, handle_signals
        self.evals: list = []
        self.step_fn = step_fn or trainer.step
        self.good: dict | None = None            # weight statistics of the last good checkpoint
        self.last_good: str | None = None        # its path (None: nothing saved yet)
        self.saved_step: int | None = None
        self.spent = 0.0                         # training seconds of this process (evals excluded)

    # ---- the loop ---------------------------------------------------------------------------
    def run_loop(self) -> list[dict]:
        main = self.dist.is_main
        if self.out and main:
            check_output_dir(self.out)
        with RunLock(self.out or ".", enabled=bool(self.out) and main) as lock, \
                StopRequest(enabled=self.handle_signals and bool(self.out)) as stop:
            for note in lock.notes:
                print(f"{self.name}: {note}", flush=True)
            if self.out and self.trainer.step_idx == 0:   # not placed already by .resume(path)
                self._resume_from_output_dir()
            self.good = self._health()
            self.last_good = latest_checkpoint(self.out) if self.out and main else None
            self._loop(stop, main)
        return self.trainer.history

    def _loop(self, stop: StopRequest, main: bool) -> None:
        run, tr = self.run, self.trainer
        log = MetricsLog(os.path.join(self.out, "metrics.jsonl"), start_step=tr.step_idx) \
            if self.out and main else None
        reporters = Reporters(run.report_to if (main and self.out) else [], self.out or ".",
                              self.config)
        bar = progress_bar(self.steps, tr.step_idx, run.time_budget_s, desc=self.name,
                           enabled=run.progress and main)
        spent, streak, next_eval = 0.0, 0, self.eval_every_s
        if self.eval_every_s:
            self._timed_eval(0.0)
        while tr.step_idx < self.steps:
            t0 = time.perf_counter()
            m = self._step()
            spent += time.perf_counter() - t0
            streak = streak + 1 if m.get("nonfinite_steps", 0) >= self._updates() else 0
            if streak >= run.max_nonfinite_steps:
                raise NonFiniteTrainingError(self._nonfinite_message(streak))
            evaluated = self._eval(m)
            if self.eval_every_s and spent >= next_eval and spent < run.time_budget_s:
                self._timed_eval(spent)
                next_eval += self.eval_every_s
            tr.history.append(m)
            if log:
                log.append(m)            # strict JSON (NaN → null), each step once across resumes
                self._samples(evaluated)
            reporters.log(m, tr.step_idx)
            bar.step({k: f"{m[k]:{f}}" for k, f in self.bar_fields.items() if k in m},
                     elapsed=spent if run.time_budget_s else None)
            if self.out and run.save_every and tr.step_idx % run.save_every == 0:
                self.save()
            if self._stop_requested(stop):
                self._interrupted(stop.signum or signal.SIGTERM, bar, reporters)
            if run.time_budget_s and spent >= run.time_budget_s:
                break
        bar.close()
        reporters.close()
        if self.eval_every_s:
            self._timed_eval(spent)
        if self.save_at_end and self.saved_step != tr.step_idx:
            self.save()
        self.spent = spent

    def _stop_requested(self, stop: StopRequest) -> bool:
        """A signal on any rank stops every rank after this step (they save together)."""
        if not stop.enabled:
            return False
        return bool(self.dist.all_reduce(float(stop.signum is not None), "max"))

    def _updates(self) -> int:
        return getattr(self.trainer, "updates_per_step", 1)

    def _step(self) -> dict:
        """One trainer step; a rollout with NaN/inf logits becomes a step without an update."""
        tr = self.trainer
        try:
            return self.step_fn()
        except NonFiniteLogitsError as e:
            tr.step_idx += 1                 # the step's draws are spent, as for a NaN loss
            if self.dist.is_main:
                print(f"{self.name}: step {tr.step_idx}: no update: {e}", flush=True)
            return {"step": tr.step_idx, "nonfinite_steps": self._updates(),
                    "nonfinite_rollout": 1, "loss": math.nan}

    def _eval(self, m: dict) -> bool:
        every, step = self.run.eval_every, self.trainer.step_idx
        if not (self.eval_fn and every and not self.eval_every_s and step % every == 0):
            return False
        with self._gathered():
            m.update({f"eval/{k}": v for k, v in self.eval_fn(self.trainer.policy).items()})
        return True

    def _timed_eval(self, spent: float) -> None:
        with self._gathered():
            self.evals.append((round(spent, 2), self.eval_fn(self.trainer.policy)))

    @contextlib.contextmanager
    def _gathered(self):
        """An eval's context: no grad, FSDP2 units gathered, the trainer's compute dtype (autocast)."""
        replica = getattr(self.trainer, "replica", None)
        with replica.gathered() if replica is not None else torch.no_grad():
            with getattr(self.trainer, "autocast", None) or contextlib.nullcontext():
                yield

    def _samples(self, evaluated: bool) -> None:
        run, tr = self.run, self.trainer
        if not hasattr(tr, "last_samples"):
            return
        due = samples_due(run.log_completions_every, tr.step_idx, evaluated)
        if due and (rows := tr.last_samples()):
            write_samples(self.out, tr.step_idx, rows)

    # ---- messages -----------------------------------------------------------------------------
    def _resume_hint(self) -> str:
        if self.last_good:
            return f"The last good checkpoint is {self.last_good}: the same command resumes from it"
        return "No checkpoint was written; the same command starts over"

    def _nonfinite_message(self, streak: int) -> str:
        step, run = self.trainer.step_idx, self.run
        return (f"{self.name.upper()} steps {step - streak + 1}..{step}: the loss or gradient was "
                f"NaN/inf in {streak} consecutive steps (run.max_nonfinite_steps="
                f"{run.max_nonfinite_steps}); every update was skipped, so the weights are those "
                f"of step {step - streak}. {self._resume_hint()} (lower optim.lr, check the "
                "rewards and the data first)")

    def _interrupted(self, signum: int, bar, reporters) -> None:
        bar.close(done=False)
        reporters.close()
        if self.saved_step != self.trainer.step_idx:
            self.save()
        raise Interrupted(f"interrupted at step {self.trainer.step_idx}; resume with the same "
                          f"command (checkpoint {self.last_good})", signum)

    # ---- checkpoints --------------------------------------------------------------------------
    def _health(self) -> dict:
        """weight_health over every rank's shard (sums and maxima reduced)."""
        h = weight_health(_local_view(self.trainer.policy.model))
        d = self.dist
        h["bad_any"] = d.all_reduce(float(not h["finite"]), "max")
        h["rms"] = math.sqrt(d.all_reduce(h["rms"] ** 2, "sum") / max(d.all_reduce(1.0, "sum"), 1))
        h["max_abs"] = d.all_reduce(h["max_abs"], "max")
        return h

    def save(self) -> str:
        """Checkpoint the current step if the weights are healthy and the disk can hold it."""
        tr, d, step = self.trainer, self.dist, self.trainer.step_idx
        h = self._health()
        why = (f"the weights hold NaN/inf ({h['bad'] or 'on another rank'})" if h["bad_any"]
               else is_jump(h, self.good))
        if why:
            raise DivergedError(f"{self.name} step {step}: {why}; not saved. "
                                f"{self._resume_hint()}, after lowering optim.lr")
        need = checkpoint_estimate(tr.policy.model, self.last_good)     # rank 0 writes
        have = shutil.disk_usage(self.out).free if d.is_main else 0
        if d.all_reduce(float(d.is_main and have < need), "max"):
            raise no_space(self.out, need, have, self.last_good)
        try:
            path = tr.save()
        except Exception as e:
            if not is_out_of_space(e):
                raise
            shutil.rmtree(checkpoint_path(self.out, step) + ".tmp", ignore_errors=True)
            have = shutil.disk_usage(self.out).free
            raise no_space(self.out, need, have, self.last_good) from None
        self.good, self.last_good, self.saved_step = h, path, step
        return path

    def _resume_from_output_dir(self) -> None:
        """Rank 0 decides (plan_resume: recover leftovers, newest verified checkpoint, fixed
        settings unchanged) and says so; every rank then loads the checkpoint it chose."""
        run, main = self.run, self.dist.is_main
        plan = plan_resume(self.out, self.config, run.resume, run.resume_force, self.steps) \
            if main else None
        for line in plan.notes if plan else ():
            print(f"{self.name}: {line}", flush=True)
        path = [plan.path if plan else None]
        if self.dist.active:
            torch.distributed.broadcast_object_list(path, src=0)
        if path[0]:
            self.trainer.resume(path[0], verify=False)   # rank 0 verified it in plan_resume


def _local_view(model):
    """The parameters this rank holds (FSDP2's DTensor shards as local tensors)."""
    class View:
        def named_parameters(self):
            for n, p in model.named_parameters():
                yield n, (p.to_local() if hasattr(p, "to_local") else p)

        def parameters(self):
            return (p for _, p in self.named_parameters())
    return View()


def run_training(trainer, run, steps: int, **kw) -> list[dict]:
    """``Harness(trainer, run, steps, **kw).run_loop()``: the history of the steps run here."""
    return Harness(trainer, run, steps, **kw).run_loop()


def no_output(run):
    """A copy of RunConfig ``run`` that writes nothing (the warm-up, the demo's trainings)."""
    import dataclasses

    return dataclasses.replace(run, output_dir="", report_to=[], save_every=0)

