"""A new user's first hour with `grpo` (issue #28): a fast --help, overrides a command ignores
refused, run.threads applied, and what a finished or resumed run prints."""

import os
import subprocess
import sys

import pytest
import torch

from grpo_app import commands
from grpo_app.cli import main
from grpo_core.threads import apply_threads, resolved_threads


def test_help_imports_neither_torch_nor_the_engine():
    code = ("import sys\nfrom grpo_app.cli import main\n"
            "for a in (['--help'], ['study', '--help']):\n"
            "    try:\n        main(a)\n    except SystemExit:\n        pass\n"
            "print(sorted(m for m in ('torch', 'grpo_core', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stderr


@pytest.mark.parametrize("argv, match", [
    (["sft", "run.steps=3"], r"grpo sft does not read run.steps .*; did you mean sft.steps\? It "),
    (["sft", "optim.lr=1e-3"], r"did you mean sft.optim.lr\?"),
    (["eval", "grpo.beta=0"], r"eval does not read grpo.beta \(override 'grpo.beta=0'\)\. It "),
])
def test_overrides_a_command_does_not_read_are_errors(argv, match, capsys, monkeypatch):
    import re

    monkeypatch.setattr(commands, "cmd_sft", lambda cfg: pytest.fail("sft ran"))
    assert main(argv) == 2
    assert re.search(match, capsys.readouterr().err)


def test_keys_a_command_reads_pass(monkeypatch):
    seen = {}
    monkeypatch.setattr(commands, "cmd_sft", lambda cfg: seen.setdefault("sft", cfg) and 0)
    monkeypatch.setattr(commands, "cmd_eval", lambda cfg, *a, **k: seen.setdefault("ev", cfg) and 0)
    assert main(["sft", "sft.steps=3", "sft.optim.lr=1e-3", "data.train_size=8", "run.seed=2"]) == 0
    assert seen["sft"].sft.steps == 3 and seen["sft"].sft.optim.lr == 1e-3
    assert main(["eval", "model.path=x", "run.eval_limit=5", "rollout.max_new_tokens=4"]) == 0
    assert seen["ev"].run.eval_limit == 5


def test_run_threads_auto_and_explicit(monkeypatch):
    before = torch.get_num_threads()
    try:
        assert resolved_threads(3, "cpu") == 3 and resolved_threads(3, "cuda") == 3
        assert resolved_threads(0, "cpu") == 1 and resolved_threads(0, "cuda:1") is None
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
        assert resolved_threads(0, "auto") == 1
        assert apply_threads(2, "cpu") == 2 == torch.get_num_threads()
        seen = {}
        fake = lambda cfg: seen.setdefault("n", torch.get_num_threads()) and 0   # noqa: E731
        monkeypatch.setattr(commands, "cmd_train", fake)
        assert main(["train", "model.device=cpu"]) == 0 and seen["n"] == 1      # auto: 1 on CPU
        seen.clear()
        assert main(["train", "run.threads=2"]) == 0 and seen["n"] == 2
    finally:
        torch.set_num_threads(before)


def test_evals_along_the_way_are_printed(monkeypatch, capsys):
    from types import SimpleNamespace

    from grpo_core.config import TrainConfig

    res = SimpleNamespace(accuracy=0.625, format_rate=1.0, items=[{}] * 8, pass_at_k={})
    monkeypatch.setattr("grpo_core.eval.evaluate", lambda *a, **k: res)
    step = [0]
    fn = commands.make_eval_fn(TrainConfig(), [], step_of=lambda: step[0], announce=True)
    fn(None)                                                    # the start eval: printed as JSON
    step[0] = 250
    assert fn(None) == {"accuracy": 0.625, "format_rate": 1.0}
    out = capsys.readouterr().out
    assert out == "held-out eval at step 250: accuracy 0.625, format 1.000 (8 records)\n"


def test_make_help_lists_every_target():
    root = os.path.join(os.path.dirname(__file__), "..")
    out = subprocess.run(["make", "-s", "-C", root, "help"], capture_output=True, text=True,
                         timeout=60)
    phony = next(line for line in open(os.path.join(root, "Makefile")) if line.startswith(".PHONY"))
    listed = {line.split()[1] for line in out.stdout.splitlines() if line.startswith("  make ")}
    assert listed == set(phony.split(":")[1].split()), out.stderr
