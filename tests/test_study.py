"""`grpo study`: grids, the table's numbers by hand, and a tiny grid end to end that resumes."""

import json
import math
import os

import pytest

from grpo_app import study
from grpo_app.study_table import markdown, mean_sd, summarize
from grpo_core.stats import mcnemar_exact


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


def _cell(setting, seed, acc, ct=0.5, scores=None):
    by = {"CT": {"accuracy": ct, "n": 2}, "MR": {"accuracy": 1 - ct, "n": 2}}
    c = {"setting": setting, "seed": seed, "steps": 5, "seconds": 60.0,
         "eval": {"accuracy": acc, "format_rate": 1.0, "mean_completion_tokens": 10.0,
                  "mean_reasoning_words": 5.0, "by_modality": by,
                  "by_question_type": {"quadrant": {"accuracy": acc, "n": 4}}}}
    if scores is not None:
        c["scores"] = {f"i{k}": float(v) for k, v in enumerate(scores)}
    return c


def test_summary_and_table_by_hand():
    start = {"eval": {"accuracy": 0.25, "format_rate": 1.0, "mean_completion_tokens": 9.0,
                      "mean_reasoning_words": 5.0}}
    grid = {"grpo_instruct": ("train", "a.yaml"), "sft": ("sft", "b.yaml")}
    cells = [_cell("grpo_instruct", 0, 0.5), _cell("grpo_instruct", 1, 0.7), _cell("sft", 0, 0.9), _cell("sft", 1, 0.9)]
    s = summarize(grid, (0, 1), cells, {0: start, 1: start})
    g = s["settings"][0]
    assert g["accuracy"]["mean"] == pytest.approx(0.6) and g["delta_accuracy"]["mean"] == pytest.approx(0.35)
    assert set(g["by_modality"]) == {"CT", "MR"} and g["by_question_type"] == {}   # one question type: no column
    s["grid"] = "synthetic"
    md = markdown(s)
    assert "| grpo_instruct | 60.0 | 14.1 (2) | +35.0 |" in md and "| 58.0 |" in md
    assert "| start (format-warmed model) | 25.0 |" in md and "by modality" in md


def test_intervals_deltas_reliance_and_orderings_are_paired_on_items():
    """Per seed, 20 items. GRPO right on items 0–13, SFT on 0–5, the start on 0–4: GRPO − SFT is
    +40 points on every seed (McNemar: 8 vs 0 discordant per seed), Δ vs start +45."""
    n = 20
    grpo, sft, st = [k < 14 for k in range(n)], [k < 6 for k in range(n)], [k < 5 for k in range(n)]
    ids = {f"i{k}": float(v) for k, v in enumerate(st)}
    start = {"eval": {"accuracy": 0.25, "format_rate": 1.0, "mean_completion_tokens": 9.0,
                      "mean_reasoning_words": 5.0}, "scores": ids,
             "cf_scores": {"image": ids, "blank": ids, "swapped": ids}}
    cells = []
    for seed in (0, 1, 2):
        g = _cell("grpo_instruct", seed, 0.7, scores=grpo)
        blind = {f"i{k}": float(k < 5) for k in range(n)}
        g["cf_scores"] = {"image": g["scores"], "blank": blind, "swapped": blind}
        cells += [g, _cell("sft", seed, 0.3, scores=sft)]
    grid = {"grpo_instruct": ("train", "a.yaml"), "sft": ("sft", "b.yaml")}
    s = summarize(grid, (0, 1, 2), cells, {k: start for k in (0, 1, 2)})
    g = s["settings"][0]
    assert g["accuracy_ci"]["mean"] == pytest.approx(0.7) and g["accuracy_ci"]["n_items"] == 60
    lo, hi = g["accuracy_ci"]["ci"]
    assert 0.45 < lo < 0.7 < hi < 0.9
    assert g["delta_ci"]["mean"] == pytest.approx(0.45) and g["delta_ci"]["ci"][0] > 0.2
    assert g["reliance"]["blank"]["mean"] == pytest.approx(0.45)
    assert g["reliance"]["swapped"]["ci"][0] > 0.2
    blind = s["start"]["reliance"]["blank"]
    assert blind["mean"] == 0.0 and blind["ci"] == [0.0, 0.0]
    (o,) = s["orderings"]
    assert o["claim"] == "grpo_instruct > sft" and o["difference"] == pytest.approx(0.4)
    assert o["verdict"] == "grpo_instruct > sft" and o["reproduced"] and o["ci"][0] > 0.15
    assert o["mcnemar_p"] == pytest.approx(mcnemar_exact(24, 0))
    md = markdown({**s, "grid": "synthetic"})
    assert "| grpo_instruct > sft | +40.0 [" in md and "**grpo_instruct > sft**" in md
    same = summarize(grid, (0, 1, 2), [dict(c, scores=cells[0]["scores"]) for c in cells], {})
    assert same["orderings"][0]["verdict"] == "not separated"
    assert same["orderings"][0]["mcnemar_p"] == 1.0


