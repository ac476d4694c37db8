"""The vision patch embedding as a GEMM (grpo_models.vision_patch) against ``nn.Conv3d`` itself.

Exactness: fp64 forward and backward are the conv's to fp64 rounding (the same sums in another
order); fp32 and bf16 are within their dtype's rounding of the fp64 conv. A layout error (wrong
flatten order, transposed weight) is O(1). The swap keeps the parameters (same objects, same
state-dict keys and shapes), leaves sliding convs alone, and the tiny policy's image features do
not change when it is applied.
"""

import pytest
import torch
from grpo_models.vision_patch import PatchGemm, is_patchwise
from numerics import assert_close, assert_equiv, rounding, tol
from torch import nn

from grpo_models import vision_patch

C, T, P, E = 3, 2, 14, 40    # Qwen2-VL's patch: 3 channels × 2 frames × 14 × 14 = 1176 inputs


def _conv(dtype=torch.float64, bias=False, seed=0):
    torch.manual_seed(seed)
    return nn.Conv3d(C, E, (T, P, P), stride=(T, P, P), bias=bias).to(dtype)


def _patches(m=37, dtype=torch.float64, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, C, T, P, P, generator=g, dtype=torch.float64).to(dtype)


@pytest.mark.parametrize("bias", [False, True])
def test_forward_and_backward_equal_the_conv_in_fp64(bias):
    conv = _conv(bias=bias)
    gemm = PatchGemm(conv)
    x1, x2 = _patches().requires_grad_(), _patches().requires_grad_()
    want, got = conv(x1), gemm(x2)
    assert got.shape == want.shape == (37, E, 1, 1, 1)
    assert_equiv(got.detach(), want.detach(), "forward")
    g = torch.randn_like(want)
    (want * g).sum().backward()
    w_grad = conv.weight.grad.clone()
    b_grad = conv.bias.grad.clone() if bias else None
    conv.zero_grad()
    (got * g).sum().backward()                               # same Parameters: grads land on conv's
    assert_equiv(x2.grad, x1.grad, "d input")
    assert_equiv(conv.weight.grad, w_grad, "d weight")
    if bias:
        assert_equiv(conv.bias.grad, b_grad, "d bias")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_within_rounding_of_the_fp64_conv(dtype):
    conv, x = _conv(dtype, bias=True), _patches().to(dtype)
    # the fp64 reference sees the same rounded inputs and weights: only the arithmetic differs
    with torch.no_grad():
        ref = nn.functional.conv3d(x.double(), conv.weight.double(), conv.bias.double(),
                                   stride=(T, P, P))
    n = C * T * P * P
    w_abs = conv.weight.detach().double().abs().flatten(1)
    scale = float((x.double().abs().flatten(1) @ w_abs.T).max())
    # fp32 accumulation of n products (worst case n roundings) + the output's own rounding
    bound = tol(torch.float32, scale, k=n) + rounding(ref, dtype)
    with torch.no_grad():
        got, conv_out = PatchGemm(conv)(x), conv(x)
    assert_close(got, ref, f"PatchGemm {dtype}", atol=bound)
    assert_close(conv_out, ref, f"Conv3d {dtype} (the bound is fair)", atol=bound)


def test_swap_keeps_parameters_and_state_dict():
    model = nn.Module()
    model.patch_embed = nn.Module()
    model.patch_embed.proj = _conv(torch.float32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    weight = model.patch_embed.proj.weight
    assert vision_patch.use_gemm_patch_embed(model) == 1
    assert isinstance(model.patch_embed.proj, PatchGemm)
    assert model.patch_embed.proj.weight is weight
    after = model.state_dict()
    assert list(after) == list(before) == ["patch_embed.proj.weight"]
    assert torch.equal(after["patch_embed.proj.weight"], before["patch_embed.proj.weight"])
    assert vision_patch.use_gemm_patch_embed(model) == 0     # idempotent: nothing left to swap


@pytest.mark.parametrize("make", [
    lambda: nn.Conv3d(C, E, (T, P, P), stride=(1, P, P)),            # slides in time
    lambda: nn.Conv3d(C, E, (T, P, P), stride=(T, P, P), padding=1),
    lambda: nn.Conv3d(C, E, (T, P, P), stride=(T, P, P), dilation=(1, 2, 2)),
    lambda: nn.Conv3d(C * 2, E, (T, P, P), stride=(T, P, P), groups=2),
    lambda: nn.Conv2d(C, E, (P, P), stride=(P, P)),
])
def test_sliding_or_other_convs_are_left_alone(make):
    conv = make()
    assert not is_patchwise(conv)
    model = nn.Module()
    model.patch_embed = nn.Module()
    model.patch_embed.proj = conv
    assert vision_patch.use_gemm_patch_embed(model) == 0 and model.patch_embed.proj is conv


def test_input_that_is_not_one_kernel_per_patch_is_an_error():
    gemm = PatchGemm(_conv())
    with pytest.raises(ValueError, match=r"not \(M, 3, 2, 14, 14\)"):
        gemm(torch.zeros(4, C, T, P, 28, dtype=torch.float64))


def test_tiny_policy_runs_the_gemm_and_its_image_features_are_the_convs(tiny_vlm_policy64):
    from helpers import img

    from grpo_core.policy import Prompt

    pol = tiny_vlm_policy64
    embed = pol.model.model.visual.patch_embed
    assert isinstance(embed.proj, PatchGemm)
    gemm_weight = embed.proj.weight
    enc = pol.encode([Prompt("What is shown?", [img(56, 84, 1)]),
                      Prompt("Where?", [img(70, 70, 2)])])
    with torch.no_grad():
        got = pol._prompt_embeds(enc)
        with vision_patch.stock_patch_embed(pol.model):
            assert type(embed.proj) is nn.Conv3d and embed.proj.weight is gemm_weight
            want = pol._prompt_embeds(enc)
    assert embed.proj.weight is gemm_weight and isinstance(embed.proj, PatchGemm)
    assert_equiv(got, want, "prompt embeddings with image features")
