"""Do bf16 runs learn? The weight update of a bf16-compute run against the same update in fp32.

    python -m bench.bench_precision [--steps 6] [--lr 1e-6 3e-4] [--paths single lora sft ddp fsdp2]

For each training path it replays the same fixed batch through the trainer's own update
(``GRPOTrainer.update`` on one ``Experience``; ``SFTTrainer.step`` for SFT) ``--steps`` times from
the same start weights, once with ``model.dtype=float32`` and once with ``model.dtype=bfloat16``,
the policy loaded the way a user loads it (``grpo_app.factory.load_policy``, a bf16 checkpoint).
It prints, per path and lr:

    moved     fraction of trainable weights whose value changed (bf16 run)
    of fp32   that fraction among the weights the fp32 run moved
    cos       cosine between the two runs' weight deltas (all trainable weights as one vector)
    rel err   ‖Δ_bf16 − Δ_fp32‖ / ‖Δ_fp32‖

ddp / fsdp2 run 2 ranks on gloo (torchrun): each rank updates on its half of the batch and the
result is compared with the single-process fp32 update on the whole batch. The tiny random
Qwen2-VL of the tests (grpo_models.tiny); CPU, a few seconds per path.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

import torch

B, G, C = 4, 2, 6          # prompts, group size, completion tokens of the fixed batch


def fixed_batch(policy, rank: int = 0, world: int = 1):
    """This rank's share of a fixed GRPO batch: (Experience, records). Same on every call."""
    from grpo_core.data import make_prompt_fn, make_synthetic_vqa
    from grpo_core.experience import Experience

    records = make_synthetic_vqa(8, seed=3)
    prompts, _ = make_prompt_fn("nothink")(records[:B])
    gen = torch.Generator().manual_seed(11)
    ids = torch.randint(10, policy.vocab_size - 8, (B * G, C), generator=gen)    # (N, C)
    lens = torch.randint(1, C + 1, (B * G,), generator=gen)
    mask = torch.arange(C)[None] < lens[:, None]                                   # (N, C) bool
    adv = torch.randn(B * G, generator=gen)                                        # (N,)
    k = B // world
    rows = slice(rank * k * G, (rank + 1) * k * G)
    enc = policy.encode(prompts[rank * k:(rank + 1) * k])
    dev = policy.device
    return Experience(enc, ids[rows].to(dev), mask[rows].to(dev), adv[rows].to(dev), None, None, G,
                      list(range(k))), records


def train_config(dtype: str, lr: float, mode: str = "none"):
    from grpo_core.config import TrainConfig

    cfg = TrainConfig()
    cfg.model.dtype = dtype
    cfg.rollout.group_size, cfg.rollout.prompts_per_step, cfg.rollout.max_new_tokens = G, B, C
    cfg.grpo.beta, cfg.grpo.backend = 0.0, "torch"
    cfg.optim.lr, cfg.optim.max_grad_norm = lr, 0.0
    cfg.run.progress, cfg.run.resume = False, False
    cfg.dist.mode = mode
    return cfg.validate()


def load(path: str, dtype: str, lora: int = 0, device: str = "cpu"):
    """The user's loading path: a bf16 checkpoint; fp32 runs get its exact fp32 copy."""
    from grpo_app.factory import load_policy
    from grpo_core.config import ModelConfig

    torch.manual_seed(0)                          # the same LoRA initialisation in both runs
    policy = load_policy(ModelConfig(path=path, dtype="bfloat16", device=device, lora_rank=lora))
    if dtype == "float32":
        for p in policy.model.parameters():
            p.data = p.data.float()
    return policy


def trainable(model) -> dict[str, torch.Tensor]:
    """Full (gathered under FSDP2) fp32 copies of the trainable parameters."""
    out = {}
    for n, p in model.named_parameters():
        if p.requires_grad:
            t = p.full_tensor() if hasattr(p, "full_tensor") else p
            out[n] = t.detach().float().clone()
    return out


def delta(before: dict, after: dict) -> dict[str, torch.Tensor]:
    return {k: after[k].double() - before[k].double() for k in before}


def compare(d_lo: dict, d_ref: dict) -> dict:
    """moved / of-fp32 fractions, cosine and relative error of two runs' weight deltas."""
    a = torch.cat([d_lo[k].flatten() for k in sorted(d_ref)])
    r = torch.cat([d_ref[k].flatten() for k in sorted(d_ref)])
    moved, ref_moved = a != 0, r != 0
    return {"moved": moved.double().mean().item(),
            "moved_of_fp32": (moved & ref_moved).double().sum().item() / max(ref_moved.sum().item(), 1),
            "fp32_moved": ref_moved.double().mean().item(),
            "cos": torch.nn.functional.cosine_similarity(a, r, dim=0).item(),
            "rel_err": ((a - r).norm() / r.norm().clamp(min=1e-300)).item()}


