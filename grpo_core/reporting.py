"""Where a run's numbers go besides ``metrics.jsonl``: progress bars and metric reporters.

    bar = progress_bar(total_steps=100, start=0, time_budget_s=270.0)   # a time bar: the budget ends the loop
    reporters = Reporters(["tensorboard", "wandb"], "runs/x", config=to_dict(cfg))
    reporters.log(metrics, step); bar.step(metrics); ...; bar.close(); reporters.close()

Progress bars tell the truth about what ends the loop:
  - a step bar (``total`` = the steps to run) when only the step count ends the loop;
  - a time bar (``total`` = the budget in seconds, steps shown beside it) when a wall-time budget
    can end it first; a step bar there would stop at e.g. 65 % of a step count never reached;
  - ``close()`` fills the bar: when the loop ends normally, by steps or by budget, the work asked
    for is done (an exception leaves it where it stopped);
  - the steps beside a time bar show their total only when it is a real cap (below NO_STEP_CAP,
    the sentinel of a loop that only time ends: "step 812", not "step 812/1000000000");
  - outside a terminal the bar is a line per 10 % or 30 s (grpo_core.progress), not a redraw.

Reporters (``run.report_to``; both optional extras, imported only when selected):
  - "tensorboard": ``torch.utils.tensorboard.SummaryWriter`` into the output folder
    (``pip install -e '.[tensorboard]'``); view with ``tensorboard --logdir runs/``.
  - "wandb": Weights & Biases (``pip install -e '.[wandb]'``); project from ``WANDB_PROJECT``
    (default "grpo_core"), run name = the output folder's name; ``WANDB_MODE=offline`` writes
    locally under the output folder (``wandb sync`` uploads later).
A selected reporter that is not installed is an error that names the extra, before any step runs.
"""

from __future__ import annotations

import math
import os
import time

NO_STEP_CAP = 10**9                          # total_steps this large: only the budget ends the loop
REPORTERS = ("tensorboard", "wandb")                      # run.report_to
_EXTRAS = {"tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb")}   # name → (module, extra)


def check_report_to(names) -> None:
    """Each name a known reporter, none twice; ValueError naming ``run.report_to``."""
    for n in names:
        if n not in REPORTERS:
            raise ValueError(f"config: run.report_to has {n!r}; known reporters: {REPORTERS} "
                             "(metrics.jsonl and curves.png are always written)")
    if len(set(names)) != len(names):
        raise ValueError(f"config: run.report_to names a reporter twice: {list(names)}")


def _require(name: str):
    module, extra = _EXTRAS[name]
    try:
        return __import__(module)
    except ImportError as e:
        raise ImportError(f"run.report_to includes {name!r} but {module} is not installed ({e}); "
                          f"pip install -e '.[{extra}]' or remove {name!r} from run.report_to") from None


def _scalars(metrics: dict) -> dict:
    return {k: float(v) for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))}


class Reporters:
    """The selected reporters behind one ``log`` / ``close``; nothing selected = nothing done."""

    def __init__(self, names, output_dir: str, config: dict | None = None):
        check_report_to(list(names))
        self.tb = self.wandb_run = None
        if "tensorboard" in names:
            _require("tensorboard")
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(output_dir)
        if "wandb" in names:
            wandb = _require("wandb")
            os.makedirs(output_dir, exist_ok=True)
            self.wandb_run = wandb.init(project=os.environ.get("WANDB_PROJECT", "grpo_core"), dir=output_dir,
                                        name=os.path.basename(os.path.abspath(output_dir)), config=config or {})

    def log(self, metrics: dict, step: int) -> None:
        values = _scalars(metrics)
        if self.tb is not None:
            for k, v in values.items():
                self.tb.add_scalar(k, v, step)
        if self.wandb_run is not None:
            self.wandb_run.log(values, step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()


class ProgressBar:
    """A tqdm bar over steps or over a time budget (see the module docstring); ``enabled=False``
    gives a bar that does nothing, so callers need no ``if bar``."""

    def __init__(self, total_steps: int, start: int = 0, time_budget_s: float = 0.0, desc: str = "grpo",
                 enabled: bool = True):
        self.total_steps, self.steps, self.budget = total_steps, start, time_budget_s
        self.t0 = time.perf_counter()
        self.bar = None
        if not enabled:
            return
        from .progress import bar
        if self.budget > 0:
            fmt = "{l_bar}{bar}| {n:.0f}/{total:.0f} s [{elapsed}<{remaining}{postfix}]"
            self.bar = bar(round(self.budget), f"{desc} (time budget)", "s", bar_format=fmt)
        else:
            self.bar = bar(total_steps, desc, "step", initial=start)

    def step(self, postfix: dict | None = None, elapsed: float | None = None) -> None:
        """One step done; ``postfix`` (name → value) is shown beside the bar; ``elapsed`` (s) is the
        time spent against the budget when the caller keeps its own clock (default: since start)."""
        self.steps += 1
        if self.bar is None:
            return
        shown = dict(postfix or {})
        if self.budget > 0:
            capped = self.total_steps < NO_STEP_CAP
            count = f"{self.steps}/{self.total_steps}" if capped else f"{self.steps}"
            shown = {"step": count, **shown}
        if shown:                             # before the redraw: a log line shows this step
            self.bar.set_postfix(shown, refresh=False)
        if self.budget > 0:
            used = time.perf_counter() - self.t0 if elapsed is None else elapsed
            self.bar.n = min(used, self.bar.total)
            self.bar.refresh()
        else:
            self.bar.update(1)

    def close(self, done: bool = True) -> None:
        """Fill the bar when the loop ended normally (``done``), then close it."""
        if self.bar is None:
            return
        if done:
            self.bar.n = self.bar.total
            self.bar.refresh()
        self.bar.close()


def progress_bar(total_steps: int, start: int = 0, time_budget_s: float = 0.0, desc: str = "grpo",
                 enabled: bool = True) -> ProgressBar:
    """A time bar when ``time_budget_s`` > 0, else a step bar (module docstring)."""
    return ProgressBar(total_steps, start, time_budget_s, desc, enabled)
