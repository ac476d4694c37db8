"""Rewards: pure functions ``(completions: list[str], records: list[VQARecord]) -> list[float]``.

``records[i]`` is the record completion i answers (the trainer repeats each record G times).
Configs name rewards through ``get_reward(name, **kw)``; ``combine_rewards`` builds the (N,)
weighted sum plus one column per reward for logging.

Parsing of completions (answer / think extraction, the format rules): grpo_core.answers.

Accuracy by ``record.answer_type``:
  - "mc": strict 1/0, the extracted text stripped and upper-cased equals the gold letter.
    Graded (MedVLM-R1): the capital letters A–J inside the extracted text; exactly one, equal to
    gold → 1.0 when the text is just that letter, 0.5 with extra text; otherwise 0 (lowercase
    letters are not counted there, as in MedVLM-R1).
  - "yesno": both sides normalised to yes/no (case, trailing punctuation, SLAKE's Chinese forms);
    "Yes, there is" is not a yes/no answer and scores 0.
  - "open": normalised exact match (lowercase, punctuation and articles removed, spaces collapsed)
    or token F1 (``open_metric="f1"``; CJK text is tokenised per character).

Length rewards (arXiv 2505.13973; the paper gives no closed form that we could read, so these are
our definitions). L = whitespace tokens of the ``<think>`` content (0 without one), or tokenizer
tokens when a tokenizer is given; L* = target length:
  - ECR (Extended Chain Reward):            r = min(L / L*, 1)            — unconditional.
  - CWR (Correctness-Weighted length Reward): r = 1[correct] · min(L / L*, 1).
  - cosine (Yeo et al. 2025, "Demystifying Long CoT"): with t = L, T = L_max,
        cos(t; a, b) = b + ½(a − b)(1 + cos(π t / T))     (a at t = 0, b at t = T)
        correct: cos(t; r0c, rLc)   wrong: cos(t; r0w, rLw)   t ≥ T: r_exceed
    Yeo's defaults r0c=2, rLc=1, r0w=−10, rLw=0, r_exceed=−10 (short correct and long wrong answers
    are favoured). Yeo measures the whole completion; we measure the reasoning by default
    (``measure="completion"`` switches).
"""

from __future__ import annotations

import math
import re
import string
from dataclasses import dataclass
from functools import partial
from typing import Callable, Sequence

import torch

from .answers import (  # noqa: F401  (parsers re-exported: rewards are where users look for them)
    FORMAT_NOTHINK_RE,
    FORMAT_RE,
    direct_letter,
    extract_answer,
    extract_think,
    reasoning_length,
)
from .data.record import yes_no

# ---------------------------------------------------------------------------------------------
# Format
# ---------------------------------------------------------------------------------------------

def format_reward(completions: Sequence[str], records=None) -> list[float]:
    """1.0 when the completion is exactly <think>…</think> <answer>…</answer>, else 0.0."""
    return [1.0 if FORMAT_RE.fullmatch(c) else 0.0 for c in completions]


def format_nothink_reward(completions: Sequence[str], records=None) -> list[float]:
    """1.0 when the completion is exactly <answer>…</answer>, else 0.0."""
    return [1.0 if FORMAT_NOTHINK_RE.fullmatch(c) else 0.0 for c in completions]


# ---------------------------------------------------------------------------------------------
# Accuracy
# ---------------------------------------------------------------------------------------------

def letter_score(answer: str | None, gold: str | None, graded: bool = False, lenient: bool = False) -> float:
    """Score an extracted answer against a gold letter (strict, MedVLM-R1 graded, or lenient)."""
    if answer is None or not gold:
        return 0.0
    gold = gold.strip().upper()
    if graded:
        letters = re.findall(r"[A-J]", answer)
        if len(letters) != 1 or letters[0] != gold:
            return 0.0
        return 1.0 if answer.strip() == gold else 0.5
    if lenient:                       # "(A)", "A.", "a)" — for the no-tag "direct" template
        letter = direct_letter(answer)
        return 1.0 if letter is not None and letter == gold else 0.0
    return 1.0 if answer.strip().upper() == gold else 0.0


def yesno_score(answer: str | None, gold: str | None) -> float:
    a, g = yes_no(answer), yes_no(gold)
    return 1.0 if a is not None and a == g else 0.0


