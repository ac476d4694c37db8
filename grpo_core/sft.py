"""Supervised fine-tuning baseline on the same records, prompts, policy and eval as GRPO.

    loss = −(1/Σ|y_i|) Σ_i Σ_t log π(y_it | prompt_i, y_i<t)        (token-mean cross-entropy)

computed with the same fused linear log-prob kernel as the GRPO loss (no full logits), so the
GRPO-vs-SFT comparison of the study differs only in the objective. Targets:
  - "answer":    "<answer>X</answer>" (or the bare letter for the "direct" prompt) + EOS
  - "reasoning": "<think>{record.extra['reasoning']}</think><answer>X</answer>" + EOS
``SFTTrainer.train(..., label_fn=...)`` can replace the gold letter, e.g. with random letters for
a format-only warm-up (teaches the answer format, not the answer).
"""

from __future__ import annotations

import time

import torch

from .kernels import linear_token_logprobs
from .optim import make_optimizer, make_scheduler
from .precision import (
    autocast,
    check_trainable_compute,
    compute_cast,
    master_weights_,
    resolve_compute_dtype,
)

SFT_TARGETS = ("answer", "reasoning")


def answer_target(record, prompt_style: str = "nothink", letter: str | None = None, target: str = "answer") -> str:
    letter = letter if letter is not None else (record.answer_letter or record.answer_text or "")
    if prompt_style == "direct":
        return letter
    if target == "reasoning":
        reasoning = (record.extra or {}).get("reasoning")
        if not reasoning:
            raise ValueError(f"SFT target 'reasoning' needs record.extra['reasoning'] (record id {record.id!r})")
        return f"<think>{reasoning}</think><answer>{letter}</answer>"
    return f"<answer>{letter}</answer>"


def tokenize_targets(policy, texts: list[str]):
    """Target texts → ids (N, C) right-padded with pad, mask (N, C) bool; EOS appended to each."""
    tok = policy.tokenizer
    eos = policy.eos_token_ids[0]
    seqs = [tok(t, add_special_tokens=False)["input_ids"] + [eos] for t in texts]
    C = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), C), policy.pad_token_id, dtype=torch.long)
    mask = torch.zeros(len(seqs), C, dtype=torch.bool)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = True
    return ids.to(policy.device), mask.to(policy.device)


def sft_loss(policy, enc, ids, mask, backend="auto", compute_dtype=None):
    """Token-mean negative log-likelihood of targets (N, C) given prompts (N rows, G = 1); the fused
    lm_head runs in ``compute_dtype`` where that is bf16/fp16 (grpo_core.precision)."""
    h = policy.completion_hidden(enc, ids, mask, 1)                                    # (N, C, H)
    if compute_dtype is not None:
        h = compute_cast(h, compute_dtype)
    lp = linear_token_logprobs(h, policy.lm_head_weight.to(h.dtype), ids, 1.0, mask=mask,
                               bias=policy.lm_head_bias, backend=backend)              # (N, C)
    return -(lp * mask).sum() / mask.sum().clamp(min=1)


class SFTTrainer:
    """Cross-entropy on the answer (or reasoning + answer) of each record."""

    def __init__(self, policy, records, cfg, prompt_fn, prompt_style="nothink", seed=0, backend="auto",
                 dtype: str = "auto"):
        """``dtype``: the compute dtype (``model.dtype``); trained weights become fp32 masters."""
        if not records:
            raise ValueError("SFTTrainer: no training records")
        self.policy, self.records, self.cfg = policy, list(records), cfg
        self.prompt_fn, self.prompt_style, self.seed, self.backend = prompt_fn, prompt_style, seed, backend
        self.compute_dtype = resolve_compute_dtype(dtype, policy.device)
        check_trainable_compute(self.compute_dtype, "SFTTrainer")
        master_weights_(policy.model)
        o = cfg.optim
        self.optimizer = make_optimizer(policy.model, o.lr, o.weight_decay, o.betas)
        self.scheduler = make_scheduler(self.optimizer, o.warmup_steps, cfg.steps, o.schedule)
        self.step_idx, self.history = 0, []

    def step(self, label_fn=None) -> dict:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.step_idx)
        idx = torch.randint(len(self.records), (self.cfg.batch_size,), generator=g).tolist()
        prompts, recs = self.prompt_fn([self.records[i] for i in idx])
        letters = [label_fn(r, g) if label_fn else None for r in recs]
        targets = [answer_target(r, self.prompt_style, lt, self.cfg.target) for r, lt in zip(recs, letters)]
        enc = self.policy.encode(prompts)
        ids, mask = tokenize_targets(self.policy, targets)
        self.policy.model.train()
        with autocast(self.policy.device, self.compute_dtype):
            loss = sft_loss(self.policy, enc, ids, mask, self.backend, self.compute_dtype)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.cfg.optim.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_([p for p in self.policy.model.parameters() if p.grad is not None],
                                           self.cfg.optim.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.step_idx += 1
        return {"step": self.step_idx, "loss": loss.item()}

    def train(self, steps=None, time_budget_s=0.0, label_fn=None, progress=True, callback=None) -> list[dict]:
        steps = steps or self.cfg.steps
        bar = None
        if progress:
            from .progress import bar as progress_bar
            bar = progress_bar(steps, "sft", "step")
        t0 = time.perf_counter()
        for _ in range(steps):
            m = self.step(label_fn)
            if callback:
                m.update(callback(self) or {})
            self.history.append(m)
            if bar:
                bar.set_postfix(loss=f"{m['loss']:.3f}", refresh=False)
                bar.update(1)
            if time_budget_s and time.perf_counter() - t0 > time_budget_s:
                break
        if bar:
            bar.close()
        return self.history


def random_letter(record, generator) -> str:
    """label_fn for a format-only warm-up: a uniformly random option letter."""
    letters = list(record.options) or ["A", "B", "C", "D"]
    return letters[int(torch.randint(len(letters), (1,), generator=generator))]
