"""bf16 training keeps fp32 master weights: its updates are the fp32 run's up to bf16 compute error.

The failure this guards against (issue #22): AdamW over bf16 weights at lr 1e-6 moved 2.4 % of the
tiny model's weights (cosine 0.15 to the fp32 update), because a step of ~lr is a hundredth of a
bf16 weight's spacing. Each test replays one fixed batch through the trainer's own update from the
same start weights (a bf16 checkpoint, loaded as a user loads it) in ``model.dtype=float32`` and
``model.dtype=bfloat16``, and compares the weight deltas (bench/bench_precision.py holds the
pieces and prints the same numbers for every path).

Bounds, from bf16's unit roundoff u = 2⁻⁸: the deltas' cosine ≥ 1 − 4u and their relative error
≤ 32u (AdamW's first steps are ≈ lr·sign(g), so the gradient's bf16 error shows up only where a
gradient element is near 0, and that error is what these bounds admit); ≥ 99 % of the weights the
fp32 run moves must move. ``test_the_bounds_fail_for_bf16_weights`` shows the same bounds reject
the old behaviour.
"""

from __future__ import annotations

import pytest
import torch

from bench.bench_precision import compare, fixed_batch, grpo_delta, run, sft_delta, train_config

U_BF16 = 2.0 ** -8
STEPS = 6


def _assert_same_update(res: dict, what: str):
    assert res["moved_of_fp32"] >= 0.99, (
        f"{what}: only {res['moved_of_fp32']:.1%} of the fp32 run's moved weights moved")
    assert res["cos"] >= 1 - 4 * U_BF16, f"{what}: delta cosine {res['cos']:.4f} < {1 - 4 * U_BF16:.4f}"
    assert res["rel_err"] <= 32 * U_BF16, f"{what}: delta relative error {res['rel_err']:.3g} > {32 * U_BF16:.3g}"


# ---- the pieces ----------------------------------------------------------------------------------
def test_master_weights_upcast_trainable_only_and_keep_ties():
    from grpo_core.precision import master_weights_

    emb = torch.nn.Embedding(10, 4).to(torch.bfloat16)
    head = torch.nn.Linear(4, 10, bias=False).to(torch.bfloat16)
    head.weight = emb.weight                                        # tied, as Qwen2-VL-2B's lm_head
    frozen = torch.nn.Linear(4, 4).to(torch.bfloat16).requires_grad_(False)
    m = torch.nn.ModuleDict({"emb": emb, "head": head, "frozen": frozen})
    m.register_buffer("inv_freq", torch.ones(3, dtype=torch.bfloat16))
    before = emb.weight.detach().clone()
    assert master_weights_(m) == 1                                  # the shared weight, once
    assert emb.weight.dtype == torch.float32 and head.weight is emb.weight
    assert torch.equal(emb.weight.detach(), before.float())         # exact: every bf16 is an fp32
    assert frozen.weight.dtype == torch.bfloat16 and m.inv_freq.dtype == torch.bfloat16


def test_optimizer_refuses_16bit_trainable_weights():
    from grpo_core.optim import make_optimizer
    from grpo_core.precision import LowPrecisionTrainingError

    m = torch.nn.Linear(3, 3).to(torch.bfloat16)
    with pytest.raises(LowPrecisionTrainingError, match=r"(?s)2 trainable parameters.*bfloat16.*master_weights_"):
        make_optimizer(m, 1e-6, 0.0)
    m.requires_grad_(False)
    m.bias.requires_grad_(True)
    m.bias.data = m.bias.data.float()
    assert make_optimizer(m, 1e-6, 0.0)                             # frozen bf16 weights are fine


def test_fp16_training_is_refused_with_what_to_set(tiny_vlm_path):
    from helpers import tiny_policy

    from grpo_core.trainer import GRPOTrainer

    policy = tiny_policy(tiny_vlm_path)
    with pytest.raises(ValueError, match="model.dtype=float16 cannot train.*bfloat16"):
        GRPOTrainer(policy, fixed_batch(policy)[1], train_config("float16", 1e-6), reward_specs=[])


