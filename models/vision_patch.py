"""The vision tower's patch embedding as the GEMM it is.

Qwen2-VL and Qwen2.5-VL embed each patch with an ``nn.Conv3d`` whose stride equals its kernel
and whose input is exactly one kernel (``PatchEmbed`` views the pixels as (M, C, T, p, p)). Such
a convolution never slides: each output is one dot product per (patch, channel),

    out[m, e] = Σ_{c,t,i,j} x[m, c, t, i, j] · W[e, c, t, i, j] (+ b[e])
              = (x.reshape(M, C·T·p·p) @ W.reshape(E, C·T·p·p)ᵀ)[m, e]

so it is one (M × CTpp) · (CTpp × E) matrix product. Convolution kernels handle this shape badly:
on the CPU rollout bench the conv took ~10 ms of a ~115 ms prefill where the GEMM takes ~3 ms,
and on GPUs cuDNN's bf16 Conv3d for it has been reported from 10× up to seconds per call slower
than the GEMM (transformers #45750, vLLM's ``Conv3dLayer``, sglang #19788), which would make the
vision tower the prefill's bottleneck on the run this project exists for.

``use_gemm_patch_embed(model)`` swaps each such conv for ``PatchGemm``, which holds the *same*
Parameter objects under the same names (``proj.weight`` stays 5-D), so state dicts, checkpoints,
optimizers and freezing are unchanged; only the forward differs (same sums, another order:
equal to rounding). A conv that slides, pads, dilates or groups is left as it is.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn


class PatchGemm(nn.Module):
    """A non-sliding ``nn.Conv3d`` (stride == kernel, no padding) computed as one ``F.linear``.

    x (M, C, T, p, p) → (M, E, 1, 1, 1), the conv's output shape for one-kernel inputs."""

    def __init__(self, conv: nn.Conv3d):
        super().__init__()
        self.weight = conv.weight                      # (E, C, T, p, p): the same Parameter
        self.bias = conv.bias                          # (E,) or None
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.kernel_size = tuple(conv.kernel_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[1:]) != (self.in_channels, *self.kernel_size):
            raise ValueError(f"PatchGemm: input {tuple(x.shape)} is not (M, {self.in_channels}, "
                             f"{', '.join(map(str, self.kernel_size))}): one kernel per patch")
        m = x.shape[0]
        y = F.linear(x.reshape(m, -1), self.weight.reshape(self.out_channels, -1), self.bias)
        return y.view(m, self.out_channels, 1, 1, 1)

    def as_conv(self) -> nn.Conv3d:
        """The stock ``nn.Conv3d`` on the same Parameters (the reference this module replaces)."""
        conv = nn.Conv3d(self.in_channels, self.out_channels, self.kernel_size,
                         stride=self.kernel_size, bias=self.bias is not None, device="meta")
        conv.weight, conv.bias = self.weight, self.bias
        return conv

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, "
                f"kernel_size={self.kernel_size} (as a GEMM)")


def is_patchwise(conv: nn.Module) -> bool:
    """True for a Conv3d that never slides over its one-kernel input: a patchwise linear map."""
    if type(conv) is not nn.Conv3d or isinstance(conv.padding, str):     # "same"/"valid": not here
        return False
    return (tuple(conv.stride) == tuple(conv.kernel_size) and all(p == 0 for p in conv.padding)
            and tuple(conv.dilation) == (1, 1, 1) and conv.groups == 1)


def use_gemm_patch_embed(model: nn.Module) -> int:
    """Replace every vision ``patch_embed.proj`` of ``model`` that is a patchwise Conv3d by a
    ``PatchGemm`` sharing its parameters; returns how many were replaced (0: none found, or the
    model already runs them as linears, as newer transformers can)."""
    swapped = 0
    for name, module in model.named_modules():
        if name.split(".")[-1] != "patch_embed":
            continue
        proj = getattr(module, "proj", None)
        if proj is not None and is_patchwise(proj):
            module.proj = PatchGemm(proj)
            swapped += 1
    return swapped


@contextlib.contextmanager
def stock_patch_embed(model: nn.Module):
    """Within the block, ``model``'s patch embeddings run as the stock ``nn.Conv3d`` again (same
    Parameters): the reference for tests, and stock HF for the benches' HF ``generate`` baseline."""
    swapped = [(m, m.proj) for n, m in model.named_modules()
               if n.split(".")[-1] == "patch_embed"
               and isinstance(getattr(m, "proj", None), PatchGemm)]
    for module, gemm in swapped:
        module.proj = gemm.as_conv()
    try:
        yield
    finally:
        for module, gemm in swapped:
            module.proj = gemm
