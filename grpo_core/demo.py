"""The CPU demo (`make demo`): a tiny Qwen2-VL learns to read synthetic scans with GRPO.

Task: 56×56 grey "scans" with one bright lesion in one of four quadrants; the question asks
where it is, options A–D in a fixed order. The 56-px image becomes 4 vision tokens (patch 14,
merge 2), one per quadrant, so a 2-layer model can learn it in minutes on 2 cores.

Steps, each printed:
  1. build a tiny random Qwen2-VL (hidden 64, 2 layers) and a local tokenizer, seeded;
  2. format warm-up: a few SFT steps on *random* letters teach "<answer>X</answer>" but not the
     answer (the "instruct init" axis in miniature: the start is at chance, ≈25%);
  3. GRPO (G=16, 8 prompts/step, β=0, lr 3e-4) for a wall-time budget, held-out accuracy
     evaluated along the way;
  4. controls: the trained policy on images swapped between items (should fall to chance: the
     image is needed) and the SFT-only baseline (gold letters, same init, same wall time);
  5. a before/after table and a PNG of the curves.

Choices, with the reason (see DESIGN.md "CPU demo task facts" for the failed alternatives):
G=16 (G=8 collapsed on some seeds), lr 3e-4 (1e-3 collapsed onto two letters), fixed option
order (per-item shuffles are unlearnable at this size), 56-px images (112 px stayed at chance).
"""

from __future__ import annotations

import copy
import json
import os
import time

import torch

from .config import TrainConfig

GRPO_SECONDS = 240.0


def demo_config(seed: int, out: str, quick: bool) -> TrainConfig:
    cfg = TrainConfig()
    cfg.model.path, cfg.model.tiny, cfg.model.device = os.path.join(out, f"tiny-qwen2-vl-seed{seed}"), True, "cpu"
    cfg.data.prompt, cfg.data.train_size, cfg.data.eval_size = "nothink", 2000, 200
    cfg.rollout.group_size, cfg.rollout.prompts_per_step, cfg.rollout.max_new_tokens = 16, 8, 8
    cfg.grpo.beta, cfg.grpo.agg, cfg.grpo.adv_scale = 0.0, "token_mean", "group"
    cfg.grpo.rewards = [{"name": "accuracy", "weight": 1.0}, {"name": "format_nothink", "weight": 0.1}]
    cfg.optim.lr, cfg.optim.max_grad_norm = 3e-4, 1.0
    cfg.run.seed, cfg.run.output_dir, cfg.run.resume = seed, os.path.join(out, f"grpo-seed{seed}"), False
    cfg.run.steps = 3 if quick else 10_000
    cfg.sft.batch_size, cfg.sft.lr, cfg.sft.steps = 16, 3e-3, 2 if quick else 40
    return cfg.validate()


def _accuracy(policy, records, cfg) -> dict:
    from .eval import evaluate

    res = evaluate(policy, records, template=cfg.data.prompt, max_new_tokens=cfg.rollout.max_new_tokens,
                   batch_size=50, progress=False)
    return {"accuracy": res.accuracy, "format_rate": res.format_rate}


def run_demo(seed: int = 0, out: str = "runs/demo", grpo_seconds: float | None = None, quick: bool = False) -> int:
    from .cli import build_records
    from .data import swap_images
    from .factory import load_policy
    from .plotting import plot_history
    from .sft import SFTTrainer, random_letter
    from .trainer import GRPOTrainer, _default_prompt_fn

    torch.manual_seed(seed)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    budget = 10.0 if quick else (grpo_seconds or GRPO_SECONDS)
    cfg = demo_config(seed, out, quick)
    t_all = time.perf_counter()
    print(f"[1/5] tiny Qwen2-VL (hidden 64, 2 layers) + synthetic scans, seed {seed}")
    policy = load_policy(cfg.model, seed=seed)
    train, held = build_records(cfg)
    prompt_fn = _default_prompt_fn(cfg)

    print(f"[2/5] format warm-up: {cfg.sft.steps} SFT steps on random letters (format only)")
    SFTTrainer(policy, train, cfg.sft, prompt_fn, cfg.data.prompt, seed).train(label_fn=random_letter, progress=False)
    start = _accuracy(policy, held, cfg)
    init_state = copy.deepcopy(policy.model.state_dict())
    print(f"      held-out after warm-up: accuracy {start['accuracy']:.1%}, format {start['format_rate']:.1%}")

    print(f"[3/5] GRPO for {budget:.0f} s (G={cfg.rollout.group_size}, {cfg.rollout.prompts_per_step} prompts/step)")
    cfg.run.time_budget_s = budget
    evals: list[tuple[int, float]] = [(0, start["accuracy"])]
    eval_every = 5

    class _Trainer(GRPOTrainer):
        def step(self):
            m = super().step()
            if self.step_idx % eval_every == 0:
                m["eval/accuracy"] = _accuracy(self.policy, held[:100], cfg)["accuracy"]
                evals.append((self.step_idx, m["eval/accuracy"]))
            return m

    t0 = time.perf_counter()
    history = _Trainer(policy, train, cfg).train()
    grpo_time = time.perf_counter() - t0
    after = _accuracy(policy, held, cfg)
    evals.append((len(history), after["accuracy"]))
    swapped = _accuracy(policy, swap_images(held, seed=seed), cfg)

    print(f"[4/5] SFT-only baseline: gold letters, same init, same wall time ({grpo_time:.0f} s)")
    policy.model.load_state_dict(init_state)
    sft_cfg = copy.deepcopy(cfg.sft)
    sft_cfg.steps = 1_000_000
    SFTTrainer(policy, train, sft_cfg, prompt_fn, cfg.data.prompt, seed + 1).train(time_budget_s=grpo_time, progress=not quick)
    sft = _accuracy(policy, held, cfg)

    rows = [("start (format warm-up)", start), ("GRPO", after), ("GRPO, images swapped", swapped), ("SFT baseline", sft)]
    print(f"[5/5] held-out accuracy ({len(held)} items, greedy), seed {seed}, GRPO {len(history)} steps in {grpo_time:.0f} s")
    print(f"      {'policy':<24} {'accuracy':>9} {'format':>8}")
    for name, r in rows:
        print(f"      {name:<24} {r['accuracy']:>9.1%} {r['format_rate']:>8.1%}")
    os.makedirs(cfg.run.output_dir, exist_ok=True)
    png = plot_history(history, os.path.join(out, f"demo-seed{seed}.png"), title=f"GRPO demo, seed {seed}",
                       extra={"held-out accuracy": evals})
    result = {"seed": seed, "grpo_steps": len(history), "grpo_seconds": grpo_time,
              "total_seconds": time.perf_counter() - t_all, **{name: r for name, r in rows}, "evals": evals}
    with open(os.path.join(out, f"demo-seed{seed}.json"), "w") as f:
        json.dump(result, f, indent=2)
    print(f"      curves: {png}   results: {os.path.join(out, f'demo-seed{seed}.json')}")
    print(f"      total wall time {result['total_seconds']:.0f} s")
    return 0