_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = set(string.punctuation) | set("，。！？；：、（）《》“”‘’")


def normalize_open(text: str | None) -> str:
    """Lowercase, drop punctuation and English articles, collapse whitespace."""
    if text is None:
        return ""
    t = "".join(" " if ch in _PUNCT else ch for ch in str(text).lower())
    return " ".join(_ARTICLES.sub(" ", t).split())


def _tokens(text: str) -> list[str]:
    return re.findall(r"[\u3400-\u9fff]|[^\s\u3400-\u9fff]+", normalize_open(text))


def token_f1(answer: str | None, gold: str | None) -> float:
    """SQuAD-style bag-of-tokens F1 between normalised answer and gold."""
    a, g = _tokens(answer or ""), _tokens(gold or "")
    if not a or not g:
        return float(a == g)
    common = sum(min(a.count(t), g.count(t)) for t in set(a))
    if common == 0:
        return 0.0
    p, r = common / len(a), common / len(g)
    return 2 * p * r / (p + r)


def open_score(answer: str | None, gold: str | None, metric: str = "exact") -> float:
    if answer is None:
        return 0.0
    if metric == "f1":
        return token_f1(answer, gold)
    if metric != "exact":
        raise ValueError(f"open_metric must be 'exact' or 'f1', got {metric!r}")
    return 1.0 if normalize_open(answer) and normalize_open(answer) == normalize_open(gold) else 0.0


def score_one(completion: str, record, *, graded=False, require_tag=True, open_metric="exact") -> float:
    """Accuracy of one completion for one record, dispatching on record.answer_type."""
    answer = extract_answer(completion, require_tag=require_tag)
    if record.answer_type == "mc":
        return letter_score(answer, record.answer_letter, graded=graded, lenient=not require_tag)
    if record.answer_type == "yesno":
        return yesno_score(answer, record.answer_text)
    if record.answer_type == "open":
        return open_score(answer, record.answer_text, open_metric)
    raise ValueError(f"record {record.id}: unknown answer_type {record.answer_type!r} (mc | yesno | open)")


def accuracy_reward(completions, records, *, graded=False, require_tag=True, open_metric="exact") -> list[float]:
    """Per-completion accuracy (strict 1/0 for letters unless graded=True); see module docstring."""
    _check_pairs(completions, records, "accuracy")
    return [score_one(c, r, graded=graded, require_tag=require_tag, open_metric=open_metric)
            for c, r in zip(completions, records)]


def accuracy_graded_reward(completions, records, **kw) -> list[float]:
    """MedVLM-R1's graded letter accuracy (1.0 / 0.5 / 0); yes/no and open as accuracy_reward."""
    return accuracy_reward(completions, records, graded=True, **kw)


# ---------------------------------------------------------------------------------------------
# Length rewards (the study's ECR / CWR, and Yeo et al.'s cosine schedule)
# ---------------------------------------------------------------------------------------------

def _length(text: str, tokenizer, measure: str) -> int:
    if measure == "reasoning":
        return reasoning_length(text, tokenizer)
    if measure == "completion":
        return len(text.split()) if tokenizer is None else len(tokenizer(text, add_special_tokens=False)["input_ids"])
    raise ValueError(f"measure must be 'reasoning' or 'completion', got {measure!r}")


def ecr_reward(completions, records=None, *, target_len: int = 256, tokenizer=None, measure="reasoning") -> list[float]:
    """Extended Chain Reward: r = min(L / target_len, 1), whatever the answer."""
    if target_len <= 0:
        raise ValueError(f"ecr: target_len must be > 0, got {target_len}")
    return [min(_length(c, tokenizer, measure) / target_len, 1.0) for c in completions]


def cwr_reward(completions, records, *, target_len: int = 256, tokenizer=None, measure="reasoning",
               require_tag=True) -> list[float]:
    """Correctness-Weighted length Reward: r = 1[strictly correct] · min(L / target_len, 1)."""
    correct = accuracy_reward(completions, records, require_tag=require_tag)
    lengths = ecr_reward(completions, records, target_len=target_len, tokenizer=tokenizer, measure=measure)
    return [ln if ok == 1.0 else 0.0 for ok, ln in zip(correct, lengths)]