def test_seeds_then_overrides_parse():
    got = study.split_seeds(["0", "1", "run.steps=3", "data.x=1"])
    assert got == ([0, 1], ["run.steps=3", "data.x=1"])
    with pytest.raises(ValueError, match="--seeds takes integers"):
        study.split_seeds(["0", "one"])
    from grpo_app.cli import build_parser
    args = build_parser().parse_args(["study", "--seeds", "0", "optim.lr=1e-3"])
    assert study.split_seeds(args.seeds) == ([0], ["optim.lr=1e-3"])


def test_the_synthetic_judge_lives_inside_out(tmp_path):
    cfg = study.cell_config("train", study.config_path("synthetic_semantic.yaml"), 0,
                            str(tmp_path / "c"), 3, [], None, None, 50, str(tmp_path / "study"))
    (judge,) = [e for e in cfg.grpo.rewards if e["name"] == "semantic_judge"]
    assert judge["model_path"] == str(tmp_path / "study" / "judge")


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

    start = json.load(open(os.path.join(out, "init/seed0/start.json")))
    cell = json.load(open(os.path.join(out, "grpo_instruct/seed0/cell.json")))
    assert set(cell["scores"]) == set(start["scores"]) == set(cell["cf_scores"]["swapped"])
    assert set(s["settings"][0]["reliance"]) == {"blank", "swapped"}
    assert s["orderings"][0]["claim"] == "grpo_instruct > sft"

    def no_run(job):
        raise AssertionError(f"cell {job['setting']} ran again")
    monkeypatch.setattr(study, "run_cell", no_run)
    again = study.run_study("synthetic", seeds=(0,), steps=1, out=out, only=["grpo_instruct", "sft"], overrides=over)
    assert again["settings"][0]["accuracy"] == s["settings"][0]["accuracy"]
    # --only one setting: the table keeps every finished cell of the grid
    one = study.run_study("synthetic", seeds=(0,), steps=1, out=out, only=["sft"], overrides=over)
    assert [r["setting"] for r in one["settings"]] == ["grpo_instruct", "sft"]
    assert "| grpo_instruct |" in open(os.path.join(out, "study.md")).read()
    # another budget or other overrides: the finished cells are not silently reused
    with pytest.raises(ValueError, match="was run with steps=1.*asks steps=2"):
        study.run_study("synthetic", seeds=(0,), steps=2, out=out, only=["sft"], overrides=over)
    with pytest.raises(ValueError, match="overrides="):
        study.run_study("synthetic", seeds=(0,), steps=1, out=out, only=["sft"],
                        overrides=over + ["optim.lr=1e-3"])
    # --table-only: a seed with no start and no cell is neither prepared nor run, only reported
    monkeypatch.setattr(study, "_prepare", lambda task: (_ for _ in ()).throw(AssertionError(task)))
    table = study.run_study("synthetic", seeds=(0, 1), steps=1, out=out, only=["sft"],
                            overrides=over, table_only=True)
    assert [r["setting"] for r in table["settings"]] == ["grpo_instruct", "sft"]
    assert table["settings"][0]["accuracy"] == s["settings"][0]["accuracy"]


def test_cli_defaults_budget_items_and_workers(monkeypatch):
    from grpo_app.cli import build_parser

    seen = {}
    monkeypatch.setattr(study, "run_study", lambda *a, **k: seen.setdefault("args", a))
    args = build_parser().parse_args(["study"])
    study.run_study_cli(args)
    grid, seeds, steps, out, only, over, workers, threads, gpus, eval_size, _ = seen["args"]
    assert (grid, seeds, steps, eval_size) == ("synthetic", (0, 1, 2), 2000, 200)
    assert workers == study.default_workers(None) >= 1 and threads == 1
    assert study.default_workers("0,1,2") == 3
