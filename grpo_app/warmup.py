"""Format warm-up: teach the answer format, not the answer, before GRPO (config section ``warmup``).

A tiny random model never writes ``<answer>X</answer>`` by chance, so every reward is 0, every
group has zero spread and GRPO's gradient is exactly 0. The warm-up is a short SFT on targets in
the prompt's format whose *answers are random* (``grpo_core.sft.random_answer_prompt_fn``, the one
random-answer mechanism, also what the Python API example uses):

    direct:   "C"
    nothink:  "<answer>C</answer>"
    think:    "<think>I look at the image.</think><answer>C</answer>"

    mc:     a uniformly random option letter          yesno:  yes or no at random
    open:   the gold answer of another random record  (never this record's own answer)

So after the warm-up the policy answers in format at chance accuracy (25 % on the four-option
synthetic task): whatever it learns later about the images comes from the reward.

For "think" the warm-up's reasoning is one fixed sentence that names nothing (``WARMUP_REASONING``),
so the answer letter is the one decision. A sentence naming the chosen option ("The image shows
upper left.") was the first design and did not learn: after 150 (and 600) warm-up steps the tiny
model's letter agreed with the option its reasoning named only 22 % (20 %) of the time, i.e. at
chance, so the named words were noise the reward could not credit, and GRPO stayed at chance for
1,250 steps. With the fixed sentence GRPO leaves chance after ~1,200 steps (docs/DECISIONS.md §10).
SFT on gold answers (``with_reasoning``) and the tiny judge (``grpo_app.judge``) keep a sentence
that names the answer (``GOLD_REASONING``). Longer or shorter reasoning (what ECR and CWR reward)
comes from the policy's own sampling. The demo uses the same warm-up (``run_demo``).

Used by ``grpo train`` (``warmup.steps > 0``, skipped when a checkpoint is resumed), the study
(once per seed, then copied to every setting) and the demo.
"""

from __future__ import annotations

import dataclasses
import time

from grpo_core.config import OptimConfig, SFTConfig, TrainConfig
from grpo_core.sft import WARMUP_REASONING, random_answer, random_answer_prompt_fn  # noqa: F401

GOLD_REASONING = "The image shows {a}."     # names the answer: SFT targets, the judge's "sound" reasoning


def with_reasoning(records) -> list:
    """Records without ``extra["reasoning"]`` get ``GOLD_REASONING``, a sentence naming their gold answer
    (for ``sft.target: reasoning`` on data that carries no reasoning, e.g. the synthetic task)."""
    return [r if (r.extra or {}).get("reasoning") else
            dataclasses.replace(r, extra=dict(
                r.extra, reasoning=GOLD_REASONING.format(a=r.answer_text or r.answer_letter)))
            for r in records]


def warmup_sft_config(cfg: TrainConfig) -> SFTConfig:
    """The SFT options of the warm-up: the ``warmup`` section, targets in the prompt's format."""
    w = cfg.warmup
    return SFTConfig(target="reasoning" if cfg.data.prompt == "think" else "answer", steps=w.steps,
                     batch_size=w.batch_size, optim=OptimConfig(lr=w.lr, max_grad_norm=1.0))


def format_warmup(policy, records, cfg: TrainConfig, progress: bool = False) -> dict:
    """Run ``cfg.warmup.steps`` SFT steps on random answers in place; returns its loss curve ends.

    Deterministic in ``cfg.run.seed``: every rank of a data-parallel job computes the same weights.
    """
    from grpo_core.data import make_prompt_fn
    from grpo_core.sft import SFTTrainer

    if cfg.warmup.steps < 1:
        raise ValueError("format_warmup: warmup.steps is 0; set warmup.steps > 0 to warm up")
    seed = cfg.run.seed
    prompt_fn = random_answer_prompt_fn(make_prompt_fn(cfg.data.prompt, cfg.data.shuffle_options, seed), records, seed)
    t0 = time.perf_counter()
    hist = SFTTrainer(policy, records, warmup_sft_config(cfg), prompt_fn, cfg.data.prompt, seed,
                      dtype=cfg.model.dtype).train(progress=progress)
    return {"steps": len(hist), "loss_first": hist[0]["loss"], "loss_last": hist[-1]["loss"],
            "seconds": time.perf_counter() - t0}
