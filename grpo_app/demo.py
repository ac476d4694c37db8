"""The CPU demo (`make demo`): a tiny Qwen2-VL learns to read synthetic scans with GRPO.

Task: 56×56 grey "scans" with one bright lesion in one of four quadrants; the question asks
where it is, options A–D in a fixed order, answered with the letter alone. The 56-px image
becomes 4 vision tokens (patch 14, merge 2), one per quadrant.

Steps, each printed:
  1. build a tiny random Qwen2-VL (hidden 64, 2 layers) and a local tokenizer, seeded;
  2. format warm-up (grpo_app.warmup): a few SFT steps on *random* letters teach "answer with one
     letter, then stop" but not the answer (the "instruct init" axis in miniature: chance start);
  3. GRPO (G=16, 8 prompts/step, β=0, lr 3e-4, reward = accuracy) for a training-time budget;
  4. controls: the GRPO policy on images swapped between items and on blank images
     (grpo_core.counterfactual: falls to chance when the image is what it reads) and the SFT-only
     baseline (gold letters, same init, same training time);
  5. a before/after table, a JSON of the numbers and a PNG: held-out accuracy against training
     time for GRPO, swapped images and the SFT baseline, and GRPO's reward per step.

Both trainings are timed the same way: the budget counts training steps only; the held-out evals
along the way (every ``budget / 10`` s, the 200 held-out items, the same for both) are not
charged to it.

Choices and why (measured on this 2-core CPU, one thread, seed 0; docs/DESIGN.md lists more):
  - letter-only answers ("direct" prompt) instead of "<answer>X</answer>": with the tag format
    the same model sat at 64–71% after 900 GRPO steps; letter-only reached 95% at ~800 steps.
    The prompt is also shorter, so the 4 image tokens take a larger share of attention.
  - lesion σ = 0.07·size and amplitude 0.7 (the generator's default is 0.036 and 0.5): with the
    smaller lesion a random vision tower barely separates the lesion token, and GRPO stayed at
    chance for 900+ steps; supervised training on gold letters needed twice as many steps.
  - G=16 and lr 3e-4: lr 1e-3 collapsed the entropy at ~60% accuracy (no reward spread left).
  - one thread: the model is tiny, so two threads cost more in synchronisation than they save.
"""

from __future__ import annotations

import copy
import json
import os
import time

import torch

from grpo_core.config import TrainConfig, load_config

GRPO_SECONDS = 270.0
EVAL_POINTS = 10          # held-out evals along each training (plus one at the start)
EVAL_ITEMS = 200          # items per eval along the way: all held-out ones, the table's items too


DEMO_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "demo.yaml")


def demo_config(seed: int, out: str, quick: bool) -> TrainConfig:
    """grpo_app/demo.yaml, with this seed's paths (and a few steps only when ``quick``)."""
    overrides = [f"model.path={os.path.join(out, f'tiny-qwen2-vl-seed{seed}')}", f"run.seed={seed}",
                 f"run.output_dir={os.path.join(out, f'grpo-seed{seed}')}"]
    if quick:
        overrides += ["run.steps=3", "warmup.steps=2"]
    return load_config(DEMO_CONFIG, overrides)


def _accuracy(policy, records, cfg) -> dict:
    from grpo_core.eval import evaluate

    res = evaluate(policy, records, template=cfg.data.prompt, max_new_tokens=cfg.rollout.max_new_tokens,
                   batch_size=50, progress=False)
    return {"accuracy": res.accuracy, "format_rate": res.format_rate}


def timed_training(step_fn, budget_s: float, max_steps: int, evals: dict, desc: str, progress: bool):
    """Run a trainer (``step_fn``: its bound ``step``) under the run harness until ``budget_s``
    seconds of training (evals excluded) or ``max_steps``; writes nothing. Returns (the steps'
    metrics, the training seconds spent).

    ``evals``: name → fn() returning an accuracy, run at the start and every budget / EVAL_POINTS
    seconds and at the end; appended as (training seconds, accuracy) to ``evals[name]["points"]``.
    """
    from grpo_core.config import RunConfig
    from grpo_core.harness import Harness, no_output

    trainer = getattr(step_fn, "__self__", None)
    if trainer is None:
        raise TypeError("timed_training: pass a trainer's bound step method (e.g. trainer.step)")
    run = no_output(RunConfig(steps=max_steps, time_budget_s=budget_s, progress=progress))
    h = Harness(trainer, run, trainer.step_idx + max_steps, name=desc, step_fn=step_fn,
                eval_fn=lambda _policy: {k: e["fn"]() for k, e in evals.items()},
                eval_every_s=budget_s / EVAL_POINTS, bar={"reward": ".2f", "loss": ".2f"},
                handle_signals=False)
    start = len(trainer.history)
    h.run_loop()
    for t, values in h.evals:
        for k, e in evals.items():
            e["points"].append((t, values[k]))
    return trainer.history[start:], h.spent


