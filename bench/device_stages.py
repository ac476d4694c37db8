"""The device check's two correctness stages (bench/device_check.py runs each in its own process).

    python -m bench.device_stages precision --out DIR [--dry-run]
    python -m bench.device_stages learn --out DIR [--dry-run] [--seconds 60]

precision: does a bf16 run update the weights as an fp32 run does? bench.bench_precision's fixed
  batch is replayed ``UPDATES`` times through ``GRPOTrainer.update`` of two trainers built from
  the same bf16 checkpoint, ``model.dtype=float32`` and ``bfloat16``, at lr 1e-6 (a real
  fine-tuning rate). The weight deltas d = θ_after − θ_before of the trainable parameters:
      moved     = fraction of bf16 trainable elements with d ≠ 0        (pass ≥ 0.9)
      cosine    = ⟨d_bf16, d_fp32⟩ / (‖d_bf16‖ ‖d_fp32‖)                (pass ≥ 0.9)
      rel_error = ‖d_bf16 − d_fp32‖ / ‖d_fp32‖                          (reported)
  bf16 weights alone lose such an update: lr·1 ≈ 1e-6 is far below bf16's step at |θ| ≈ 0.02
  (2^-8 · 0.02 ≈ 8e-5), so most elements do not move (issue #22: bf16 compute over fp32 master
  weights). The dry run (CPU) runs it and prints the numbers; on a GPU the stage fails below pass.
learn: the demo's task (grpo_app.demo: a tiny Qwen2-VL, synthetic scans, lesion quadrant A–D) on the
  GPU in bf16: format warm-up, then GRPO for ``--seconds`` of training; held-out accuracy
  (200 items, greedy) before and after must rise by ≥ ``MIN_RISE``. The dry run uses a tiny
  budget and needs no rise.
Each writes ``<out>/<stage>.json`` (its facts, ``pass`` the verdict) and exits 1 when the check
fails on a GPU; the dry run exits 0 either way (it checks that the stage runs, not the engine).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import torch

UPDATES = 3           # optimizer steps on the replayed Experience
LR = 1e-6
PASS_MOVED, PASS_COSINE = 0.9, 0.9
MIN_RISE = 0.10       # learn: held-out accuracy must rise by ≥ 10 points (chance is 25 %)


def _config(out: str, dtype: str, device: str, quick: bool):
    from grpo_app.demo import demo_config

    cfg = demo_config(0, out, quick)
    cfg.model.dtype, cfg.model.device = dtype, device
    cfg.run.output_dir = os.path.join(out, f"run-{dtype}")
    return cfg


def precision(out: str, dry_run: bool) -> dict:
    """bench.bench_precision's comparison (the same fixed batch, metrics and loading path as its
    CPU tests), on the GPU: a bf16 checkpoint of the tiny Qwen2-VL trained in bf16 vs fp32."""
    from grpo_models.tiny import build_tiny_qwen2_vl

    from bench.bench_precision import compare, grpo_delta

    device = "cpu" if dry_run else "cuda"
    torch.manual_seed(0)
    path = build_tiny_qwen2_vl(os.path.join(out, "tiny"), seed=0)
    res = compare(grpo_delta(path, "bfloat16", LR, UPDATES, device=device),
                  grpo_delta(path, "float32", LR, UPDATES, device=device))
    facts = {"updates": UPDATES, "lr": LR, "moved_fp32": res["fp32_moved"],
             "moved_bf16": res["moved"], "cosine": res["cos"], "rel_error": res["rel_err"]}
    facts["pass"] = facts["moved_bf16"] >= PASS_MOVED and facts["cosine"] >= PASS_COSINE
    return facts


def learn(out: str, dry_run: bool, seconds: float) -> dict:
    from grpo_app.demo import _accuracy
    from grpo_app.factory import load_policy
    from grpo_app.warmup import format_warmup
    from grpo_core.data import build_records
    from grpo_core.trainer import GRPOTrainer

    dtype, device = ("float32", "cpu") if dry_run else ("bfloat16", "cuda")
    cfg = _config(out, dtype, device, quick=dry_run)
    cfg.data.eval_size = 20 if dry_run else 200                # held-out items, greedy
    torch.manual_seed(0)
    policy = load_policy(cfg.model, seed=0)
    train, held = build_records(cfg.data, 0)
    t0 = time.perf_counter()
    format_warmup(policy, train, cfg)
    warm_s = time.perf_counter() - t0
    start = _accuracy(policy, held, cfg)
    trainer, steps, t0 = GRPOTrainer(policy, train, cfg), 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds and steps < cfg.run.steps:
        trainer.step()
        steps += 1
    train_s = time.perf_counter() - t0
    end = _accuracy(policy, held, cfg)
    facts = {"dtype": cfg.model.dtype, "warmup_s": warm_s, "grpo_steps": steps, "grpo_s": train_s,
             "acc_start": start["accuracy"], "acc_end": end["accuracy"],
             "format_end": end["format_rate"],
             "held_out": len(held)}
    facts["pass"] = end["accuracy"] - start["accuracy"] >= MIN_RISE
    return facts


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("stage", choices=["precision", "learn"])
    ap.add_argument("--out", required=True)
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny budget: the stage runs")
    ap.add_argument("--seconds", type=float, default=None, help="learn: GRPO training seconds "
                                                                "(default 60; dry run 2)")
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    if args.dry_run:
        torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        if args.stage == "precision":
            facts = precision(tmp, args.dry_run)
        else:
            facts = learn(tmp, args.dry_run, args.seconds or (2.0 if args.dry_run else 60.0))
    with open(os.path.join(args.out, f"{args.stage}.json"), "w") as f:
        json.dump(facts, f, indent=1)
    print(json.dumps({k: float(f"{v:.4g}") if isinstance(v, float) else v
                      for k, v in facts.items()}))
    return 0 if facts["pass"] or args.dry_run else 1        # the dry run checks that the stage runs


if __name__ == "__main__":
    sys.exit(main())
