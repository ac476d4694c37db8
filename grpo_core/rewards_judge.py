"""Medical semantic-alignment reward: a local causal LM judges whether the reasoning is sound.

The study (arXiv 2505.13973) adds a reward from a medical LLM (BioGPT / BioMistral style) that says
whether the model's reasoning is clinically sound (1) or not (0). Here the judge reads

    prompt_template.format(question=..., options=..., reasoning=<think> content, answer=...)

and we compare its next-token logits for the "Yes" and "No" tokens at the end of the prompt:

    p = P(yes) / (P(yes) + P(no)) = sigmoid(logit_yes − logit_no)
    mode="prob":   r = p
    mode="binary": r = 1 if p > 0.5 else 0   (the judge's argmax between the two words)

Deviations / choices:
  - Scoring, not generation: one forward pass, deterministic, no parsing of free text.
  - A completion without a ``<think>`` block (or with an empty one) scores 0 without a judge call:
    there is no reasoning to judge.
  - Batches are left-padded with explicit position ids (cumsum of the mask), so a prompt scores
    the same alone or in a batch (up to float rounding).
  - The reasoning is cut to ``max_reasoning_words`` words (its start is kept) to bound the cost.
"""

from __future__ import annotations

from typing import Sequence

import torch

from .answers import extract_answer, extract_think

DEFAULT_JUDGE_TEMPLATE = (
    "You are a medical expert checking a student's reasoning about a medical image question.\n"
    "Question: {question}\n"
    "{options}"
    "Student's reasoning: {reasoning}\n"
    "Student's answer: {answer}\n"
    "Is the reasoning clinically sound and does it support the answer? Reply Yes or No.\n"
    "Reply:"
)


def single_token_id(tokenizer, word: str) -> int:
    """The id of ``word`` as ONE token of this tokenizer; a clear error otherwise."""
    ids = tokenizer.encode(word, add_special_tokens=False)
    if len(ids) != 1:
        raise ValueError(
            f"LLMJudgeReward: {word!r} is {len(ids)} tokens {ids} for this tokenizer, not one; "
            "pass yes_token=/no_token= strings that are single tokens (try 'Yes'/'No' or ' Yes'/' No')"
        )
    return int(ids[0])


class LLMJudgeReward:
    """Reward fn ``(completions, records) -> list[float]`` backed by a local causal LM judge."""

    def __init__(self, model, tokenizer, prompt_template: str = DEFAULT_JUDGE_TEMPLATE, mode: str = "binary",
                 batch_size: int = 8, yes_token: str = " Yes", no_token: str = " No", max_reasoning_words: int = 400):
        if mode not in ("binary", "prob"):
            raise ValueError(f"LLMJudgeReward: mode must be 'binary' or 'prob', got {mode!r}")
        if batch_size < 1:
            raise ValueError(f"LLMJudgeReward: batch_size must be >= 1, got {batch_size}")
        for key in ("{question}", "{reasoning}"):
            if key not in prompt_template:
                raise ValueError(f"LLMJudgeReward: prompt_template must contain {key}")
        self.model, self.tokenizer = model.eval(), tokenizer
        self.prompt_template, self.mode, self.batch_size = prompt_template, mode, batch_size
        self.max_reasoning_words = max_reasoning_words
        self.yes_id, self.no_id = single_token_id(tokenizer, yes_token), single_token_id(tokenizer, no_token)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.pad_id = int(pad) if pad is not None else 0

    @classmethod
    def from_kwargs(cls, model=None, tokenizer=None, model_path: str | None = None, device=None, dtype=None, **kw):
        """Build from a live (model, tokenizer) or a local checkpoint folder (no hub download)."""
        if model is None:
            if model_path is None:
                raise ValueError("semantic_judge: pass model= and tokenizer=, or model_path= (a local folder)")
            from transformers import AutoModelForCausalLM, AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(model_path, local_files_only=True)
            model = AutoModelForCausalLM.from_pretrained(model_path, local_files_only=True, dtype=dtype or torch.float32)
            if device is not None:
                model = model.to(device)
        if tokenizer is None:
            raise ValueError("semantic_judge: a model was given without its tokenizer")
        return cls(model, tokenizer, **kw)

    def build_prompt(self, completion: str, record) -> str | None:
        """The judge prompt for one completion, or None when there is no reasoning to judge."""
        think = extract_think(completion)
        if think is None or not think.strip():
            return None
        words = think.split()
        reasoning = " ".join(words[: self.max_reasoning_words])
        options = "".join(f"{L}) {t}\n" for L, t in (getattr(record, "options", None) or {}).items())
        return self.prompt_template.format(
            question=getattr(record, "question", ""), options=options, reasoning=reasoning,
            answer=extract_answer(completion) or "(none)",
        )

    @torch.no_grad()
    def score_prompts(self, prompts: Sequence[str]) -> torch.Tensor:
        """P(yes) / (P(yes) + P(no)) for each prompt → (M,) fp32 on CPU."""
        device = next(self.model.parameters()).device
        out = []
        for s in range(0, len(prompts), self.batch_size):
            ids = [self.tokenizer.encode(p, add_special_tokens=False) for p in prompts[s: s + self.batch_size]]
            T = max(len(x) for x in ids)
            input_ids = torch.full((len(ids), T), self.pad_id, dtype=torch.long)     # (b, T) left-padded
            mask = torch.zeros((len(ids), T), dtype=torch.long)                       # (b, T)
            for i, x in enumerate(ids):
                input_ids[i, T - len(x):] = torch.tensor(x)
                mask[i, T - len(x):] = 1
            position_ids = (mask.cumsum(-1) - 1).clamp(min=0)                         # (b, T)
            logits = self.model(input_ids=input_ids.to(device), attention_mask=mask.to(device),
                                position_ids=position_ids.to(device)).logits[:, -1].float()   # (b, V)
            out.append(torch.sigmoid(logits[:, self.yes_id] - logits[:, self.no_id]).cpu())  # (b,)
        return torch.cat(out) if out else torch.zeros(0)

    def __call__(self, completions: Sequence[str], records) -> list[float]:
        if records is None or len(records) != len(completions):
            raise ValueError("semantic_judge: needs one record per completion (the question is part of the prompt)")
        prompts = [self.build_prompt(c, r) for c, r in zip(completions, records)]
        todo = [i for i, p in enumerate(prompts) if p is not None]
        rewards = [0.0] * len(completions)
        if todo:
            p = self.score_prompts([prompts[i] for i in todo])                        # (M,)
            vals = p if self.mode == "prob" else (p > 0.5).float()
            for i, v in zip(todo, vals.tolist()):
                rewards[i] = float(v)
        return rewards