def run_demo(seed: int = 0, out: str = "runs/demo", grpo_seconds: float | None = None, quick: bool = False) -> int:
    from grpo_core.counterfactual import evaluate_counterfactual, variant_records
    from grpo_core.data import build_records, make_prompt_fn
    from grpo_core.sft import SFTTrainer
    from grpo_core.threads import apply_threads
    from grpo_core.trainer import GRPOTrainer

    from .factory import load_policy
    from .plotting import plot_demo
    from .warmup import format_warmup

    torch.manual_seed(seed)
    budget = 10.0 if quick else (grpo_seconds or GRPO_SECONDS)
    cfg = demo_config(seed, out, quick)
    apply_threads(cfg.run.threads, cfg.model.device)   # auto on CPU: 1 (grpo_core.threads)
    t_all = time.perf_counter()
    print(f"[1/5] tiny Qwen2-VL (hidden 64, 2 layers) + synthetic scans, seed {seed}")
    policy = load_policy(cfg.model, seed=seed)
    train, held = build_records(cfg.data, seed)
    sub, sub_swapped = held[:EVAL_ITEMS], variant_records(held[:EVAL_ITEMS], "swapped", seed=seed)

    print(f"[2/5] format warm-up: {cfg.warmup.steps} SFT steps on random letters (format only)")
    format_warmup(policy, train, cfg)
    start = _accuracy(policy, held, cfg)
    init_state = copy.deepcopy(policy.model.state_dict())
    print(f"      held-out after warm-up: accuracy {start['accuracy']:.1%}, format {start['format_rate']:.1%}")

    print(f"[3/5] GRPO for {budget:.0f} s of training (G={cfg.rollout.group_size}, "
          f"{cfg.rollout.prompts_per_step} prompts/step)")
    trainer = GRPOTrainer(policy, train, cfg)
    grpo_evals = {"GRPO": {"fn": lambda: _accuracy(policy, sub, cfg)["accuracy"], "points": []},
                  "GRPO, images swapped": {"fn": lambda: _accuracy(policy, sub_swapped, cfg)["accuracy"], "points": []}}
    history, grpo_time = timed_training(trainer.step, budget, cfg.run.steps, grpo_evals, "grpo", progress=not quick)
    cf = evaluate_counterfactual(policy, held, ("image", "blank", "swapped"), seed=seed,
                                 template=cfg.data.prompt, batch_size=50, progress=False,
                                 max_new_tokens=cfg.rollout.max_new_tokens)
    after, swapped, blank = ({"accuracy": r.accuracy, "format_rate": r.format_rate}
                             for r in (cf.variants[k] for k in ("image", "swapped", "blank")))
    saved = os.path.join(out, f"grpo-seed{seed}", "policy")              # for grpo eval, before SFT
    policy.save_pretrained(saved)                                        # overwrites the weights
    print(f"      GRPO policy saved to {saved}: grpo eval --config {DEMO_CONFIG} "
          f"model.path={saved} --counterfactual")

    print(f"[4/5] SFT-only baseline: gold letters, same init, same training time ({grpo_time:.0f} s)")
    policy.model.load_state_dict(init_state)
    prompt_fn = make_prompt_fn(cfg.data.prompt, cfg.data.shuffle_options, seed)
    sft = SFTTrainer(policy, train, cfg.sft, prompt_fn, cfg.data.prompt, seed + 1, dtype=cfg.model.dtype)
    sft_evals = {"SFT baseline (gold letters)": {"fn": lambda: _accuracy(policy, sub, cfg)["accuracy"], "points": []}}
    sft_hist, _ = timed_training(sft.step, grpo_time, 10**9, sft_evals, "sft baseline", progress=not quick)
    sft_res = _accuracy(policy, held, cfg)

    rows = [("start (format warm-up)", start), ("GRPO", after), ("GRPO, images swapped", swapped),
            ("GRPO, blank images", blank), ("SFT baseline", sft_res)]
    print(f"[5/5] held-out accuracy ({len(held)} items, greedy), seed {seed}, GRPO {len(history)} steps and "
          f"SFT {len(sft_hist)} steps, {grpo_time:.0f} s of training each")
    print(f"      {'policy':<24} {'accuracy':>9} {'format':>8}")
    for name, r in rows:
        print(f"      {name:<24} {r['accuracy']:>9.1%} {r['format_rate']:>8.1%}")
    os.makedirs(out, exist_ok=True)
    first80 = next((t for t, a in grpo_evals["GRPO"]["points"] if a >= 0.8), None)
    result = {"seed": seed, "grpo_steps": len(history), "grpo_seconds": grpo_time, "sft_steps": len(sft_hist),
              **{name: r for name, r in rows}, "chance": 0.25, "first_80pct_eval_s": first80,
              "counterfactual": cf.summary(), "grpo_policy": saved,
              "curves": {k: v["points"] for k, v in {**grpo_evals, **sft_evals}.items()},
              "load_average": list(os.getloadavg()), "total_seconds": time.perf_counter() - t_all}
    png = plot_demo(result, history, os.path.join(out, f"demo-seed{seed}.png"))
    with open(os.path.join(out, f"demo-seed{seed}.json"), "w") as f:
        json.dump(result, f, indent=2)
    print("      visual reliance (GRPO accuracy drop, paired 95 % CI): " + ", ".join(
        f"{k} {100 * t['difference']:+.1f} points "
        f"[{100 * t['ci'][0]:+.1f}, {100 * t['ci'][1]:+.1f}]"
        for k, t in cf.reliance.items()))
    print(f"      curves: {png}   results: {os.path.join(out, f'demo-seed{seed}.json')}")
    print(f"      total wall time {result['total_seconds']:.0f} s")
    return 0
