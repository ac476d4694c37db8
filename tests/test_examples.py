"""Every example config loads, validates, and names rewards that exist."""

import glob
import os

import pytest

from grpo_core.config import load_config
from grpo_core.rewards import check_reward_entries

CONFIGS = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "..", "examples", "configs", "*.yaml")))


def test_there_is_one_config_per_study_setting():
    names = {os.path.basename(p) for p in CONFIGS}
    for setting in ("grpo_instruct", "grpo_base", "grpo_semantic", "grpo_ecr", "grpo_cwr", "drgrpo", "sft"):
        assert f"pmc_vqa_{setting}.yaml" in names, setting
    for setting in ("grpo_instruct", "grpo_base", "semantic", "ecr", "cwr", "drgrpo", "sft"):
        assert f"synthetic_{setting}.yaml" in names, setting


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_config_loads(path, monkeypatch):
    monkeypatch.chdir(os.path.join(os.path.dirname(__file__), ".."))   # file-path rewards resolve from the root
    cfg = load_config(path)                                           # validates every field and reward entry
    check_reward_entries(cfg.grpo.rewards)


def test_toy_policy_example_learns_its_reward(tmp_path, monkeypatch):
    """examples/toy_policy.py: GRPO on a transformers-free policy raises its reward in a few steps."""
    from examples import toy_policy

    monkeypatch.chdir(tmp_path)                                   # it writes runs/toy_policy/
    hist = toy_policy.main(steps=10)
    assert hist[0]["reward"] < 0.5 < hist[-1]["reward"], [m["reward"] for m in hist]


def test_python_api_example_runs(tmp_path):
    """examples/train_python_api.py end to end with two GRPO steps (it learns at its default 1000)."""
    from examples import train_python_api

    acc = train_python_api.main(steps=2, out=str(tmp_path), warmup_steps=2, n_eval=8)
    assert 0.0 <= acc <= 1.0
