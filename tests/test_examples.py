"""Every example config loads, validates, and names rewards that exist."""

import glob
import os

import pytest

from grpo_core.config import load_config
from grpo_core.rewards import REWARDS

CONFIGS = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "..", "examples", "configs", "*.yaml")))


def test_there_is_one_config_per_study_setting():
    names = {os.path.basename(p) for p in CONFIGS}
    for setting in ("grpo_instruct", "grpo_base", "grpo_semantic", "grpo_ecr", "grpo_cwr", "drgrpo", "sft"):
        assert f"pmc_vqa_{setting}.yaml" in names, setting
    for setting in ("grpo_instruct", "grpo_base", "semantic", "ecr", "cwr", "drgrpo", "sft"):
        assert f"synthetic_{setting}.yaml" in names, setting


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_config_loads(path):
    cfg = load_config(path)
    for entry in cfg.grpo.rewards:
        assert entry["name"] in REWARDS, entry
