"""Data parallelism on CPU with gloo, 2 processes under torchrun (this file is also the worker).

- update equality: one GRPO update on 2 ranks (DDP and FSDP2) gives the same gradients, grad norm,
  loss and weights as 1 process on the concatenated batch, for every ``agg`` mode; the rollouts are
  fixed and identical on both sides, ranks hold unequal numbers of kept groups (filler micro-batches)
  and the 2-rank side accumulates over micro-batches while the reference does one;
- end to end: real 2-rank train steps (sampling, rewards, gathered advantages), weights identical
  on both ranks, only rank 0 writes metrics; a checkpoint saved at step 1 and resumed on 2 ranks
  ends at the same weights as the uninterrupted run (DDP and FSDP2);
- failure: an exception in one rank, or a rank that stalls, ends the job with a clear error within
  the process-group timeout instead of hanging.

fully_shard (FSDP2) works on CPU with gloo in torch 2.13, so it is tested here, not only on GPU.

Every equivalence here runs in float64 (policy, fixed rollouts, fused loss): the 2-rank side
reduces in another order (micro-batches, the collective), which in fp32 moves gradients by ~1e-6
on some CPUs and not others. In fp64 the same reordering moves them by ~1e-16 of their size, so
the comparison is tight and holds on any CPU (tests/numerics.py).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import torch

pytestmark = pytest.mark.numerics   # also run under other CPUs' kernel paths (make test-numerics)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))   # numerics, also in torchrun workers
from helpers import tiny_policy, vowel_reward  # noqa: E402
from numerics import assert_equiv, full_precision_hf, tol  # noqa: E402

B, G, C = 4, 2, 5                       # global prompts, group size, completion length (fixed rollouts)
CASES = {                               # agg → (β, μ, global kept groups, micro_batch_prompts on 2 ranks)
    "token_mean": (0.04, 2, [0, 1, 2, 3], 1),
    "seq_mean": (0.0, 1, [0, 1, 2], 1),      # rank 1 keeps 1 group: runs one filler micro-batch
    "constant": (0.04, 1, [0, 1], 0),        # rank 1 keeps nothing: only a filler
}


def _cfg(out, agg="token_mean", beta=0.0, mu=1, mb=0, mode="none", steps=1):
    from grpo_core.config import TrainConfig

    cfg = TrainConfig()
    cfg.rollout.group_size, cfg.rollout.prompts_per_step, cfg.rollout.max_new_tokens = G, B, C
    cfg.grpo.agg, cfg.grpo.beta, cfg.grpo.mu, cfg.grpo.micro_batch_prompts = agg, beta, mu, mb
    cfg.grpo.backend = "torch"
    cfg.optim.lr, cfg.optim.max_grad_norm = 1e-2, (1.0 if agg == "token_mean" else 0.0)
    cfg.run.steps, cfg.run.output_dir, cfg.run.progress, cfg.run.resume = steps, str(out), False, False
    cfg.dist.mode, cfg.dist.timeout_s = mode, 20.0
    return cfg.validate()


def _policy(path, lora: bool = False):
    if not lora:
        return tiny_policy(path, torch.float64)                       # fp64: see module doc
    with torch.random.fork_rng(devices=[]):          # the same random adapters in every process
        torch.manual_seed(0)
        return tiny_policy(path, torch.float64, lora={"r": 4, "lora_alpha": 8})


def _records():
    from grpo_core.data import make_synthetic_vqa

    return make_synthetic_vqa(8, seed=3)


def _fixed_rollouts(policy, cfg):
    """The same rollouts in every process: encoded prompts, ids, ragged masks, advantages, ref log-probs."""
    from grpo_core.data import make_prompt_fn

    prompts, _ = make_prompt_fn(cfg.data.prompt)(_records()[:B])
    gen = torch.Generator().manual_seed(11)
    ids = torch.randint(10, policy.vocab_size, (B * G, C), generator=gen)       # (N, C), no vision tokens
    lens = torch.randint(0, C + 1, (B * G,), generator=gen)                      # one row may be empty
    mask = torch.arange(C)[None] < lens[:, None]                                 # (N, C) bool
    adv = torch.randn(B * G, generator=gen, dtype=torch.float64)                 # (N,)
    ref = -1.0 - 2.0 * torch.rand(B * G, C, generator=gen, dtype=torch.float64)  # (N, C)
    return prompts, ids, mask, adv, ref


def _named_grads(model):
    out = {}
    for n, p in model.named_parameters():
        if p.grad is not None:
            g = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
            out[n] = g.detach().clone()
    return out


def _full_weights(trainer):
    """Full weights on every rank (FSDP2: all-gathered; collective, call on every rank)."""
    out = {}
    for n, p in trainer.policy.model.named_parameters():
        out[n] = (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
    return out


def run_update(path, agg, ctx, lora: bool = False):
    """One ``update`` on fixed rollouts: this rank's share of them; grads per optimizer step.
    ``lora``: LoRA adapters on the language model (frozen base and vision tower; reference =
    adapters off)."""
    from grpo_core.experience import Experience
    from grpo_core.trainer import GRPOTrainer

    beta, mu, keep_all, mb = CASES[agg]
    world, rank = ctx.world, ctx.rank
    cfg = _cfg("/tmp/unused", agg, beta, mu, mb if world > 1 else 0, ctx.mode)
    cfg.model.lora_rank = 4 if lora else 0
    policy = _policy(path, lora)
    prompts, ids, mask, adv, ref = _fixed_rollouts(policy, cfg)
    tr = GRPOTrainer(policy, _records(), cfg, reward_specs=[], dist=ctx)
    k = B // world
    mine = slice(rank * k * G, (rank + 1) * k * G)
    keep = [p - rank * k for p in keep_all if rank * k <= p < (rank + 1) * k]
    enc = policy.encode(prompts[rank * k:(rank + 1) * k])
    old = tr.logprobs(enc, ids[mine], mask[mine]) if mu > 1 else None          # π_old: the policy as sampled
    exp = Experience(enc, ids[mine], mask[mine], adv[mine], old, ref[mine] if beta > 0 else None, G, keep)
    grads = []                                      # the (clipped) gradients each optimizer step sees
    tr.optimizer.register_step_pre_hook(lambda opt, a, kw: grads.append(_named_grads(policy.model)))
    m = tr.update(exp)
    return {"grads": grads, "metrics": m}


def run_train(path, out, ctx, steps, resume_from=None):
    """Real train steps on 2 ranks; optionally resume from a copied checkpoint first."""
    import shutil

    from grpo_core.rewards import RewardSpec
    from grpo_core.trainer import GRPOTrainer

    cfg = _cfg(out, mode=ctx.mode, steps=steps, beta=0.04)
    cfg.rollout.prompts_per_step, cfg.run.save_every, cfg.run.keep_last = 2, 1, 5
    if resume_from:
        if ctx.is_main:
            os.makedirs(out, exist_ok=True)
            shutil.copytree(resume_from, os.path.join(out, os.path.basename(resume_from)))
        ctx.barrier()
        cfg.run.resume = True
    tr = GRPOTrainer(_policy(path), _records(), cfg, reward_specs=[RewardSpec("v", vowel_reward, 1.0)], dist=ctx)
    hist = tr.train()
    return {"history": hist, "weights": _full_weights(tr)}


# ---- the worker (run by torchrun) ----------------------------------------------------------------
def _worker(scenario, path, out):
    import grpo_core.distributed as D
    from grpo_core.config import DistConfig

    full_precision_hf()                                       # as conftest does in the pytest process

    mode = "ddp" if scenario in ("raise", "stall") else None
    # gloo even where CUDA exists: these are CPU-tier tests on CPU tensors
    with D.session(DistConfig(mode=mode or "ddp", backend="gloo", timeout_s=4.0 if mode else 60.0)) as ctx:
        r = ctx.rank
        if scenario in ("raise", "stall"):
            if r == 1:
                if scenario == "raise":
                    raise RuntimeError("injected failure on rank 1")
                time.sleep(120)                               # a rank that never arrives
            ctx.all_reduce(1.0)                               # rank 0 waits here
            return
        res = {}
        for mode in ("ddp", "fsdp2"):                         # one process group, both wrapping modes
            mctx = D.DistContext(ctx.rank, ctx.world, ctx.local_rank, mode, ctx.backend)
            for agg in CASES:
                res[(mode, agg)] = run_update(path, agg, mctx)
            # LoRA: frozen base
            res[(mode, "lora")] = run_update(path, "token_mean", mctx, lora=True)
            full = run_train(path, os.path.join(out, f"{mode}_full"), mctx, steps=2)
            resumed = run_train(path, os.path.join(out, f"{mode}_resumed"), mctx, steps=2,
                                resume_from=os.path.join(out, f"{mode}_full", "ckpt-000001"))
            res[(mode, "train")] = {"full": full, "resumed": resumed}
        torch.save(res, os.path.join(out, f"rank{r}.pt"))


if __name__ == "__main__":
    _worker(*sys.argv[1:4])
    sys.exit(0)


# ---- the tests (run by pytest) ---------------------------------------------------------------------
def _torchrun(scenario, path, out, timeout):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           __file__, scenario, str(path), str(out)]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    return p, time.perf_counter() - t0


@pytest.fixture(scope="module")
def two_ranks(tiny_vlm_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    p, _ = _torchrun("main", tiny_vlm_path, out, timeout=240)
    assert p.returncode == 0, p.stderr[-4000:]
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in (0, 1)], out


@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
@pytest.mark.parametrize("agg", list(CASES))
def test_two_ranks_equal_one_rank_on_concatenated_batch(two_ranks, tiny_vlm_path, mode, agg):
    results, _ = two_ranks
    from grpo_core.distributed import DistContext

    ref = run_update(tiny_vlm_path, agg, DistContext())           # 1 process, whole batch, one micro-batch
    for r in (0, 1):
        got = results[r][(mode, agg)]
        assert len(got["grads"]) == len(ref["grads"]) == CASES[agg][1]
        for k, (gg, rg) in enumerate(zip(got["grads"], ref["grads"])):
            assert gg.keys() == rg.keys()
            assert any(v.abs().max() > 0 for v in rg.values())      # a real gradient, not all zeros
            for n in rg:
                assert_equiv(gg[n], rg[n], f"{mode}/{agg} rank {r} step {k} grad {n}")
        # (weights after AdamW are not compared: its first step is ≈ lr·sign(g), so rounding in a
        # gradient that is ≈ 0 can move a weight by up to lr; the μ = 2 case compares the gradients
        # at the updated weights instead)
        for key in ("loss", "grad_norm", "skipped_groups"):          # fp64 quantities
            assert got["metrics"][key] == pytest.approx(ref["metrics"][key], rel=1e-9, abs=1e-12), key
        for key in ("kl", "clip_frac"):       # grpo_loss reports these metrics in fp32 on any input
            assert got["metrics"][key] == pytest.approx(ref["metrics"][key], rel=tol(torch.float32), abs=1e-12), key


@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_lora_two_ranks_equal_one_rank(two_ranks, tiny_vlm_path, mode):
    """LoRA (frozen base and vision tower, reference = adapters off) under DDP and FSDP2: the
    adapters' gradients on 2 ranks equal 1 process on the concatenated batch, at both μ steps."""
    results, _ = two_ranks
    from grpo_core.distributed import DistContext

    ref = run_update(tiny_vlm_path, "token_mean", DistContext(), lora=True)
    for r in (0, 1):
        got = results[r][(mode, "lora")]
        assert len(got["grads"]) == len(ref["grads"]) == 2
        for k, (gg, rg) in enumerate(zip(got["grads"], ref["grads"])):
            assert gg.keys() == rg.keys() and all("lora_" in n for n in rg)   # only adapters train
            assert any(v.abs().max() > 0 for v in rg.values())
            for n in rg:
                assert_equiv(gg[n], rg[n], f"lora {mode} rank {r} step {k} grad {n}")
        assert got["metrics"]["loss"] == pytest.approx(ref["metrics"]["loss"], rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_train_steps_and_resume_on_two_ranks(two_ranks, mode):
    import json

    results, out = two_ranks
    r0, r1 = (results[r][(mode, "train")] for r in (0, 1))
    for run in ("full", "resumed"):
        for n, w in r0[run]["weights"].items():
            assert torch.equal(w, r1[run]["weights"][n]), f"{mode} {run}: ranks differ in {n}"
        for a, b in zip(r0[run]["history"], r1[run]["history"]):  # metrics reduced: the same everywhere
            same = lambda m: json.dumps({k: v for k, v in m.items() if not k.startswith("time_")})  # noqa: E731
            assert same(a) == same(b)                             # (json: NaN == NaN)
    assert [m["step"] for m in r0["resumed"]["history"]] == [2]   # continued after ckpt-000001
    for n, w in r0["full"]["weights"].items():
        assert_equiv(r0["resumed"]["weights"][n], w, f"{mode} resumed vs uninterrupted {n}")
    a, b = r0["full"]["history"][1], r0["resumed"]["history"][0]
    assert a["reward"] == b["reward"] and a["loss"] == pytest.approx(b["loss"], rel=1e-9, abs=1e-12)
    lines = (out / f"{mode}_full" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2 and json.loads(lines[1])["step"] == 2  # rank 0 only wrote
    assert (out / f"{mode}_full" / "ckpt-000002" / "policy" / "config.json").exists()


def test_config_needs_multiple_of_world_size():
    from grpo_core.distributed import DistContext

    with pytest.raises(ValueError, match="multiple of 3"):
        DistContext(rank=0, world=3).shard(list(range(4)))


def test_raise_in_one_rank_ends_the_job_with_its_error(tiny_vlm_path, tmp_path):
    p, took = _torchrun("raise", tiny_vlm_path, tmp_path, timeout=90)
    assert p.returncode != 0
    err = p.stdout + p.stderr
    assert "rank 1/2 failed: RuntimeError: injected failure on rank 1" in err, err[-3000:]
    assert took < 60


def test_stalled_rank_times_out(tiny_vlm_path, tmp_path):
    p, took = _torchrun("stall", tiny_vlm_path, tmp_path, timeout=90)
    assert p.returncode != 0
    err = p.stdout + p.stderr
    assert "rank 0/2 failed" in err and "timed out" in err.lower(), err[-3000:]
    assert took < 60                                              # 4 s timeout, not the 120 s stall
