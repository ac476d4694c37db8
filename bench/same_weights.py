"""Same results before/after a refactor: sha256 of the weights after a few real steps.

    OMP_NUM_THREADS=1 python -m bench.same_weights [--out DIR]

Prints one line per scenario (name, sha256 of every parameter's bytes in name order, last loss).
Run it on the commit before a change and after it: a behaviour-preserving change prints the same
lines (bit-identical weights). Scenarios, on the tiny Qwen2-VL (fp32, CPU, one thread):
  grpo         3 GRPO steps, β = 0.04 (frozen reference), μ = 2, checkpoint at step 2
  grpo-resume  the same run stopped after step 2 and resumed from ckpt-000002 for step 3
  sft          3 SFT steps on gold letters
  warmup       the format warm-up (grpo_app.warmup), 3 steps on random answers
"""

from __future__ import annotations

import argparse
import hashlib
import os
import tempfile

import torch


def digest(model) -> str:
    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def _cfg(out: str, model_path: str):
    from grpo_core.config import TrainConfig

    cfg = TrainConfig()
    cfg.model.path, cfg.model.device = model_path, "cpu"
    cfg.data.prompt, cfg.data.train_size, cfg.data.eval_size = "nothink", 24, 8
    cfg.rollout.group_size, cfg.rollout.prompts_per_step, cfg.rollout.max_new_tokens = 4, 2, 4
    cfg.grpo.beta, cfg.grpo.mu = 0.04, 2
    cfg.grpo.rewards = [{"name": "ecr", "weight": 1.0, "target_len": 4,
                        "measure": "completion"}]   # a spread from the start
    cfg.optim.lr = 1e-3
    cfg.run.steps, cfg.run.save_every, cfg.run.output_dir = 3, 2, out
    cfg.run.progress, cfg.run.resume, cfg.run.log_completions = False, True, 0
    cfg.sft.steps, cfg.sft.batch_size = 3, 4
    cfg.warmup.steps, cfg.warmup.batch_size = 3, 4
    return cfg.validate()


def _policy(path):
    from grpo_models.qwen2_vl import Qwen2VLPolicy

    return Qwen2VLPolicy.from_pretrained(path, dtype=torch.float32, device="cpu")


def run(root: str) -> list[str]:
    from grpo_models.tiny import build_tiny_qwen2_vl

    from grpo_app.warmup import format_warmup
    from grpo_core.data import build_records, make_prompt_fn
    from grpo_core.sft import SFTTrainer
    from grpo_core.trainer import GRPOTrainer

    model = build_tiny_qwen2_vl(os.path.join(root, "tiny"), seed=0)
    lines = []
    cfg = _cfg(os.path.join(root, "grpo"), model)
    train, _ = build_records(cfg.data, cfg.run.seed)
    pol = _policy(model)
    hist = GRPOTrainer(pol, train, cfg).train()
    lines.append(f"grpo         {digest(pol.model)} loss {hist[-1]['loss']!r}")
    cfg2 = _cfg(os.path.join(root, "grpo-resume"), model)
    cfg2.run.steps = 2
    GRPOTrainer(_policy(model), train, cfg2).train()
    cfg2.run.steps = 3
    pol = _policy(model)
    hist = GRPOTrainer(pol, train, cfg2).train()
    lines.append(f"grpo-resume  {digest(pol.model)} loss {hist[-1]['loss']!r}")
    pol = _policy(model)
    prompt_fn = make_prompt_fn(cfg.data.prompt, cfg.data.shuffle_options, cfg.run.seed)
    hist = SFTTrainer(pol, train, cfg.sft, prompt_fn, cfg.data.prompt, cfg.run.seed).train(progress=False)
    lines.append(f"sft          {digest(pol.model)} loss {hist[-1]['loss']!r}")
    pol = _policy(model)
    w = format_warmup(pol, train, cfg)
    lines.append(f"warmup       {digest(pol.model)} loss {w['loss_last']!r}")
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.same_weights", description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="work folder (default: a new temporary one)")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    root = a.out or tempfile.mkdtemp(prefix="same_weights-")
    print("\n".join(run(root)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
