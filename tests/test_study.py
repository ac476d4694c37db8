"""`grpo study`: grids, the table's numbers by hand, and a tiny grid end to end that resumes."""

import json
import math
import os

import pytest

from grpo_app import study
from grpo_app.study_table import markdown, mean_sd, summarize


def test_built_in_grids_name_the_seven_settings_and_real_files():
    for name in study.GRIDS:
        grid = study.load_grid(name)
        assert list(grid) == ["grpo_instruct", "grpo_base", "semantic", "ecr", "cwr", "drgrpo", "sft"]
        assert all(os.path.exists(p) for _, p in grid.values())
        assert grid["sft"][0] == "sft" and {c for s, (c, _) in grid.items() if s != "sft"} == {"train"}
    assert list(study.load_grid("synthetic", only=["ecr", "sft"])) == ["ecr", "sft"]
    with pytest.raises(ValueError, match="not settings of this grid"):
        study.load_grid("synthetic", only=["ecr", "nope"])


def test_a_grid_file_is_checked(tmp_path):
    good = tmp_path / "g.yaml"
    good.write_text("settings:\n  mine: {command: sft, config: synthetic_sft.yaml}\n")
    assert study.load_grid(str(good))["mine"][0] == "sft"
    bad = tmp_path / "b.yaml"
    bad.write_text("settings:\n  mine: {command: rl, config: synthetic_sft.yaml}\n")
    with pytest.raises(ValueError, match="setting 'mine'"):
        study.load_grid(str(bad))


def test_mean_sd_by_hand():
    r = mean_sd([0.5, 0.7])
    assert r["mean"] == pytest.approx(0.6) and r["sd"] == pytest.approx(math.sqrt(0.02))
    assert mean_sd([0.3])["sd"] == 0.0


def _cell(setting, seed, acc, ct=0.5):
    by = {"CT": {"accuracy": ct, "n": 2}, "MR": {"accuracy": 1 - ct, "n": 2}}
    return {"setting": setting, "seed": seed, "steps": 5, "seconds": 60.0,
            "eval": {"accuracy": acc, "format_rate": 1.0, "mean_completion_tokens": 10.0, "mean_reasoning_words": 5.0,
                     "by_modality": by, "by_question_type": {"quadrant": {"accuracy": acc, "n": 4}}}}


def test_summary_and_table_by_hand(tmp_path):
    starts = {}
    for s in (0, 1):
        p = tmp_path / f"start{s}.json"
        p.write_text(json.dumps({"accuracy": 0.25, "format_rate": 1.0, "mean_completion_tokens": 9.0,
                                 "mean_reasoning_words": 5.0}))
        starts[s] = str(p)
    grid = {"grpo_instruct": ("train", "a.yaml"), "sft": ("sft", "b.yaml")}
    cells = [_cell("grpo_instruct", 0, 0.5), _cell("grpo_instruct", 1, 0.7), _cell("sft", 0, 0.9), _cell("sft", 1, 0.9)]
    s = summarize(grid, (0, 1), cells, starts)
    g = s["settings"][0]
    assert g["accuracy"]["mean"] == pytest.approx(0.6) and g["delta_accuracy"]["mean"] == pytest.approx(0.35)
    assert set(g["by_modality"]) == {"CT", "MR"} and g["by_question_type"] == {}   # one question type: no column
    s["grid"] = "synthetic"
    md = markdown(s)
    assert "| grpo_instruct | 60.0 ± 14.1 | +35.0 ± 14.1 |" in md and "| 58.0 |" in md
    assert "| start (format-warmed model) | 25.0 |" in md and "by modality" in md


def test_tiny_grid_end_to_end_then_resumes(tmp_path, tiny_vlm_path, monkeypatch):
    """Two settings × one seed, one step each, on the tiny model; a second call runs no cell."""
    over = ["data.train_size=16", "data.eval_size=4", "rollout.prompts_per_step=2", "rollout.group_size=2",
            "rollout.max_new_tokens=8", "warmup.steps=2", "warmup.batch_size=4", "sft.batch_size=2"]
    out = str(tmp_path / "study")
    s = study.run_study("synthetic", seeds=(0,), steps=1, out=out, only=["grpo_instruct", "sft"], overrides=over)
    assert [r["setting"] for r in s["settings"]] == ["grpo_instruct", "sft"]
    for f in ("study.md", "study.json", "study.png", "init/seed0/eval_start.json", "grpo_instruct/seed0/cell.json",
              "grpo_instruct/seed0/samples.html", "sft/seed0/eval_final.json"):
        assert os.path.exists(os.path.join(out, f)), f
    assert json.load(open(os.path.join(out, "grpo_instruct/seed0/cell.json")))["eval"]["n"] == 4

    def no_run(job):
        raise AssertionError(f"cell {job['setting']} ran again")
    monkeypatch.setattr(study, "run_cell", no_run)
    again = study.run_study("synthetic", seeds=(0,), steps=1, out=out, only=["grpo_instruct", "sft"], overrides=over)
    assert again["settings"][0]["accuracy"] == s["settings"][0]["accuracy"]
