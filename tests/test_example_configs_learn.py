"""Every synthetic example config runs as its header says and learns: the format warm-up they share
makes a random tiny model answer in format, and from there each GRPO setting gets non-zero rewards,
a non-zero gradient and a changed policy (a few steps each; the study measures how far they go)."""

import glob
import json
import os
import shutil

import pytest
import torch
from helpers import VARIANT_CONFIGS

from grpo_core.config import load_config

CONFIG_DIR = os.path.join(os.path.dirname(__file__), "..", "examples", "configs")
SETTINGS = ("grpo_instruct", "grpo_base", "semantic", "ecr", "cwr", "drgrpo")
VARIANTS = VARIANT_CONFIGS                  # prompt "nothink": their own warm-up start (warmed_nothink)
FAST = ["data.train_size=32", "data.eval_size=8", "run.eval_limit=8", "rollout.prompts_per_step=4",
        "run.progress=false", "run.resume=false"]


def _cfg(name, *over):
    return load_config(os.path.join(CONFIG_DIR, f"synthetic_{name}.yaml"), FAST + list(over))


def test_the_synthetic_settings_share_data_prompt_and_warmup():
    """What `grpo study` needs to give every setting one start model per seed."""
    cfgs = {n: _cfg(n) for n in SETTINGS}
    for n, c in cfgs.items():
        assert c.warmup.steps > 0 and c.data.prompt == "think", n
        assert (c.data, c.warmup) == (cfgs["grpo_instruct"].data, cfgs["grpo_instruct"].warmup), n
    assert cfgs["grpo_base"].model.template == "plain" and cfgs["grpo_instruct"].model.template == "chat"
    assert len(glob.glob(os.path.join(CONFIG_DIR, "synthetic_*.yaml"))) >= len(SETTINGS) + 1


def test_every_synthetic_grpo_config_asks_for_the_warmup():
    """A synthetic config without it sits at reward 0 and gradient 0 (the issue this test guards)."""
    names = [os.path.basename(p)[len("synthetic_"):-len(".yaml")]
             for p in glob.glob(os.path.join(CONFIG_DIR, "synthetic_*.yaml"))]
    assert set(SETTINGS) | set(VARIANTS) | {"custom_reward"} == set(names) - {"sft"}
    for n in set(names) - {"sft"}:
        c = _cfg(n)
        assert c.warmup.steps > 0 and c.run.eval_every > 0, n


def _warm(name, model_path, out):
    """The config's own warm-up (fewer steps) on the tiny model, saved at ``out``; held-out evals
    before and after it."""
    from grpo_app.factory import load_policy
    from grpo_app.warmup import format_warmup
    from grpo_core.data import build_records
    from grpo_core.eval import evaluate

    cfg = _cfg(name, f"model.path={model_path}", "model.tiny=false", "warmup.steps=40")
    torch.manual_seed(0)
    policy = load_policy(cfg.model, seed=0)
    train, held = build_records(cfg.data, 0)
    n = cfg.rollout.max_new_tokens
    before = evaluate(policy, held, template=cfg.data.prompt, max_new_tokens=n, progress=False)
    format_warmup(policy, train, cfg)
    after = evaluate(policy, held, template=cfg.data.prompt, max_new_tokens=n, progress=False)
    policy.save_pretrained(out)
    return out, before, after


@pytest.fixture(scope="module")
def warmed(tiny_vlm_path, tmp_path_factory):
    return _warm("grpo_instruct", tiny_vlm_path, str(tmp_path_factory.mktemp("warmed") / "policy"))


@pytest.fixture(scope="module")
def warmed_nothink(tiny_vlm_path, tmp_path_factory):
    return _warm("gspo", tiny_vlm_path, str(tmp_path_factory.mktemp("warmed_nothink") / "policy"))


def test_the_warmup_teaches_the_format_not_the_answer(warmed):
    _, before, after = warmed
    assert before.format_rate == 0.0                 # a random model never writes the format: reward 0
    assert after.format_rate >= 0.75, after.items[0]["completion"]
    assert "<think>" in after.items[0]["completion"]


def test_the_nothink_warmup_teaches_its_format(warmed_nothink):
    _, before, after = warmed_nothink
    assert before.format_rate == 0.0 and after.format_rate >= 0.75, after.items[0]["completion"]


def _weights(path):
    from safetensors.torch import load_file

    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    out = {}
    for f in files:
        out.update(load_file(f))
    return out


@pytest.mark.parametrize("name", SETTINGS + ("custom_reward",) + VARIANTS)
def test_each_grpo_setting_gets_rewards_and_changes_the_policy(name, request, tmp_path, tiny_text_lm_path):
    from grpo_app.commands import cmd_train

    start, _, _ = request.getfixturevalue("warmed_nothink" if name in VARIANTS else "warmed")
    cfg = _cfg(name, f"model.path={start}", "model.tiny=false", "warmup.steps=0", "run.steps=2",
               f"run.output_dir={tmp_path}", "run.eval_every=0")
    for entry in cfg.grpo.rewards:                  # the judge: the session's tiny text LM (trained: grpo_app.judge)
        if entry["name"] == "semantic_judge":
            entry["model_path"] = tiny_text_lm_path
    assert cmd_train(cfg) == 0
    steps = [json.loads(x) for x in open(tmp_path / "metrics.jsonl")]
    assert len(steps) == 2
    assert all(m["reward"] > 0 for m in steps), [m["reward"] for m in steps]
    assert all(m["format_rate"] > 0 for m in steps)
    assert any(m["grad_norm"] > 0 for m in steps)   # some group had a reward spread: a real update
    before, after = _weights(start), _weights(str(tmp_path / "ckpt-000002" / "policy"))
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert os.path.exists(tmp_path / "samples.html") and os.path.exists(tmp_path / "eval_final.json")


def test_the_sft_setting_trains_on_gold_reasoning(warmed, tmp_path):
    from grpo_app.commands import cmd_sft

    start, _, _ = warmed
    cfg = load_config(os.path.join(CONFIG_DIR, "synthetic_sft.yaml"),
                      FAST + [f"model.path={start}", "model.tiny=false", "sft.steps=2", f"run.output_dir={tmp_path}"])
    assert cfg.sft.target == "reasoning" and cfg.sft.batch_size == 8
    assert cmd_sft(cfg) == 0
    before, after = _weights(start), _weights(str(tmp_path / "policy"))
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert json.load(open(tmp_path / "eval_final.json"))["n"] == 8
    shutil.rmtree(tmp_path / "policy")