def test_the_bounds_fail_for_bf16_weights():
    """The plain tensor check of the issue: 10 AdamW steps at lr 1e-6 on 0.02-sized weights. Stored
    in bf16 almost none move and the delta is far from the fp32 one; the bounds above reject it."""
    g = torch.Generator().manual_seed(0)
    w0 = 0.02 * torch.randn(300, 300, generator=g)
    grads = [torch.randn(300, 300, generator=g) for _ in range(10)]

    def run_adamw(dtype):
        w = torch.nn.Parameter(w0.to(dtype).clone())
        opt = torch.optim.AdamW([w], lr=1e-6, weight_decay=0.0)
        for gr in grads:
            w.grad = gr.to(dtype)
            opt.step()
        return {"w": w.detach().float() - w0.to(dtype).float()}

    res = compare(run_adamw(torch.bfloat16), run_adamw(torch.float32))
    assert res["moved"] < 0.1
    with pytest.raises(AssertionError):
        _assert_same_update(res, "bf16 weights")


# ---- the training paths --------------------------------------------------------------------------
@pytest.mark.numerics          # bf16 kernels differ between CPUs: rerun under other kernel paths
@pytest.mark.parametrize("lr", [1e-6, 3e-4])
def test_grpo_update_in_bf16_equals_fp32(tiny_vlm_path, lr):
    res = compare(grpo_delta(tiny_vlm_path, "bfloat16", lr, STEPS), grpo_delta(tiny_vlm_path, "float32", lr, STEPS))
    assert res["fp32_moved"] > 0.99                 # the check is meaningful: fp32 moves (nearly) everything
    _assert_same_update(res, f"GRPO lr={lr}")


@pytest.mark.numerics          # bf16 kernels differ between CPUs: rerun under other kernel paths
@pytest.mark.parametrize("lr", [1e-6, 3e-4])
def test_lora_update_in_bf16_equals_fp32(tiny_vlm_path, lr):
    from grpo_app.factory import load_policy
    from grpo_core.config import ModelConfig
    from grpo_core.trainer import GRPOTrainer

    res = compare(grpo_delta(tiny_vlm_path, "bfloat16", lr, STEPS, lora=8),
                  grpo_delta(tiny_vlm_path, "float32", lr, STEPS, lora=8))
    _assert_same_update(res, f"LoRA lr={lr}")
    policy = load_policy(ModelConfig(path=tiny_vlm_path, dtype="bfloat16", device="cpu", lora_rank=8))
    GRPOTrainer(policy, fixed_batch(policy)[1], train_config("bfloat16", lr), reward_specs=[])
    dtypes = {p.dtype for p in policy.model.parameters() if p.requires_grad}
    frozen = {p.dtype for p in policy.model.parameters() if not p.requires_grad}
    assert dtypes == {torch.float32} and frozen == {torch.bfloat16}   # fp32 adapters over the bf16 base


@pytest.mark.numerics          # bf16 kernels differ between CPUs: rerun under other kernel paths
@pytest.mark.parametrize("lr", [1e-6, 3e-4])
def test_sft_update_in_bf16_equals_fp32(tiny_vlm_path, lr):
    res = compare(sft_delta(tiny_vlm_path, "bfloat16", lr, STEPS), sft_delta(tiny_vlm_path, "float32", lr, STEPS))
    _assert_same_update(res, f"SFT lr={lr}")


@pytest.mark.slow
def test_ddp_and_fsdp2_updates_in_bf16_equal_the_single_fp32_update():
    """2 ranks on gloo, each on its half of the batch, against one fp32 process on the whole batch
    (FSDP2: fp32 shards, bf16 all-gathered parameters, fp32 gradient reduce-scatter)."""
    res = run(["ddp", "fsdp2"], [1e-6], STEPS)
    assert set(res) == {"ddp lr=1e-06", "fsdp2 lr=1e-06"}
    for k, v in res.items():
        _assert_same_update(v, k)


