"""Every GRPO-variant example config through the real trainer: a few steps on the tiny Qwen2-VL.

The loss math of each variant is tested in test_loss_variants*.py; here the trainer's wiring is:
the config keys reach the fused loss (GSPO, CISPO, SAPO, delta, entropy, top-entropy tokens, KL
bias correction), the advantages (RLOO), the batch (DAPO dynamic sampling, truncated-completion
masking) and the reference (sync). A toy reward with spread within each group is added to the
config's own rewards, so that a random model gets non-zero advantages and every path does work.
"""

import os

import pytest
import torch
from helpers import VARIANT_CONFIGS, tiny_policy

from grpo_core.config import load_config
from grpo_core.data import make_synthetic_vqa
from grpo_core.rewards import RewardSpec
from grpo_core.trainer import GRPOTrainer, rewards_from_config

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "examples", "configs")
VARIANTS = list(VARIANT_CONFIGS)


def length_parity_reward(completions, records):
    """1 for an even number of characters: varies within a group whatever the model writes."""
    return [float(len(c) % 2 == 0) for c in completions]


def _run(path, variant, tmp_path, steps=2, **over):
    cfg = load_config(os.path.join(CONFIGS, f"synthetic_{variant}.yaml"), [
        "rollout.group_size=4", "rollout.prompts_per_step=2", "rollout.max_new_tokens=6",
        f"run.steps={steps}", f"run.output_dir={tmp_path}", "run.progress=false", "run.resume=false",
        *(f"{k}={v}" for k, v in over.items())])
    specs = rewards_from_config(cfg.grpo.rewards) + [RewardSpec("parity", length_parity_reward, 1.0)]
    tr = GRPOTrainer(tiny_policy(path), make_synthetic_vqa(16, seed=2), cfg, reward_specs=specs)
    before = {k: v.clone() for k, v in tr.policy.model.state_dict().items()}
    hist = tr.train()
    moved = any(not torch.equal(before[k], v) for k, v in tr.policy.model.state_dict().items())
    return tr, hist, moved


@pytest.mark.parametrize("variant", VARIANTS)
def test_variant_config_trains(tiny_vlm_path, tmp_path, variant):
    tr, hist, moved = _run(tiny_vlm_path, variant, tmp_path)
    assert len(hist) == 2 and all(torch.isfinite(torch.tensor(m["loss"])) for m in hist)
    if variant != "dapo_overlong_filter":             # there every completion may hit max_new_tokens: no loss
        assert moved, f"{variant}: the policy did not change"
    m = hist[-1]
    if variant == "dapo":
        assert m["dynamic_sampling/rounds"] >= 1 and m["dynamic_sampling/prompts_drawn"] >= 2
        assert m["reward/overlong"] <= 0.0
    if variant == "high_entropy":
        assert 0.0 < m["entropy_kept_frac"] <= 1.0


def test_truncated_completions_leave_the_loss(tiny_vlm_path, tmp_path):
    """mask_truncated_completions: with a budget every completion hits, nothing is trained on."""
    _, hist, moved = _run(tiny_vlm_path, "dapo_overlong_filter", tmp_path, **{"rollout.max_new_tokens": 1})
    assert all(m["truncated_frac"] == 1.0 for m in hist)
    assert not moved and all(m["loss"] == 0.0 for m in hist)


def test_dynamic_sampling_refills_until_groups_differ(tiny_vlm_path, tmp_path):
    """A reward that is constant in every group leaves nothing to keep: the step draws
    dynamic_sampling_max_rounds batches, keeps no group, and says how short it came."""
    cfg = load_config(os.path.join(CONFIGS, "synthetic_dapo.yaml"), [
        "rollout.group_size=4", "rollout.prompts_per_step=2", "rollout.max_new_tokens=4", "run.steps=1",
        f"run.output_dir={tmp_path}", "run.progress=false", "run.resume=false", "grpo.dynamic_sampling_max_rounds=3"])
    flat = [RewardSpec("flat", lambda c, r: [1.0] * len(c), 1.0)]
    tr = GRPOTrainer(tiny_policy(tiny_vlm_path), make_synthetic_vqa(16, seed=2), cfg, reward_specs=flat)
    m = tr.step()
    assert m["dynamic_sampling/rounds"] == 3 and m["dynamic_sampling/prompts_drawn"] == 6
    assert m["dynamic_sampling/groups_kept"] == 0 and m["dynamic_sampling/short"] == 2
    assert tr.data_pos == 6                                  # the refills consumed prompts from the data


def test_reference_sync_moves_the_reference_toward_the_policy(tiny_vlm_path, tmp_path):
    tr, _, _ = _run(tiny_vlm_path, "ref_sync", tmp_path, steps=2, **{"grpo.ref_sync_steps": 2,
                                                                   "grpo.ref_sync_alpha": 1.0})
    pol, ref = tr.policy.model.state_dict(), tr.ref_policy.model.state_dict()
    assert all(torch.equal(pol[k], ref[k]) for k in pol)     # α = 1 after step 2: ref is the policy


def test_synced_reference_is_saved_and_restored(tiny_vlm_path, tmp_path):
    """With reference sync the reference is run state: a resume continues the synced reference."""
    tr, _, _ = _run(tiny_vlm_path, "ref_sync", tmp_path, steps=2, **{"grpo.ref_sync_steps": 1,
                                                                   "grpo.ref_sync_alpha": 0.5})
    tr.save()
    ref = {k: v.clone() for k, v in tr.ref_policy.model.state_dict().items()}
    cfg = tr.cfg
    fresh = GRPOTrainer(tiny_policy(tiny_vlm_path), make_synthetic_vqa(16, seed=2), cfg, reward_specs=tr.specs)
    init = fresh.ref_policy.model.state_dict()
    assert any(not torch.equal(init[k], ref[k]) for k in ref)          # the sync moved it away from the init
    fresh.resume(os.path.join(cfg.run.output_dir, "ckpt-000002"))
    got = fresh.ref_policy.model.state_dict()
    assert all(torch.equal(got[k], ref[k]) for k in ref)
