"""The lean decode step (grpo_models.lean_step) against the module-calling reference step.

The reference is ``prefix_decode._layers`` calling each layer's modules (``GRPO_LEAN_DECODE=0``);
the lean step is the same math on prepared weights. Compared: logits of a few decode steps of given
tokens (fp64 models: to fp32 rounding, because HF's RMSNorm, which both paths follow, computes in
fp32 even for fp64 weights, and F.rms_norm sums in another order; a logic error such as a wrong
head order, a missing bias or a wrong rotary position is O(1)); fp32 and bf16 autocast: no further
from an fp64 model than the reference is; the fused and unfused weight paths, LoRA adapters,
decoding past the planned budget.
Greedy tokens against HF ``generate`` run through the lean step in test_rollout.py.
"""

import pytest
import torch
from helpers import img
from numerics import assert_close, tol

from grpo_core.policy import Prompt


def _prompts():
    return [Prompt("What is shown in this scan? A. CT B. MRI", [img(56, 56, 1)]),
            Prompt("Where is the lesion?", [img(84, 112, 2)]),
            Prompt("Which organ?", [img(90, 70, 3)])]


def _logits(pol, enc, G, ids, *, lean, mode=None, capacity=None, compact_at=None):
    """Prefill, expand, plan (``capacity`` steps), decode ids[:, j] → logits (N', steps, V) fp32
    and the lean weights used (None: the module path)."""
    import os

    from grpo_models import step_runner

    old, os.environ["GRPO_LEAN_DECODE"] = os.environ.get("GRPO_LEAN_DECODE"), "1" if lean else "0"
    real, step_runner.resolve = step_runner.resolve, lambda graphs, compile, device: mode
    try:
        with torch.no_grad():
            logits, state = pol.prefill(enc)
            state = pol.plan_decode(pol.expand(state, G), capacity or ids.shape[1], "off", "off")
            weights, rows, out = state.lean, torch.arange(ids.shape[0]), []
            for j in range(ids.shape[1]):
                if j == compact_at:                        # drop prompt 1, keep 2 rows of the rest
                    keep = torch.tensor([b for b in range(len(enc)) if b != 1])
                    slots = (keep[:, None] * G + torch.tensor([G - 1, 0])).flatten()
                    state = pol.compact_state(state, keep, slots, 2)
                    rows, out = rows[slots], [o[slots] for o in out]
                logits, state = pol.decode_step(state, ids[rows, j])
                out.append(logits.clone())
    finally:
        step_runner.resolve = real
        if old is None:
            del os.environ["GRPO_LEAN_DECODE"]
        else:
            os.environ["GRPO_LEAN_DECODE"] = old
    return torch.stack(out, 1), weights


def _fp32_rounding(ref):
    return tol(torch.float32, ref.abs().max(), k=16)


