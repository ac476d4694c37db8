"""The `grpo` command: every subcommand described, eval on a whole split, a resumed run plotted whole."""

import json
import os

import pytest

from grpo_app import commands
from grpo_app.cli import COMMANDS, build_parser, main
from grpo_core.config import load_config
from grpo_core.data import make_synthetic_vqa


def test_every_subcommand_has_a_description(capsys):
    ap = build_parser()
    sub = next(a for a in ap._actions if a.dest == "cmd")
    assert set(sub.choices) == set(COMMANDS) == {"train", "sft", "eval", "demo", "study",
                                                 "resume-plan", "plan"}
    for name, p in sub.choices.items():
        assert p.description and len(p.description) > 40, name
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for name, (line, _) in COMMANDS.items():
        assert name in out and line[:30] in out


def test_eval_scores_the_whole_split_or_the_held_out_slice(tmp_path, monkeypatch):
    from grpo_core.data import LoadReport, RecordList

    records = make_synthetic_vqa(30, seed=0)

    def fake_load(*a, limit=None, **k):             # the loader's own limit, as load_dataset applies it
        out = RecordList(records[:limit] if limit else records)
        out.report = LoadReport(loaded=len(out))
        return out
    monkeypatch.setattr("grpo_core.data.load_dataset", fake_load)
    monkeypatch.setattr("grpo_core.data.sources.load_dataset", fake_load)
    cfg = load_config(None, [f"data.source={tmp_path}", "data.eval_size=5", "run.eval_limit=3"])
    assert len(commands.eval_records(cfg, whole=True)) == 30                 # every record of the split
    held = commands.eval_records(cfg, whole=False)
    assert len(held) == 5 and {r.id for r in held} <= {r.id for r in records}
    cfg.data.limit = 12
    assert len(commands.eval_records(cfg, whole=True)) == 12                 # data.limit still applies


def test_grpo_eval_writes_json_and_a_samples_page(tiny_vlm_path, tmp_path, capsys):
    out = tmp_path / "ev" / "eval.json"
    rc = main(["eval", f"model.path={tiny_vlm_path}", "data.eval_size=3", "data.train_size=4", "data.prompt=direct",
               "rollout.max_new_tokens=2", "run.progress=false", "--out", str(out), "--show", "2"])
    assert rc == 0
    assert json.load(open(out))["n"] == 3
    rows = [json.loads(x) for x in open(tmp_path / "ev" / "samples.jsonl")]
    assert len(rows) == 2 and rows[0]["split"] == "eval" and rows[0]["images"][0].startswith("samples/")
    assert "accuracy" in capsys.readouterr().out


def test_a_bad_reporter_is_reported_before_anything_runs(capsys):
    assert main(["train", "run.report_to=[tensorbored]"]) == 2
    assert "run.report_to has 'tensorbored'" in capsys.readouterr().err


def test_resumed_run_is_plotted_and_logged_whole(tiny_vlm_path, tmp_path, monkeypatch):
    seen = {}
    monkeypatch.setattr("grpo_app.plotting.plot_history",
                        lambda h, path, **k: seen.setdefault("steps", [m["step"] for m in h]))
    over = [f"model.path={tiny_vlm_path}", "data.train_size=8", "data.eval_size=2", "rollout.prompts_per_step=2",
            "rollout.group_size=2", "rollout.max_new_tokens=4", "run.progress=false", f"run.output_dir={tmp_path}",
            "run.save_every=2", "data.prompt=direct", "grpo.beta=0.0", "run.log_completions=1",
            "run.log_completions_every=1", "grpo.rewards=[{name: accuracy, require_tag: false}]"]
    assert commands.cmd_train(load_config(None, over + ["run.steps=2"])) == 0
    seen.clear()
    from grpo_core.trainer import GRPOTrainer

    ran, real_step = [], GRPOTrainer.step
    monkeypatch.setattr(GRPOTrainer, "step", lambda self: ran.append(self.step_idx) or real_step(self))
    assert commands.cmd_train(load_config(None, over + ["run.steps=4"])) == 0   # resumes at step 2
    assert ran == [2, 3]                                                           # only the new steps ran
    assert seen["steps"] == [1, 2, 3, 4]
    steps = [json.loads(x)["step"] for x in open(tmp_path / "metrics.jsonl")]
    assert steps == [1, 2, 3, 4]
    logged = {json.loads(x)["step"] for x in open(tmp_path / "samples.jsonl")}
    assert {1, 2, 3, 4} <= logged and os.path.exists(tmp_path / "eval_final.json")


def test_train_refuses_to_mix_runs_and_fresh_starts_over(tmp_path, capsys):
    """A second `grpo train` with a changed fixed setting is one clear error (exit 2, no traceback);
    --fresh moves the earlier run aside and starts a new one."""
    from grpo_app.cli import main

    base = ["--config", "examples/configs/synthetic_grpo_instruct.yaml", f"model.path={tmp_path}/tiny",
            f"run.output_dir={tmp_path}/run", "run.steps=1", "run.save_every=1", "run.eval_every=0",
            "run.progress=false", "warmup.steps=1", "data.train_size=16", "data.eval_size=4",
            "rollout.prompts_per_step=2", "rollout.group_size=2", "rollout.max_new_tokens=4", "run.eval_limit=2"]
    assert main(["train", *base]) == 0
    capsys.readouterr()
    assert main(["train", *base, "run.steps=2", "rollout.group_size=3"]) == 2
    err = capsys.readouterr().err
    assert "grpo train: error:" in err and "rollout.group_size" in err and "Traceback" not in err
    assert main(["train", "--fresh", *base, "rollout.group_size=3"]) == 0
    assert any(d.startswith("previous-run") for d in os.listdir(tmp_path / "run"))
