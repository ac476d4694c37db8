"""GRPO through the Python API: a tiny Qwen2-VL learns the synthetic scan task on CPU.

    python examples/train_python_api.py [--steps 1000]     # ~2 minutes on one CPU core

The same pieces the `grpo` command wires from a YAML config, by hand: a policy (grpo_models), VQA
records and a prompt template (grpo_core.data), a short SFT warm-up that teaches the answer format
on random letters (not the answer), GRPO on the accuracy reward, and held-out evaluation.
"""

import argparse

import torch
from grpo_models.qwen2_vl import Qwen2VLPolicy
from grpo_models.tiny import build_tiny_qwen2_vl

from grpo_core import (
    GRPOTrainer,
    SFTTrainer,
    TrainConfig,
    evaluate,
    make_prompt_fn,
    make_synthetic_vqa,
)
from grpo_core.sft import random_answer_prompt_fn
from grpo_core.threads import apply_threads


def main(steps: int = 1000, out: str = "runs/python_api", warmup_steps: int = 40, n_eval: int = 100) -> float:
    torch.manual_seed(0)
    policy = Qwen2VLPolicy.from_pretrained(build_tiny_qwen2_vl(f"{out}/tiny", seed=0), dtype=torch.float32)
    task = dict(lesion_sigma=0.07, lesion_amplitude=0.7)                  # the demo's easier lesion
    train, held = make_synthetic_vqa(1000, seed=0, **task), make_synthetic_vqa(n_eval, seed=1, **task)

    cfg = TrainConfig()
    cfg.data.prompt = "direct"                                            # answer with the letter alone
    cfg.rollout.group_size, cfg.rollout.prompts_per_step, cfg.rollout.max_new_tokens = 16, 8, 4
    cfg.grpo.beta, cfg.grpo.rewards = 0.0, [{"name": "accuracy", "require_tag": False}]
    cfg.optim.lr, cfg.sft.optim.lr, cfg.sft.steps = 3e-4, 3e-3, warmup_steps
    cfg.run.steps, cfg.run.output_dir, cfg.run.progress = steps, f"{out}/grpo", False
    cfg.run.resume, cfg.run.resume_force = False, True        # a fresh run; an earlier one moves aside
    apply_threads(cfg.run.threads, cfg.model.device)          # as `grpo train` does

    prompts = make_prompt_fn(cfg.data.prompt)
    random_answers = random_answer_prompt_fn(prompts, train, seed=0)     # format only, not the answer
    SFTTrainer(policy, train, cfg.sft, random_answers, cfg.data.prompt,
               dtype=cfg.model.dtype).train(progress=False)
    before = evaluate(policy, held, template=cfg.data.prompt, max_new_tokens=4, progress=False).accuracy
    GRPOTrainer(policy, train, cfg).train()
    after = evaluate(policy, held, template=cfg.data.prompt, max_new_tokens=4, progress=False).accuracy
    print(f"held-out accuracy: {before:.1%} after the format warm-up, {after:.1%} after {steps} GRPO steps")
    return after


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=1000)
    main(ap.parse_args().steps)