def _ids(n, steps, seed=1):
    return torch.randint(10, 400, (n, steps), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("mode,compact_at", [(None, None), (None, 2), ("static", 2)])
def test_lean_matches_module_reference_fp64(tiny_vlm_policy64, mode, compact_at):
    pol = tiny_vlm_policy64
    enc = pol.encode(_prompts())
    ids = _ids(len(enc) * 3, 5)
    ref, none = _logits(pol, enc, 3, ids, lean=False, mode=mode, compact_at=compact_at)
    got, weights = _logits(pol, enc, 3, ids, lean=True, mode=mode, compact_at=compact_at)
    assert none is None and weights is not None and weights.fused, "the lean path was not taken"
    assert_close(got, ref, "lean vs module step (fp64)", atol=_fp32_rounding(ref))


def test_lean_unfused_matches_fused(tiny_vlm_policy64, monkeypatch):
    from grpo_models import lean_step

    pol = tiny_vlm_policy64
    enc = pol.encode(_prompts())
    ids = _ids(len(enc) * 2, 4)
    fused, w1 = _logits(pol, enc, 2, ids, lean=True)
    monkeypatch.setattr(lean_step, "FUSE_MAX_BYTES", 0)
    split, w2 = _logits(pol, enc, 2, ids, lean=True)
    assert w1.fused and not w2.fused
    assert_close(split, fused, "unfused vs fused projections",
                 atol=tol(torch.float64, fused.abs().max(), k=64))


@pytest.mark.parametrize("autocast", [False, True])
def test_lean_error_vs_fp64_is_that_of_the_reference(tiny_vlm_path, autocast):
    """fp32 weights (and bf16 compute under autocast, as the trainer runs): the lean step is no
    further from the fp64 model than the module path is (2× + a rounding floor)."""
    from grpo_models.qwen2_vl import Qwen2VLPolicy

    pol64 = Qwen2VLPolicy.from_pretrained(tiny_vlm_path, dtype=torch.float64, device="cpu")
    pol = Qwen2VLPolicy.from_pretrained(tiny_vlm_path, dtype=torch.float32, device="cpu")
    enc = pol.encode(_prompts())
    ids = _ids(len(enc) * 2, 4, seed=3)
    want, _ = _logits(pol64, enc, 2, ids, lean=False)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        ref, _ = _logits(pol, enc, 2, ids, lean=False)
        got, weights = _logits(pol, enc, 2, ids, lean=True)
    assert weights is not None and got.dtype == torch.float32
    floor = tol(torch.bfloat16 if autocast else torch.float32, want.abs().max(), k=4)
    err, ref_err = (got - want).abs().max(), (ref - want).abs().max()
    assert ref_err > 0 and err <= 2 * ref_err + floor, (
        f"lean error {err:.3g} vs module path {ref_err:.3g}")


def test_lean_with_lora_calls_the_adapters(tiny_vlm_path):
    """LoRA-wrapped projections are not fused: the lean step calls them as modules, so the
    adapters apply (its logits match the module path with adapters on, not with them off)."""
    from grpo_models.qwen2_vl import Qwen2VLPolicy

    lora = {"r": 4, "lora_alpha": 16, "init_lora_weights": False}
    pol = Qwen2VLPolicy.from_pretrained(tiny_vlm_path, dtype=torch.float64, device="cpu", lora=lora)
    enc = pol.encode(_prompts())
    ids = _ids(len(enc) * 2, 3)
    ref, _ = _logits(pol, enc, 2, ids, lean=False)
    got, weights = _logits(pol, enc, 2, ids, lean=True)
    assert weights is not None and not weights.fused
    assert_close(got, ref, "lean vs module step with LoRA", atol=_fp32_rounding(ref))
    with pol.disable_adapters():
        off, _ = _logits(pol, enc, 2, ids, lean=True)
    assert (off - got).abs().max() > 1e-3, "adapters change nothing: the test cannot fail"


def test_decoding_past_the_planned_budget_falls_back_to_the_modules(tiny_vlm_policy64):
    """The rotary tables cover the planned steps; an eager caller that decodes further gets the
    module path (same logits), not an index error."""
    pol = tiny_vlm_policy64
    enc = pol.encode(_prompts())
    ids = _ids(len(enc) * 2, 6, seed=4)
    ref, _ = _logits(pol, enc, 2, ids, lean=False)
    got, weights = _logits(pol, enc, 2, ids, lean=True, capacity=2)
    assert weights is not None and weights.steps == 2
    assert_close(got, ref, "lean past its budget", atol=_fp32_rounding(ref))


def test_rope_matches_hf_apply_rotary_pos_emb():
    from grpo_models.lean_step import rope
    from transformers.models.qwen2_vl.modeling_qwen2_vl import apply_rotary_pos_emb

    g = torch.Generator().manual_seed(0)
    n, h, d = 5, 3, 8
    x = torch.randn(n, h, d, generator=g, dtype=torch.float64)
    ang = torch.randn(n, 1, d // 2, generator=g, dtype=torch.float64)
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)   # (N, 1, d)
    want, _ = apply_rotary_pos_emb(x[:, :, None], x[:, :, None], cos, sin)    # (N, h, 1, d)
    sign = torch.ones(d, dtype=torch.float64)
    sign[: d // 2] = -1
    assert_close(rope(x, cos, sin * sign), want[:, :, 0], "rope", atol=tol(torch.float64, 1.0, k=4))
