"""`grpo eval`'s modes end to end on the tiny model: pass@k, --counterfactual, --compare (two runs
and two result files, on the same items), --over-time (every checkpoint of a 2-step run)."""

import json
import os

import pytest

from grpo_app.cli import main

BASE = [
    "data.eval_size=6",
    "data.train_size=8",
    "data.prompt=nothink",
    "rollout.max_new_tokens=3",
    "run.progress=false",
]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A 2-step GRPO run that keeps every checkpoint (ckpt-1, ckpt-2) and a start model."""
    d = tmp_path_factory.mktemp("run")
    args = [
        "train",
        "--config",
        "examples/configs/synthetic_grpo_instruct.yaml",
        f"model.path={d}/tiny",
        f"run.output_dir={d}/run",
        "run.steps=2",
        "run.save_every=1",
        "run.keep_last=0",
        "run.eval_every=0",
        "run.progress=false",
        "warmup.steps=1",
        "data.train_size=8",
        "data.eval_size=6",
        "rollout.prompts_per_step=2",
        "rollout.group_size=2",
        "rollout.max_new_tokens=3",
        "optim.lr=3e-3",
    ]
    assert main(args) == 0
    return d


def test_eval_prints_intervals_and_pass_at_k(tiny_vlm_path, tmp_path, capsys):
    out = tmp_path / "e.json"
    assert (
        main(
            [
                "eval",
                f"model.path={tiny_vlm_path}",
                *BASE,
                "--samples",
                "2",
                "--out",
                str(out),
                "--show",
                "0",
            ]
        )
        == 0
    )
    text = capsys.readouterr().out
    assert "95 % CI" in text and "pass@2" in text
    data = json.load(open(out))
    assert (
        data["samples"] == 2
        and set(data["pass_at_k"]) == {"1", "2"}
        and len(data["accuracy_ci"]) == 2
    )


def test_eval_counterfactual(tiny_vlm_path, tmp_path, capsys):
    out = tmp_path / "cf.json"
    assert (
        main(
            [
                "eval",
                f"model.path={tiny_vlm_path}",
                *BASE,
                "--counterfactual",
                "--no-image",
                "--out",
                str(out),
                "--show",
                "0",
            ]
        )
        == 0
    )
    text = capsys.readouterr().out
    assert all(k in text for k in ("blank", "swapped", "none", "reliance"))
    data = json.load(open(out))
    assert set(data["variants"]) == {"image", "blank", "swapped", "none"} and set(
        data["reliance"]
    ) == {"blank", "swapped", "none"}


def test_compare_runs_and_result_files_on_the_same_items(tiny_run, tiny_vlm_path, tmp_path, capsys):
    run = str(tiny_run / "run")
    out = tmp_path / "cmp.json"
    assert (
        main(["eval", "--compare", run, run, "--out", str(out), *BASE]) == 0
    )  # a run against itself
    t = json.load(open(out))
    assert (
        t["difference"] == 0.0
        and t["p_value"] == 1.0
        and t["n"] == 6
        and t["test"] == "mcnemar_exact"
    )
    assert "A − B = +0.0 points" in capsys.readouterr().out
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    assert main(["eval", f"model.path={tiny_vlm_path}", *BASE, "--out", str(a), "--show", "0"]) == 0
    assert main(["eval", f"model.path={tiny_vlm_path}", *BASE, "--out", str(b), "--show", "0"]) == 0
    items = json.load(open(b))
    for it in items["items"][:2]:
        it["accuracy"] = 1.0 - it["accuracy"]  # B differs on two items (the model is wrong on all)
    json.dump(items, open(b, "w"))
    capsys.readouterr()
    assert main(["eval", "--compare", str(a), str(b), "--out", str(out)]) == 0
    t = json.load(open(out))
    assert t["a_only"] + t["b_only"] == 2
    if t["a_only"] in (0, 2):  # both discordant one way: p = 2 · P(X ≤ 0 | n = 2, ½) = 0.5
        assert t["p_value"] == pytest.approx(0.5)
    else:
        assert t["p_value"] == 1.0
    short = tmp_path / "short.json"
    items["items"] = items["items"][:3]
    json.dump(items, open(short, "w"))
    assert main(["eval", "--compare", str(a), str(short)]) == 2
    assert "different items" in capsys.readouterr().err


def test_over_time_scores_every_checkpoint_on_the_same_items(tiny_run, capsys):
    run = str(tiny_run / "run")
    assert main(["eval", "--over-time", run, *BASE]) == 0  # the run's own config (run_config.json)
    pts = json.load(open(os.path.join(run, "eval_over_time.json")))
    assert [p["step"] for p in pts] == [0, 1, 2] and {p["n"] for p in pts} == {6}
    assert all(p["ci"][0] <= p["accuracy"] <= p["ci"][1] for p in pts)
    assert os.path.exists(os.path.join(run, "eval_over_time.md"))
    assert os.path.getsize(os.path.join(run, "eval_over_time.png")) > 1000
    cfg = ["--config", "examples/configs/synthetic_grpo_instruct.yaml"]
    # a config whose model.path is not the run's start (a study cell): the start is still the
    # run's own (its checkpoints' recorded model.path)
    assert main(["eval", "--over-time", run, *cfg, "model.path=/nonexistent", *BASE]) == 0
    again = json.load(open(os.path.join(run, "eval_over_time.json")))
    assert [p["step"] for p in again] == [0, 1, 2] and again[0]["path"] == pts[0]["path"]
    assert main(["eval", "--over-time", str(tiny_run), *cfg, *BASE]) == 2  # no checkpoints there
    assert "holds no checkpoint" in capsys.readouterr().err
    assert main(["eval", "--over-time", str(tiny_run), *BASE]) == 2  # and no run config either
    assert "pass the run's --config" in capsys.readouterr().err


def test_training_evals_report_pass_at_k_with_run_eval_samples(tiny_vlm_path, tiny_vlm_policy):
    from grpo_app.commands import make_eval_fn
    from grpo_core.config import load_config
    from grpo_core.data import build_records

    cfg = load_config(
        None, [f"model.path={tiny_vlm_path}", *BASE, "run.eval_samples=4", "run.eval_limit=3"]
    )
    held = build_records(cfg.data, 0)[1]
    m = make_eval_fn(cfg, held)(tiny_vlm_policy)
    assert set(m) == {"accuracy", "format_rate", "pass@1", "pass@2", "pass@4"}
    assert m["pass@1"] <= m["pass@2"] <= m["pass@4"]
    cfg.run.eval_samples = 0
    assert set(make_eval_fn(cfg, held)(tiny_vlm_policy)) == {"accuracy", "format_rate"}