def grpo_delta(path, dtype, lr, steps, lora=0, ctx=None, device="cpu"):
    """Weight delta of ``steps`` GRPO updates on the fixed batch (this rank's share under ``ctx``)."""
    from grpo_core.trainer import GRPOTrainer

    policy = load(path, dtype, lora, device)
    mode = ctx.mode if ctx is not None else "none"
    tr = GRPOTrainer(policy, fixed_batch(policy)[1], train_config(dtype, lr, mode), reward_specs=[], dist=ctx)
    exp, _ = fixed_batch(policy, ctx.rank if ctx else 0, ctx.world if ctx else 1)
    w0 = trainable(policy.model)
    for _ in range(steps):
        tr.update(exp)
    return delta(w0, trainable(policy.model))


def sft_delta(path, dtype, lr, steps):
    from grpo_core.config import SFTConfig
    from grpo_core.data import make_prompt_fn
    from grpo_core.sft import SFTTrainer

    policy = load(path, dtype)
    cfg = SFTConfig(steps=steps, batch_size=4)
    cfg.optim.lr = lr
    cfg.optim.max_grad_norm = 0.0
    records = fixed_batch(policy)[1]
    tr = SFTTrainer(policy, records, cfg, make_prompt_fn("nothink"), "nothink", seed=0, backend="torch",
                    dtype=dtype)
    w0 = trainable(policy.model)
    for _ in range(steps):
        tr.step()
    return delta(w0, trainable(policy.model))


def _dist_worker(path, out, lrs, steps):
    """torchrun worker: ddp and fsdp2 bf16 updates; rank 0 compares with the single fp32 update."""
    import grpo_core.distributed as D
    from grpo_core.config import DistConfig

    res = {}
    with D.session(DistConfig(mode="ddp", backend="gloo", timeout_s=120.0)) as ctx:
        for mode in ("ddp", "fsdp2"):
            mctx = D.DistContext(ctx.rank, ctx.world, ctx.local_rank, mode, ctx.backend)
            for lr in lrs:
                d = grpo_delta(path, "bfloat16", lr, steps, ctx=mctx)
                if ctx.is_main:
                    res[f"{mode} lr={lr:g}"] = compare(d, grpo_delta(path, "float32", lr, steps))
    if res:
        with open(out, "w") as f:
            json.dump(res, f)


def run(paths, lrs, steps) -> dict:
    from grpo_models.tiny import build_tiny_qwen2_vl

    torch.manual_seed(0)
    tmp = tempfile.mkdtemp(prefix="bench_precision_")
    path = build_tiny_qwen2_vl(os.path.join(tmp, "tiny"), seed=0)
    res = {}
    for lr in lrs:
        if "single" in paths:
            res[f"single lr={lr:g}"] = compare(grpo_delta(path, "bfloat16", lr, steps),
                                               grpo_delta(path, "float32", lr, steps))
        if "lora" in paths:
            res[f"lora lr={lr:g}"] = compare(grpo_delta(path, "bfloat16", lr, steps, lora=8),
                                             grpo_delta(path, "float32", lr, steps, lora=8))
        if "sft" in paths:
            res[f"sft lr={lr:g}"] = compare(sft_delta(path, "bfloat16", lr, steps),
                                            sft_delta(path, "float32", lr, steps))
    if {"ddp", "fsdp2"} & set(paths):
        out = os.path.join(tmp, "dist.json")
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))   # this checkout's packages
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": root}
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               os.path.abspath(__file__), "--worker", path, out, json.dumps(lrs), str(steps)]
        p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        if p.returncode != 0:
            raise RuntimeError(f"bench_precision: the 2-rank run failed:\n{p.stderr[-3000:]}")
        res.update({k: v for k, v in json.load(open(out)).items() if k.split()[0] in paths})
    return res


def main(argv=None):
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--worker":
        _, _, path, out, lrs, steps = sys.argv
        return _dist_worker(path, out, json.loads(lrs), int(steps))
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--lr", type=float, nargs="+", default=[1e-6, 3e-4])
    ap.add_argument("--paths", nargs="+", default=["single", "ddp", "fsdp2", "lora", "sft"])
    ap.add_argument("--json", help="also write the results here")
    a = ap.parse_args(argv)
    res = run(a.paths, a.lr, a.steps)
    print(f"{'path':<18} {'moved':>8} {'of fp32':>8} {'fp32 moved':>10} {'cos':>8} {'rel err':>9}")
    for k, v in res.items():
        print(f"{k:<18} {v['moved']:>8.1%} {v['moved_of_fp32']:>8.1%} {v['fp32_moved']:>10.1%} "
              f"{v['cos']:>8.4f} {v['rel_err']:>9.3g}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)
    return res


if __name__ == "__main__":
    main()
