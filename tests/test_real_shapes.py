"""The real Qwen2-VL-2B architecture on CPU: a complete GRPO step at the published widths.

Random weights built locally (grpo_models.shapes.hf_config: the published config's widths, heads,
kv heads, vocabulary 151,936, vision tower 1280 × 32 with its merger), the tiny offline tokenizer
for the ids. Two runs, each one ``GRPOTrainer.step`` (rollout with the shared prefix decode,
reference log-probs, fused loss over the full vocabulary, backward, AdamW):
  - full fine-tuning at reduced depth (2 layers, 1 vision block; reference = a frozen copy), in
    bf16 as on a GPU;
  - LoRA at full depth (28 decoder layers, 32 vision blocks; reference = adapters off), in fp32:
    this CPU's bf16 matmuls run ~4× slower than fp32 (no bf16 units), which would make this run
    ~20 min; the dtype paths are covered by the bf16 run above.
Small shapes elsewhere (one 56×56 image per prompt, B = 2, G = 2, 4 new tokens) keep it to a
few minutes and ≤ ~10 GB of RAM, so shape, dtype and memory bugs at real widths show up in CI.
"""

from __future__ import annotations

import math

import pytest
import torch

pytestmark = pytest.mark.slow


def _step(tok_dir, layers=None, vision_depth=None, lora=0, dtype=torch.bfloat16):
    from grpo_models.policy_utils import apply_lora
    from grpo_models.qwen2_vl import Qwen2VLPolicy
    from grpo_models.shapes import hf_config
    from transformers import AutoModelForImageTextToText, AutoTokenizer, Qwen2VLImageProcessorPil

    from grpo_core.config import TrainConfig
    from grpo_core.data import make_synthetic_vqa
    from grpo_core.rewards import RewardSpec
    from grpo_core.trainer import GRPOTrainer

    tok = AutoTokenizer.from_pretrained(tok_dir)
    config = hf_config("qwen2-vl-2b", tok, layers, vision_depth)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForImageTextToText.from_config(
            config, dtype=dtype, attn_implementation="sdpa"
        )
    if lora:
        model = apply_lora(model, {"r": lora, "lora_alpha": 2 * lora})
    proc = Qwen2VLImageProcessorPil(
        min_pixels=56 * 56, max_pixels=56 * 56, patch_size=14, temporal_patch_size=2, merge_size=2
    )
    policy = Qwen2VLPolicy(model, tok, proc)
    cfg = TrainConfig()
    cfg.rollout.group_size, cfg.rollout.prompts_per_step, cfg.rollout.max_new_tokens = 2, 2, 4
    cfg.grpo.beta, cfg.grpo.backend, cfg.model.lora_rank = 0.04, "torch", lora
    cfg.optim.lr = 1e-3
    cfg.model.dtype = "bfloat16" if dtype == torch.bfloat16 else "float32"   # the compute dtype
    cfg.run.progress, cfg.run.resume, cfg.run.output_dir = False, False, str(tok_dir) + "-run"
    flip = [0.0]

    def alternating(completions, records):  # unequal rewards in each group: a real gradient
        flip[0] = 1 - flip[0]
        return [float((i + flip[0]) % 2) for i in range(len(completions))]

    tr = GRPOTrainer(
        policy,
        make_synthetic_vqa(4, seed=0, image_size=56),
        cfg.validate(),
        reward_specs=[RewardSpec("alt", alternating, 1.0, "accuracy")],
    )
    trained = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    m = tr.step()
    return model, trained, m, policy


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    from grpo_models.tiny import build_tiny_tokenizer

    path = tmp_path_factory.mktemp("tok2b")
    build_tiny_tokenizer(str(path))
    return path


def _check(model, before, m, policy, dtype=torch.bfloat16):
    assert policy.vocab_size == 151936 and policy.lm_head_weight.shape == (151936, 1536)
    assert m["nonfinite_steps"] == 0 and math.isfinite(m["loss"]) and m["grad_norm"] > 0
    moved = [
        n for n, p in model.named_parameters() if n in before and not torch.equal(p, before[n])
    ]
    assert moved, "no trainable weight changed"
    for n, p in model.named_parameters():  # bf16 compute; trained weights may be fp32 masters
        want = (dtype, torch.float32) if n in before else (dtype,)
        assert p.dtype in want and bool(torch.isfinite(p).all()), n


def test_qwen2_vl_2b_full_finetune_reduced_depth(tok_dir):
    model, before, m, policy = _step(tok_dir, layers=2, vision_depth=1)
    assert len(before) == len(list(model.parameters()))  # everything trains, vision too
    _check(model, before, m, policy)
    assert m["kl"] == pytest.approx(0.0, abs=1e-6)  # frozen copy = the policy at step 1


def test_qwen2_vl_2b_lora_full_depth(tok_dir):
    model, before, m, policy = _step(tok_dir, lora=8, dtype=torch.float32)
    assert len(policy._lm.layers) == 28 and len(policy._core.visual.blocks) == 32
    assert all("lora_" in n for n in before)
    _check(model, before, m, policy, torch.float32)
