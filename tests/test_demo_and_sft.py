"""The demo end to end in --quick mode, and the SFT baseline's loss on the tiny model."""

import json
import os

import pytest
import torch

from grpo_core.config import OptimConfig, SFTConfig, TrainConfig
from grpo_core.data import make_prompt_fn, make_synthetic_vqa
from grpo_core.sft import SFTTrainer, answer_target, random_answer, sft_loss, tokenize_targets


def test_quick_demo_writes_table_json_and_plot(tmp_path, capsys):
    from grpo_app.demo import run_demo

    assert run_demo(seed=0, out=str(tmp_path), quick=True) == 0
    out = capsys.readouterr().out
    for row in ("start (format warm-up)", "GRPO, images swapped", "GRPO, blank images",
                "SFT baseline", "visual reliance"):
        assert row in out
    res = json.load(open(tmp_path / "demo-seed0.json"))
    cf = res["counterfactual"]                 # the swapped control is grpo_core.counterfactual's
    grpo, swapped = res["GRPO"]["accuracy"], res["GRPO, images swapped"]["accuracy"]
    assert cf["reliance_swapped"] == pytest.approx(grpo - swapped)
    assert cf["image"] == grpo and cf["blank"] == res["GRPO, blank images"]["accuracy"]
    start = res["start (format warm-up)"]["accuracy"]
    assert res["curves"]["GRPO"][0][1] == start          # the curve on the table's items
    assert res["grpo_steps"] >= 1 and 0.0 <= res["GRPO"]["accuracy"] <= 1.0
    # the plot's three curves: held-out accuracy at the start and at the end of each training
    assert set(res["curves"]) == {"GRPO", "GRPO, images swapped", "SFT baseline (gold letters)"}
    for name, pts in res["curves"].items():
        assert len(pts) >= 2 and pts[0][0] == 0.0, name
    assert res["curves"]["GRPO"][-1][0] == pytest.approx(res["grpo_seconds"], abs=0.01)
    assert os.path.getsize(tmp_path / "demo-seed0.png") > 1000
    # the GRPO policy is saved for grpo eval, and scores there what the table says
    from grpo_app.demo import EVAL_ITEMS, demo_config
    from grpo_app.factory import load_policy
    from grpo_core.data import build_records
    from grpo_core.eval import evaluate

    cfg = demo_config(0, str(tmp_path), quick=True)
    cfg.model.path = res["grpo_policy"]
    _, held = build_records(cfg.data, 0)
    again = evaluate(load_policy(cfg.model, seed=0), held, template=cfg.data.prompt,
                     max_new_tokens=cfg.rollout.max_new_tokens, batch_size=50, progress=False)
    assert len(held) >= EVAL_ITEMS and again.accuracy == res["GRPO"]["accuracy"]


def test_timed_training_excludes_evals_from_the_budget_and_evaluates_on_schedule():
    from grpo_app import demo

    clock = {"t": 0.0}
    calls = []

    class Trainer:                                  # what the run harness drives
        step_idx, history, policy = 0, [], type("P", (), {"model": torch.nn.Linear(2, 2)})()

        def step(self):                             # each step costs 1 s of training time
            clock["t"] += 1.0
            self.step_idx += 1
            return {"step": self.step_idx, "loss": 0.0}

    def ev():
        calls.append(clock["t"])
        clock["t"] += 100.0                         # evals are slow: they must not count
        return 0.5

    real = demo.time.perf_counter
    demo.time.perf_counter = lambda: clock["t"]
    try:
        hist, spent = demo.timed_training(Trainer().step, 10.0, 10**6,
                                          {"e": {"fn": ev, "points": []}}, "t", progress=False)
    finally:
        demo.time.perf_counter = real
    assert len(hist) == 10 and spent == 10.0
    assert len(calls) == 1 + (demo.EVAL_POINTS - 1) + 1      # start, every budget/10 s before the end, the end


def test_sft_lowers_the_loss_on_gold_answers(tiny_vlm_path):
    from grpo_models.qwen2_vl import Qwen2VLPolicy

    torch.manual_seed(0)
    policy = Qwen2VLPolicy.from_pretrained(tiny_vlm_path, dtype=torch.float32, device="cpu")
    cfg = TrainConfig()
    cfg.data.prompt = "nothink"
    records = make_synthetic_vqa(8, seed=1)
    prompt_fn = make_prompt_fn(cfg.data.prompt)
    prompts, recs = prompt_fn(records)
    enc = policy.encode(prompts)
    ids, mask = tokenize_targets(policy, [answer_target(r, "nothink") for r in recs])
    assert policy.decode(ids[:1], mask[:1].long())[0].startswith("<answer>")
    with torch.no_grad():
        before = sft_loss(policy, enc, ids, mask).item()
    SFTTrainer(policy, records, SFTConfig(steps=6, batch_size=8, optim=OptimConfig(lr=3e-3)),
               prompt_fn, "nothink").train(progress=False)
    with torch.no_grad():
        after = sft_loss(policy, enc, ids, mask).item()
    assert after < before - 0.5, (before, after)


def test_random_answer_targets_cover_the_options():
    rec = make_synthetic_vqa(1, seed=0)[0]
    g = torch.Generator().manual_seed(0)
    seen = {random_answer(rec, [rec], g).answer_letter for _ in range(200)}
    assert seen == set(rec.options)
    assert answer_target(rec, "direct", letter="C") == "C"
    assert answer_target(rec, "nothink", letter="C") == "<answer>C</answer>"


def test_sft_writes_metrics_and_checkpoints_and_resumes_bit_identically(tiny_vlm_path, tmp_path):
    """SFT under the run harness: metrics.jsonl and checkpoints like GRPO, and a run stopped after
    step 2 and resumed reaches the weights of 4 steps in one go."""
    import json

    from grpo_models.qwen2_vl import Qwen2VLPolicy

    from grpo_core.checkpoint import list_checkpoints
    from grpo_core.config import RunConfig

    records = make_synthetic_vqa(8, seed=1)
    prompt_fn = make_prompt_fn("nothink")

    def run(out, steps):
        pol = Qwen2VLPolicy.from_pretrained(tiny_vlm_path, dtype=torch.float32, device="cpu")
        cfg = SFTConfig(steps=steps, batch_size=4, optim=OptimConfig(lr=3e-3))
        hist = SFTTrainer(pol, records, cfg, prompt_fn, "nothink").train(
            RunConfig(output_dir=str(out), save_every=2, progress=False), config={"sft": {"steps": steps}})
        return pol, hist

    whole, _ = run(tmp_path / "whole", 4)
    run(tmp_path / "parts", 2)
    parts, hist = run(tmp_path / "parts", 4)
    assert [m["step"] for m in hist] == [3, 4]
    assert all(torch.equal(a, b) for a, b in zip(whole.model.state_dict().values(),
                                                  parts.model.state_dict().values()))
    rows = [json.loads(x) for x in open(tmp_path / "parts" / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert [os.path.basename(p) for p in list_checkpoints(str(tmp_path / "parts"))] == ["ckpt-000002",
                                                                                           "ckpt-000004"]