def cosine_length_reward(completions, records, *, max_len: int = 512, r0_correct=2.0, rL_correct=1.0,
                         r0_wrong=-10.0, rL_wrong=0.0, r_exceed=-10.0, tokenizer=None, measure="reasoning",
                         require_tag=True) -> list[float]:
    """Yeo et al. cosine length schedule: cos(t; a, b) = b + ½(a − b)(1 + cos(π t / max_len))."""
    if max_len <= 0:
        raise ValueError(f"cosine_length: max_len must be > 0, got {max_len}")
    correct = accuracy_reward(completions, records, require_tag=require_tag)
    out = []
    for c, ok in zip(completions, correct):
        t = _length(c, tokenizer, measure)
        if t >= max_len:
            out.append(float(r_exceed))
            continue
        a, b = (r0_correct, rL_correct) if ok == 1.0 else (r0_wrong, rL_wrong)
        out.append(b + 0.5 * (a - b) * (1.0 + math.cos(math.pi * t / max_len)))
    return out


# ---------------------------------------------------------------------------------------------
# Combining and naming
# ---------------------------------------------------------------------------------------------

def _check_pairs(completions, records, name):
    if records is not None and len(completions) != len(records):
        raise ValueError(f"{name}: {len(completions)} completions but {len(records)} records; "
                         "pass one record per completion (repeat each record G times)")


ROLES = ("accuracy", "format")     # what a reward measures, for the step's "accuracy" / "format_rate"


@dataclass
class RewardSpec:
    name: str                       # column name in logs / metrics
    fn: Callable                    # (completions, records) -> list[float]
    weight: float = 1.0             # multiplier in the total
    role: str | None = None         # "accuracy" | "format" | None: which summary metric it feeds


def combine_rewards(specs: Sequence[RewardSpec], completions, records) -> tuple[torch.Tensor, dict]:
    """-> (total (N,) fp32 = Σ weight·column, {name: column (N,) fp32}); NaN/inf is an error."""
    _check_pairs(completions, records, "combine_rewards")
    n = len(completions)
    total = torch.zeros(n, dtype=torch.float32)                         # (N,)
    columns = {}
    for spec in specs:
        if spec.name in columns:
            raise ValueError(f"combine_rewards: two rewards are named {spec.name!r}; names must be unique")
        values = spec.fn(list(completions), list(records) if records is not None else None)
        if len(values) != n:
            raise ValueError(f"reward {spec.name!r} returned {len(values)} values for {n} completions")
        col = torch.as_tensor([float(v) for v in values], dtype=torch.float32)   # (N,)
        bad = (~torch.isfinite(col)).nonzero().flatten().tolist()
        if bad:
            raise ValueError(f"reward {spec.name!r} returned NaN/inf at completions {bad[:8]} "
                             f"(values {[values[i] for i in bad[:4]]}); fix that reward function")
        columns[spec.name] = col
        total += spec.weight * col
    return total, columns


def _judge(**kw):
    from .rewards_judge import LLMJudgeReward
    return LLMJudgeReward.from_kwargs(**kw)


REWARDS = {
    "format": lambda **kw: partial(format_reward, **kw) if kw else format_reward,
    "format_nothink": lambda **kw: partial(format_nothink_reward, **kw) if kw else format_nothink_reward,
    "accuracy": lambda **kw: partial(accuracy_reward, **kw),
    "accuracy_graded": lambda **kw: partial(accuracy_graded_reward, **kw),
    "ecr": lambda **kw: partial(ecr_reward, **kw),
    "cwr": lambda **kw: partial(cwr_reward, **kw),
    "cosine_length": lambda **kw: partial(cosine_length_reward, **kw),
    "semantic_judge": _judge,
}


DEFAULT_ROLES = {"accuracy": "accuracy", "accuracy_graded": "accuracy", "format": "format",
                 "format_nothink": "format"}   # a config entry may set its own `role:`


def get_reward(name: str, **kw) -> Callable:
    """A reward function by config name; keyword arguments fix its options."""
    if name not in REWARDS:
        raise ValueError(f"unknown reward {name!r}; known rewards: {sorted(REWARDS)}")
    return REWARDS[name](**kw)
