"""Reference-model sync (grpo_core.ref_sync): the mix by hand, exact copies, and the refusals."""

import copy

import pytest
import torch
from numerics import tol

from grpo_core.ref_sync import check_ref_sync, sync_reference_


def two_linears():
    torch.manual_seed(0)
    policy = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 1))
    ref = copy.deepcopy(policy)
    for p in ref.parameters():
        p.requires_grad_(False)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(1.0)                                        # the policy moved by +1 everywhere
    return policy, ref


def test_mix_by_hand():
    policy, ref = two_linears()
    before = {n: p.clone() for n, p in ref.named_parameters()}
    sync_reference_(ref, policy, 0.25)
    for n, p in ref.named_parameters():                        # ref + 0.25·((ref + 1) − ref) = ref + 0.25
        # lerp rounds (policy − ref), its product and the sum: a few fp32 roundings of values ≤ |ref| + 1
        atol = tol(torch.float32, float(before[n].abs().max()) + 1, k=4)
        torch.testing.assert_close(p, before[n] + 0.25, rtol=0, atol=atol)
        assert not p.requires_grad                              # still frozen
    sync_reference_(ref, policy, 1.0)                           # α = 1: an exact copy
    for (n, p), q in zip(ref.named_parameters(), policy.parameters()):
        assert torch.equal(p, q), n


def test_buffers_untouched_and_policy_unchanged():
    policy, ref = two_linears()
    policy.register_buffer("table", torch.ones(2))
    ref.register_buffer("table", torch.zeros(2))
    snapshot = [p.clone() for p in policy.parameters()]
    sync_reference_(ref, policy, 0.6)
    assert torch.equal(ref.table, torch.zeros(2))
    assert all(torch.equal(a, b) for a, b in zip(snapshot, policy.parameters()))


class LoraLike(torch.nn.Module):
    """Parameter names as peft writes them: base.weight, lora_A.default.weight, lora_B.default.weight."""

    def __init__(self):
        super().__init__()
        self.base = torch.nn.Linear(4, 4, bias=False)
        self.lora_A = torch.nn.ModuleDict({"default": torch.nn.Linear(4, 2, bias=False)})
        self.lora_B = torch.nn.ModuleDict({"default": torch.nn.Linear(2, 4, bias=False)})


def test_refusals():
    policy, ref = two_linears()
    with pytest.raises(ValueError, match="the policy itself.*grpo.ref='copy'"):
        sync_reference_("adapters", policy, 0.6)
    with pytest.raises(ValueError, match="the policy itself"):
        sync_reference_(policy, policy, 0.6)
    with pytest.raises(ValueError, match=r"alpha must be in \(0, 1\]"):
        sync_reference_(ref, policy, 0.0)
    with pytest.raises(ValueError, match="parameters differ"):
        sync_reference_(torch.nn.Linear(3, 2), policy, 0.5)
    lora_policy = LoraLike()
    lora_ref = copy.deepcopy(lora_policy)
    with pytest.raises(ValueError, match="does not mix the weights B·A"):
        sync_reference_(lora_ref, lora_policy, 0.5)
    with torch.no_grad():
        lora_policy.lora_B["default"].weight.add_(1.0)
    sync_reference_(lora_ref, lora_policy, 1.0)                 # α = 1 copies every factor: exact
    assert torch.equal(lora_ref.lora_B["default"].weight, lora_policy.lora_B["default"].weight)


@pytest.mark.parametrize("kw,match", [
    (dict(beta=0.0, ref="copy", lora_rank=0), "grpo.beta=0 builds none"),
    (dict(beta=0.04, ref="adapters", lora_rank=8), "LoRA adapters disabled.*grpo.ref='copy'"),
    (dict(beta=0.04, ref="auto", lora_rank=8), "LoRA adapters disabled"),
    (dict(beta=0.04, ref="copy", lora_rank=8), "ref_sync_alpha=0.6 with LoRA"),
])
def test_config_rules(kw, match):
    with pytest.raises(ValueError, match=match):
        check_ref_sync(10, 0.6, **kw)


def test_config_rules_accept():
    check_ref_sync(0, 0.6, beta=0.0, ref="adapters", lora_rank=8)        # off: nothing to check
    check_ref_sync(10, 0.6, beta=0.04, ref="auto", lora_rank=0)          # a full-model copy
    check_ref_sync(10, 1.0, beta=0.04, ref="copy", lora_rank=8)          # LoRA copy, exact α = 1
