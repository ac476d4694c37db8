"""Shared by the kernel tests: backends to parametrise over and a comparison that explains itself."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # CPU: run the Triton kernels in the interpreter

from grpo_core.kernels import dispatch  # noqa: E402

BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.skipif(
    dispatch.why_unavailable("triton", torch.device("cpu")) is not None,
    reason="Triton on CPU needs TRITON_INTERPRET=1 set before grpo_core.kernels' Triton modules load"))]


def close(name, got, want, atol, rtol=0.0):
    """assert_close that reports max / mean difference and where the worst one is."""
    got, want = torch.as_tensor(got).double(), torch.as_tensor(want).double()
    diff = (got - want).abs().nan_to_num(float("inf"))
    bad = diff > atol + rtol * want.abs()
    if bad.any():
        i = int(diff.flatten().argmax())
        raise AssertionError(f"{name}: {int(bad.sum())} of {diff.numel()} off; max diff {diff.max():.3e} at flat "
                             f"index {i} (got {got.flatten()[i]:.6g}, want {want.flatten()[i]:.6g}), mean {diff.mean():.3e}")


def max_err(a, b):
    return (a.double() - b.double()).abs().max().item()
