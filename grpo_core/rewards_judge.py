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
  - The cost is bounded in tokens, not words (one 32k-character "word" is thousands of tokens):
    the reasoning keeps its first ``max_reasoning_words`` words and then its first
    ``max_reasoning_tokens`` tokens, the answer its first ``max_answer_tokens`` tokens, and a prompt
    still longer than ``max_prompt_tokens`` (a very long question) keeps its LAST tokens, where the
    judge is asked for Yes/No (the few-token tail decides the score).
  - Checked early: the template when the judge is built (placeholders among {question},
    {options}, {reasoning}, {answer}, with {question} and {reasoning} required: ``check_template``);
    at every call, the judge's logits shape against the Yes/No ids and their finiteness — a NaN/inf
    logit is an error, never a silent 0.
"""

from __future__ import annotations

import difflib
import string
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


PLACEHOLDERS = ("question", "options", "reasoning", "answer")


def check_template(template: str) -> None:
    """The judge prompt template: {question} and {reasoning} present, no other placeholder than
    PLACEHOLDERS (with "did you mean"), no positional {} — a clear error at construction instead of a
    KeyError at the first call."""
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as e:
        raise ValueError(f"LLMJudgeReward: prompt_template is not a valid format string ({e}); "
                         "write a literal brace as {{ or }}") from None
    for f in fields:
        base = f.split(".")[0].split("[")[0]
        if base not in PLACEHOLDERS:
            close = difflib.get_close_matches(base, PLACEHOLDERS, n=1)
            hint = f" (did you mean {{{close[0]}}}?)" if close else ""
            raise ValueError(f"LLMJudgeReward: prompt_template has the placeholder {{{f}}}{hint}; allowed: "
                             f"{', '.join('{' + p + '}' for p in PLACEHOLDERS)} (a literal brace is {{{{ or }}}})")
    for key in ("question", "reasoning"):
        if key not in fields:
            raise ValueError(f"LLMJudgeReward: prompt_template must contain {{{key}}}")


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
                 batch_size: int = 8, yes_token: str = " Yes", no_token: str = " No", max_reasoning_words: int = 400,
                 max_reasoning_tokens: int = 512, max_answer_tokens: int = 64, max_prompt_tokens: int = 2048):
        if mode not in ("binary", "prob"):
            raise ValueError(f"LLMJudgeReward: mode must be 'binary' or 'prob', got {mode!r}")
        for key, v in (("batch_size", batch_size), ("max_reasoning_words", max_reasoning_words),
                       ("max_reasoning_tokens", max_reasoning_tokens), ("max_answer_tokens", max_answer_tokens),
                       ("max_prompt_tokens", max_prompt_tokens)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"LLMJudgeReward: {key} must be an integer >= 1, got {v!r}")
        check_template(prompt_template)
        self.model, self.tokenizer = model.eval(), tokenizer
        self.prompt_template, self.mode, self.batch_size = prompt_template, mode, batch_size
        self.max_reasoning_words, self.max_reasoning_tokens = max_reasoning_words, max_reasoning_tokens
        self.max_answer_tokens, self.max_prompt_tokens = max_answer_tokens, max_prompt_tokens
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
            model = AutoModelForCausalLM.from_pretrained(model_path, local_files_only=True,
                                                         dtype=dtype or torch.float32)
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
        reasoning = self._first_tokens(" ".join(think.split()[: self.max_reasoning_words]), self.max_reasoning_tokens)
        answer = self._first_tokens(extract_answer(completion) or "(none)", self.max_answer_tokens)
        options = "".join(f"{L}) {t}\n" for L, t in (getattr(record, "options", None) or {}).items())
        return self.prompt_template.format(
            question=getattr(record, "question", ""), options=options, reasoning=reasoning, answer=answer,
        )

    def _first_tokens(self, text: str, k: int) -> str:
        """``text`` cut to its first k tokens of the judge's tokenizer (unchanged when shorter)."""
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        return text if len(ids) <= k else self.tokenizer.decode(ids[:k])

    def _logits_of(self, out) -> torch.Tensor:
        """The judge model's output → its logits tensor; a clear error for a tuple or anything else
        without ``.logits`` (a model called with return_dict=False, or a custom judge)."""
        logits = getattr(out, "logits", None)
        if not isinstance(logits, torch.Tensor):
            raise ValueError(f"LLMJudgeReward: the judge model returned a {type(out).__name__}, "
                             "not an output with a .logits tensor; use a transformers causal LM "
                             "with return_dict=True (the default), or wrap your model so that "
                             "model(...).logits is (b, T, V)")
        return logits

    def _logits_yes_no(self, logits: torch.Tensor, b: int) -> torch.Tensor:
        """Last-position logits (b, V') → (b, 2) [yes, no], checked: shape and finiteness."""
        need = max(self.yes_id, self.no_id) + 1
        if logits.dim() != 3 or logits.shape[0] != b or logits.shape[-1] < need:
            raise ValueError(f"LLMJudgeReward: the judge returned logits of shape {tuple(logits.shape)} for a batch of "
                             f"{b}; expected ({b}, T, V) with V >= {need} "
                             f"(the Yes/No ids are {self.yes_id}/{self.no_id}): "
                             "is the tokenizer the judge model's own?")
        yn = logits[:, -1, [self.yes_id, self.no_id]].float()                         # (b, 2)
        bad = (~torch.isfinite(yn)).any(-1).nonzero().flatten().tolist()
        if bad:
            raise ValueError(f"LLMJudgeReward: non-finite Yes/No logits {yn[bad[0]].tolist()} for prompt {bad[0]} of "
                             f"this batch ({len(bad)} of {b}); the judge model overflowed or is broken (check its "
                             "dtype: fp16 overflows easily, try float32 or bfloat16)")
        return yn

    @torch.no_grad()
    def score_prompts(self, prompts: Sequence[str]) -> torch.Tensor:
        """P(yes) / (P(yes) + P(no)) for each prompt → (M,) fp32 on CPU."""
        device = next(self.model.parameters()).device
        out = []
        for s in range(0, len(prompts), self.batch_size):
            ids = [self.tokenizer.encode(p, add_special_tokens=False)[-self.max_prompt_tokens:]   # keep the tail
                   for p in prompts[s: s + self.batch_size]]
            T = max(len(x) for x in ids)
            input_ids = torch.full((len(ids), T), self.pad_id, dtype=torch.long)     # (b, T) left-padded
            mask = torch.zeros((len(ids), T), dtype=torch.long)                       # (b, T)
            for i, x in enumerate(ids):
                input_ids[i, T - len(x):] = torch.tensor(x)
                mask[i, T - len(x):] = 1
            position_ids = (mask.cumsum(-1) - 1).clamp(min=0)                         # (b, T)
            res = self.model(input_ids=input_ids.to(device), attention_mask=mask.to(device),
                             position_ids=position_ids.to(device))
            logits = self._logits_of(res)                                             # (b, T, V)
            yn = self._logits_yes_no(logits, len(ids))                                        # (b, 2)
            out.append(torch.sigmoid(yn[:, 0] - yn[:, 1]).cpu())                              # (b,)
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
