"""The fixed-shape decode step can be captured as a CUDA graph: checked on CPU, op by op.

A CUDA graph replays the kernels of one captured step with the arguments they had then. So the
step must (1) never wait for the host (``.item()``, ``nonzero``, a boolean-mask index: these fail
during capture) and (2) launch the same ops with the same shapes and the same host-side
arguments at every step: a slice bound or an index taken from a host counter would be frozen at
its captured value and replay the wrong column. The CPU fake graph in test_rollout.py re-runs the
Python step, so it cannot see (2); here a dispatch mode records every aten op of two consecutive
steps and compares them. fp32 and bf16 weights (the 2B rollout runs bf16), the lean step and
the module reference. Last, the rollout loop around the step (sampler, bookkeeping) makes no
host-waiting op per token either: the issue's "no host synchronisation per token".
"""

import pytest
import torch
from helpers import img
from torch.utils._python_dispatch import TorchDispatchMode

from grpo_core.policy import Prompt

aten = torch.ops.aten
HOST_SYNC = {aten._local_scalar_dense, aten.nonzero, aten.masked_select, aten.is_nonzero,
             aten.unique_consecutive, aten._unique2, aten.repeat_interleave}


class _Trace(TorchDispatchMode):
    """Every aten op: its name, its tensors' shapes / dtypes and its non-tensor arguments. An op
    that waits for the host raises (``count_syncs``: is listed in ``syncs`` instead)."""

    def __init__(self, count_syncs: bool = False):
        super().__init__()
        self.ops, self.syncs, self._count = [], [], count_syncs

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in HOST_SYNC:
            if not self._count:
                raise AssertionError(f"{func} waits for the host: not capturable in a CUDA graph")
            self.syncs.append(str(func))
        leaves = torch.utils._pytree.tree_leaves((args, kwargs or {}))
        sig = tuple((tuple(x.shape), x.dtype) if isinstance(x, torch.Tensor) else repr(x)
                    for x in leaves)
        self.ops.append((str(func), sig))
        return func(*args, **(kwargs or {}))


def _static_state(pol, monkeypatch, lean: bool):
    from grpo_models import step_runner

    monkeypatch.setenv("GRPO_LEAN_DECODE", "1" if lean else "0")
    monkeypatch.setattr(step_runner, "resolve", lambda graphs, compile, device: "static")
    enc = pol.encode([Prompt("What is shown in this scan?", [img(56, 56, 1)]),
                      Prompt("Where?", [img(84, 112, 2)])])
    with torch.no_grad():
        _, state = pol.prefill(enc)
        state = pol.plan_decode(pol.expand(state, 2), 6, "off", "off")
    assert state.runner is not None and state.runner.mode == "static"
    return state


@pytest.mark.parametrize("lean", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, "bf16-gpu-attention"])
def test_fixed_shape_step_is_the_same_ops_every_step_and_never_syncs(tiny_vlm_path, monkeypatch,
                                                                     lean, dtype):
    """bf16-gpu-attention: the attention's GPU path for a bf16 cache (its GEMM emulated, as in
    test_decode_attention_lowp.py)."""
    from grpo_models.qwen2_vl import Qwen2VLPolicy
    from test_decode_attention_lowp import _force_direct

    if dtype == "bf16-gpu-attention":
        _force_direct(monkeypatch)
        dtype = torch.bfloat16
    pol = Qwen2VLPolicy.from_pretrained(tiny_vlm_path, dtype=dtype, device="cpu")
    state = _static_state(pol, monkeypatch, lean)
    assert (state.lean is not None) == lean
    tokens = torch.full((len(state),), 7)
    pol.decode_step(state, tokens)                        # step 0 (lazy set-up, if any)
    traces = []
    for _ in range(2):                                    # steps 1 and 2
        with _Trace() as trace:
            pol.decode_step(state, tokens)
        traces.append(trace.ops)
    assert len(traces[0]) > 20
    for i, (a, b) in enumerate(zip(*traces)):
        assert a == b, f"op {i} differs between steps: {a} vs {b}"
    assert len(traces[0]) == len(traces[1])


def test_the_trace_sees_a_host_dependent_slice():
    """The check can fail: a column picked by a host counter shows up as a differing argument."""
    buf = torch.zeros(2, 8)
    ops = []
    for step in range(2):
        with _Trace() as trace:
            buf[:, step:step + 1] = 1.0
        ops.append(trace.ops)
    assert ops[0] != ops[1]
    with pytest.raises(AssertionError, match="waits for the host"), _Trace():
        torch.tensor([1.0, 0.0]).nonzero()


@pytest.mark.parametrize("sampling", [{}, {"greedy": True},
                                      {"top_k": 5, "top_p": 0.9, "min_p": 0.05}])
def test_no_host_sync_per_token(tiny_vlm_policy, sampling):
    """The rollout's per-token work (sampler, bookkeeping, decode step) holds no op that waits for
    the host on a GPU: 9 and 17 new tokens make the same such ops (prefill and planning only; the
    stop check's ``.tolist()``, every 8 steps on a GPU, is not an aten op)."""
    from grpo_core.rollout import generate_groups
    from grpo_core.sampling import SamplingConfig

    pol = tiny_vlm_policy
    enc = pol.encode([Prompt("What is shown in this scan?", [img(56, 56, 1)])])
    counts = []
    for new in (9, 17):
        with _Trace(count_syncs=True) as c:
            generate_groups(pol, enc, 2, SamplingConfig(max_new_tokens=new, seed=1, **sampling))
        counts.append(c.syncs)
    assert counts[0] == counts[1], f"host syncs grow with the tokens: {counts}"