def test_the_bf16_reference_computes_exactly_the_policy_it_was_copied_from(tiny_vlm_path):
    """Reference log-probs == the policy's at step 0, bit for bit (KL exactly 0): the reference keeps
    bf16 matmul weights and fp32 embeddings/norms, so autocast computes the same arithmetic."""
    from bench.bench_precision import load
    from grpo_core.trainer import GRPOTrainer

    policy = load(tiny_vlm_path, "bfloat16")
    cfg = train_config("bfloat16", 1e-6)
    cfg.grpo.beta = 0.04
    tr = GRPOTrainer(policy, fixed_batch(policy)[1], cfg.validate(), reward_specs=[])
    exp, _ = fixed_batch(policy)
    ref = tr.logprobs(exp.encoded, exp.completion_ids, exp.mask, "reference")
    cur = tr.logprobs(exp.encoded, exp.completion_ids, exp.mask)
    assert torch.equal(ref[exp.mask], cur[exp.mask])
    dtypes = {p.dtype for p in tr.ref_policy.model.parameters()}
    assert dtypes == {torch.bfloat16, torch.float32}          # matmul weights bf16, the rest fp32


# ---- a short run, resume and export --------------------------------------------------------------
def _length_reward(completions, records):
    """Longer is better: every group has spread, so every step has a gradient."""
    return [float(len(c)) / 40.0 for c in completions]


def _run_cfg(out, steps, dtype="bfloat16", lr=1e-6):
    cfg = train_config(dtype, lr)
    cfg.rollout.prompts_per_step, cfg.rollout.max_new_tokens = 2, 5
    cfg.run.steps, cfg.run.output_dir, cfg.run.save_every, cfg.run.keep_last = steps, str(out), 1, 5
    cfg.run.resume = True
    return cfg.validate()


def _trainer(path, cfg):
    from grpo_app.factory import load_policy
    from grpo_core.config import ModelConfig
    from grpo_core.rewards import RewardSpec
    from grpo_core.trainer import GRPOTrainer

    policy = load_policy(ModelConfig(path=path, dtype=cfg.model.dtype, device="cpu"))
    records = fixed_batch(policy)[1]
    return GRPOTrainer(policy, records, cfg, reward_specs=[RewardSpec("len", _length_reward, 1.0)])


def test_a_short_bf16_run_at_lr_1e6_moves_nearly_every_weight(tiny_vlm_path, tmp_path):
    from bench.bench_precision import delta, trainable

    tr = _trainer(tiny_vlm_path, _run_cfg(tmp_path, 3))
    w0 = trainable(tr.policy.model)
    tr.train()
    d = delta(w0, trainable(tr.policy.model))
    moved = sum(int((v != 0).sum()) for v in d.values()) / sum(v.numel() for v in d.values())
    assert moved > 0.95, f"only {moved:.1%} of the trainable weights moved in 3 bf16 steps at lr 1e-6"


def test_bf16_resume_is_bit_identical_and_export_is_bf16(tiny_vlm_path, tmp_path):
    import os
    import shutil

    from safetensors.torch import load_file

    full = _trainer(tiny_vlm_path, _run_cfg(tmp_path / "full", 2))
    full.train()
    os.makedirs(tmp_path / "resumed")
    shutil.copytree(tmp_path / "full" / "ckpt-000001", tmp_path / "resumed" / "ckpt-000001")
    resumed = _trainer(tiny_vlm_path, _run_cfg(tmp_path / "resumed", 2))
    resumed.train()
    assert resumed.step_idx == 2
    a, b = full.policy.model.state_dict(), resumed.policy.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed bf16-compute run differs from the uninterrupted one"
    ckpt = tmp_path / "full" / "ckpt-000002"
    masters = load_file(str(ckpt / "weights.safetensors"))
    assert {v.dtype for v in masters.values() if v.is_floating_point()} == {torch.float32}
    export = {}
    for f in os.listdir(ckpt / "policy"):
        if f.endswith(".safetensors"):
            export.update(load_file(str(ckpt / "policy" / f)))
    assert {v.dtype for v in export.values() if v.is_floating_point()} == {torch.bfloat16}
