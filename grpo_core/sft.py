"""Supervised fine-tuning baseline on the same records, prompts, policy and eval as GRPO.

    loss = −(1/Σ|y_i|) Σ_i Σ_t log π(y_it | prompt_i, y_i<t)        (token-mean cross-entropy)

computed with the same fused linear log-prob kernel as the GRPO loss (no full logits), so the
GRPO-vs-SFT comparison of the study differs only in the objective. Targets:
  - "answer":    "<answer>X</answer>" (or the bare letter for the "direct" prompt) + EOS
  - "reasoning": "<think>{record.extra['reasoning']}</think><answer>X</answer>" + EOS
A format-only warm-up (teaches the answer format, not the answer) trains on records whose answers
are random: ``random_answer_prompt_fn`` wraps the prompt function (``random_answer``, one record).
``SFTTrainer.train`` runs under the run harness (grpo_core.harness): with a run.output_dir it
writes metrics.jsonl and checkpoints and resumes like GRPO.
"""

from __future__ import annotations

import dataclasses

import torch

from .checkpoint import load_checkpoint, save_checkpoint
from .config import SFT_TARGETS, RunConfig  # noqa: F401  (SFT_TARGETS re-exported)
from .harness import no_output, run_training
from .kernels import linear_token_logprobs
from .optim import make_optimizer, make_scheduler
from .precision import (
    autocast,
    check_trainable_compute,
    compute_cast,
    master_weights_,
    resolve_compute_dtype,
)
from .resume import set_base_lr

WARMUP_REASONING = "I look at the image."   # names no option: the letter is the only decision


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
        self.autocast = autocast(policy.device, self.compute_dtype)   # the step's and the evals' dtype
        o = cfg.optim
        self.optimizer = make_optimizer(policy.model, o.lr, o.weight_decay, o.betas)
        self.scheduler = make_scheduler(self.optimizer, o.lr_warmup_steps, cfg.steps, o.schedule)
        self.step_idx, self.history = 0, []

    def step(self) -> dict:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.step_idx)
        idx = torch.randint(len(self.records), (self.cfg.batch_size,), generator=g).tolist()
        prompts, recs = self.prompt_fn([self.records[i] for i in idx])
        targets = [answer_target(r, self.prompt_style, None, self.cfg.target) for r in recs]
        enc = self.policy.encode(prompts)
        ids, mask = tokenize_targets(self.policy, targets)
        self.policy.model.train()
        with self.autocast:
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

    # ---- the loop: grpo_core.harness -------------------------------------------------------------
    def train(self, run=None, *, progress: bool = True, config: dict | None = None,
              eval_fn=None) -> list[dict]:
        """``cfg.steps`` steps under the run harness. ``run`` (a RunConfig): with an output_dir,
        checkpoints every ``run.save_every`` steps and at the end, metrics.jsonl and resume, as
        for GRPO (``config``: the resolved config, compared on resume); None = write nothing
        (the format warm-up), with a progress bar when ``progress``."""
        run = run if run is not None else no_output(RunConfig(progress=progress))
        self.output_dir, self.keep_last, self.run_config = run.output_dir, run.keep_last, config
        return run_training(self, run, self.cfg.steps, name="sft", config=config, eval_fn=eval_fn,
                            save_at_end=True)

    def save(self) -> str:
        """Checkpoint step ``step_idx`` in ``output_dir`` (the harness calls it; layout:
        grpo_core.checkpoint)."""
        return save_checkpoint(self.output_dir, self.step_idx, self.policy, self.optimizer,
                               self.scheduler, {"data_pos": 0}, keep_last=self.keep_last,
                               config=self.run_config)

    def resume(self, path: str, verify: bool = True) -> None:
        """Continue checkpoint ``path``: weights, optimizer, schedule and step (every draw of step
        k is seeded by (seed, k), so nothing else is needed); a changed ``optim.lr`` applies."""
        state = load_checkpoint(path, self.policy, self.optimizer, self.scheduler, verify=verify)
        set_base_lr(self.optimizer, self.scheduler, self.cfg.optim.lr)
        self.step_idx = int(state["step"])


# ---- random answers: the format warm-up's targets ------------------------------------------------
def random_answer(record, pool, g: torch.Generator):
    """A copy of ``record`` whose gold answer is random and whose ``extra["reasoning"]`` is the
    fixed ``WARMUP_REASONING`` (for the "think" template; docs/DECISIONS.md §10):

        mc:   a uniformly random option letter          yesno:  yes or no at random
        open: the gold answer of another random record of ``pool`` (never this record's own)
    """
    def pick(n):
        return int(torch.randint(n, (1,), generator=g))

    if record.answer_type == "mc" and record.options:
        letter = list(record.options)[pick(len(record.options))]
        new = dict(answer_letter=letter, answer_text=record.options[letter])
    elif record.answer_type == "yesno":
        new = dict(answer_text=("yes", "no")[pick(2)])
    else:
        others = [r for r in pool if r.answer_text and r.answer_text != record.answer_text]
        others = others or [record]
        new = dict(answer_text=others[pick(len(others))].answer_text)
    return dataclasses.replace(record, extra=dict(record.extra, reasoning=WARMUP_REASONING), **new)


def random_answer_prompt_fn(prompt_fn, records, seed: int):
    """Wrap a trainer prompt function: prompts unchanged, the records it returns carry random
    answers (``random_answer``), drawn from a generator seeded by ``seed``."""
    g = torch.Generator().manual_seed(seed * 7_919 + 11)

    def fn(batch):
        prompts, shown = prompt_fn(batch)
        return prompts, [random_answer(r, records, g) for r in shown]
    return fn
