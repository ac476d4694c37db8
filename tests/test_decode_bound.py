"""bench/decode_bound.py's step cost against what a real decode step of the tiny Qwen2-VL does.

FLOPs: ``torch.utils.flop_counter`` counts every GEMM of an eager decode step (the lean step
and the module reference); the formula must give the same number at each step. Bytes: the
weights term must be the bytes of exactly the parameters the step touches (seen by a dispatch
mode), the K/V terms the bytes of the prefill cache and of the own columns attended.
"""

import pytest
import torch
from helpers import img
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from bench.decode_bound import StepCost, decode_step_cost
from grpo_core.policy import Prompt

G = 2


def _state(pol, lean: bool, monkeypatch):
    monkeypatch.setenv("GRPO_LEAN_DECODE", "1" if lean else "0")
    enc = pol.encode([Prompt("What is shown in this scan? A. CT B. MRI", [img(56, 56, 1)]),
                      Prompt("Where?", [img(84, 112, 2)])])
    with torch.no_grad():
        _, state = pol.prefill(enc)
        state = pol.plan_decode(pol.expand(state, G), 4, "off", "off")
    assert (state.lean is not None) == lean
    return enc, state


@pytest.mark.parametrize("lean", [True, False])
def test_flops_equal_the_counted_gemms_of_a_step(tiny_vlm_policy, lean, monkeypatch):
    pol = tiny_vlm_policy
    enc, state = _state(pol, lean, monkeypatch)
    b, p = enc.input_ids.shape
    tokens = torch.full((b * G,), 7)
    for step in range(3):
        with FlopCounterMode(display=False) as counter:
            pol.decode_step(state, tokens)
        want = decode_step_cost(pol._lm, pol.lm_head_weight, b, G, p, own=step + 1).flops
        assert counter.get_total_flops() == want, f"step {step}"


class _Touched(TorchDispatchMode):
    """Storages of every tensor an op reads."""

    def __init__(self):
        super().__init__()
        self.ptrs = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        for a in torch.utils._pytree.tree_leaves((args, kwargs or {})):
            if isinstance(a, torch.Tensor):
                self.ptrs.add(a.untyped_storage().data_ptr())
        return func(*args, **(kwargs or {}))


def test_bytes_are_the_weights_touched_and_the_kv_read(tiny_vlm_policy, monkeypatch):
    pol = tiny_vlm_policy
    enc, state = _state(pol, False, monkeypatch)       # module path: reads the live parameters
    b, p = enc.input_ids.shape
    with _Touched() as seen:
        pol.decode_step(state, torch.full((b * G,), 7))
    params = {q.untyped_storage().data_ptr(): q for q in pol.model.parameters()}
    touched = sum(q.numel() * q.element_size() for ptr, q in params.items() if ptr in seen.ptrs)
    zero = decode_step_cost(pol._lm, pol.lm_head_weight, b, G, 0, own=0)
    emb = b * G * pol._lm.config.hidden_size * 4
    logits = 2 * b * G * pol.lm_head_weight.shape[0] * 4
    assert zero.bytes - emb - logits == touched         # tied: the embedding is the lm_head

    prompt_kv = sum(t.numel() * t.element_size() for t in state.prefix_k + state.prefix_v)
    with_prompt = decode_step_cost(pol._lm, pol.lm_head_weight, b, G, p, own=0)
    assert with_prompt.bytes - zero.bytes == prompt_kv
    own = sum(t[:, :, :3].numel() * t.element_size() for t in state.own_k + state.own_v)
    three = decode_step_cost(pol._lm, pol.lm_head_weight, b, G, p, own=3)
    assert three.bytes - with_prompt.bytes == own


def test_bound_is_the_slower_resource():
    cost = StepCost(bytes=2e9, flops=1e12)
    assert cost.bound_s(2e12, 1e16) == pytest.approx(1e-3)      # memory: 1 ms > 0.1 ms
    assert cost.bound_s(2e12, 1e14) == pytest.approx(1e-2)      # compute: 10 ms
    assert cost.bound_s(None, 1e14) == pytest.approx(1e-2)
    assert cost.bound_s(None, None) is None
