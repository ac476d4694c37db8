"""Memory modes, each against the plain path (issue #24):

- ``grpo.micro_batch_tokens``: micro-batches cut by a token budget give the gradient of one big
  batch (fp64 equivalence), and each holds at most the budget (or one group);
- ``optim.offload_states`` (grpo_core.optim.OffloadedAdamW): the same steps as torch's AdamW, state
  dicts interchangeable with it, and the trainer's update with it equals the plain one.
(LoRA under FSDP2 is in tests/test_distributed.py; the 2B-shaped step in tests/test_real_shapes.py.)
"""

from __future__ import annotations

import copy
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from numerics import assert_equiv  # noqa: E402
from test_distributed import (  # noqa: E402
    B,
    G,
    _cfg,
    _fixed_rollouts,
    _named_grads,
    _policy,
    _records,
)

pytestmark = pytest.mark.numerics


def _update(path, **over):
    """One update on the fixed rollouts (every prompt kept); returns (grads, weights, trainer)."""
    from grpo_core.experience import Experience
    from grpo_core.trainer import GRPOTrainer

    cfg = _cfg("/tmp/unused", "token_mean", 0.04, 1, 0)
    for k, v in over.items():
        section, key = k.split("__")
        setattr(getattr(cfg, section), key, v)
    policy = _policy(path)
    prompts, ids, mask, adv, ref = _fixed_rollouts(policy, cfg.validate())
    tr = GRPOTrainer(policy, _records(), cfg, reward_specs=[])
    exp = Experience(policy.encode(prompts), ids, mask, adv, None, ref, G, list(range(B)))
    grads = []
    tr.optimizer.register_step_pre_hook(lambda opt, a, kw: grads.append(_named_grads(policy.model)))
    tr.update(exp)
    weights = {n: p.detach().clone() for n, p in policy.model.named_parameters()}
    return grads, weights, tr, exp


def test_token_budget_gives_the_one_batch_gradient(tiny_vlm_path):
    want, _, _, _ = _update(tiny_vlm_path)
    got, _, tr, exp = _update(tiny_vlm_path, grpo__micro_batch_tokens=60)
    chunks = tr._micro_batches([exp], 0)
    assert len(chunks) >= 3, chunks  # the budget really split the batch
    assert sorted(p for _, ps in chunks for p in ps) == list(range(B))
    for n in want[0]:
        assert_equiv(got[0][n], want[0][n], n)


def test_token_budget_packs_whole_groups_in_order(tiny_vlm_path):
    _, _, tr, exp = _update(tiny_vlm_path, grpo__micro_batch_tokens=60)
    plain = [p for _, ps in _update(tiny_vlm_path)[2]._micro_batches([exp], 0) for p in ps]

    def tokens(ps):
        return sum(
            int(exp.encoded.attention_mask[p].sum()) + int(exp.mask[exp.rows([p])].sum())
            for p in ps
        )

    chunks = [ps for _, ps in tr._micro_batches([exp], 0)]
    assert [p for ps in chunks for p in ps] == plain  # same shuffled order, only cut differently
    assert all(tokens(ps) <= 60 or len(ps) == 1 for ps in chunks)
    assert all(tokens(a + b[:1]) > 60 for a, b in zip(chunks, chunks[1:]))  # greedy: nothing fitted
    tr.cfg.grpo.micro_batch_prompts = 1  # both limits: the count one binds here
    assert all(len(ps) == 1 for _, ps in tr._micro_batches([exp], 0))


def _params(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        torch.nn.Parameter(torch.randn(5, 3, generator=g, dtype=torch.float64)),
        torch.nn.Parameter(torch.randn(7, generator=g, dtype=torch.float64)),
    ]


def _run(opt, params, steps, seed=1):
    from grpo_core.optim import make_scheduler

    sched = make_scheduler(opt, 2, 10, "cosine")
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g, dtype=p.dtype)
        opt.step()
        sched.step()


def test_offloaded_adamw_is_adamw():
    from grpo_core.optim import OffloadedAdamW

    kw = dict(lr=1e-2, weight_decay=0.1, betas=(0.9, 0.99))
    a, b = _params(), _params()
    ref, off = torch.optim.AdamW(a, **kw), OffloadedAdamW(b, **kw)
    _run(ref, a, 4)
    _run(off, b, 4)
    for x, y in zip(a, b):
        assert_equiv(y.detach(), x.detach(), "weights")
    for k in ("exp_avg", "exp_avg_sq"):
        for i in range(2):
            assert off.state[b[i]][k].device.type == "cpu"
            assert_equiv(off.state[b[i]][k].double(), ref.state[a[i]][k], k)
    # state dicts interchangeable: AdamW's state continued by AdamW and by OffloadedAdamW
    resumed = []
    for cls in (torch.optim.AdamW, OffloadedAdamW):
        c = [torch.nn.Parameter(x.detach().clone()) for x in a]
        opt = cls(c, **kw)
        opt.load_state_dict(copy.deepcopy(ref.state_dict()))  # (load aliases same-device tensors)
        _run(opt, c, 2, seed=5)
        resumed.append(c)
    for x, y in zip(*resumed):
        assert_equiv(y.detach(), x.detach(), "resumed weights")
    assert (resumed[0][0] - a[0]).abs().max() > 1e-4  # (the 2 steps did move the weights)


def test_offload_states_trainer_equals_plain(tiny_vlm_path):
    from grpo_core.optim import OffloadedAdamW

    _, want, _, _ = _update(tiny_vlm_path)
    _, got, tr, _ = _update(tiny_vlm_path, optim__offload_states=True)
    assert isinstance(tr.optimizer, OffloadedAdamW)
    for n in want:
        assert_equiv(got[n], want[n], n)
