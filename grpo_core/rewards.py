"""Rewards: pure functions ``(completions: list[str], records: list[VQARecord]) -> list[float]``.

``records[i]`` is the record completion i answers (the trainer repeats each record G times).
Configs name rewards through ``get_reward(name, **kw)``: a built-in name (``REWARDS``) or your own
function as ``"package.module:function"`` or ``"path/to/file.py:function"`` (see
examples/custom_reward.py). ``check_reward_entries`` checks a config's reward list when it loads:
each name resolves, each option is a keyword of the function (with "did you mean"), none is
missing. ``combine_rewards`` builds the (N,) weighted sum plus one column per reward for logging;
a reward that declares the keyword ``completion_tokens`` receives each completion's token count
from the sampler (when the caller passes them), instead of re-counting text.

Parsing of completions (answer / think extraction, the format rules): grpo_core.answers.

Accuracy by ``record.answer_type``:
  - "mc": strict 1/0, the extracted text stripped and upper-cased equals the gold letter.
    Graded (``accuracy_graded``), exactly MedVLM-R1's ``accuracy_reward``: read the answer their
    way (``answers.extract_answer_medvlm``), UPPER-CASE it, collect the letters A–J; exactly one,
    equal to gold → 1.0 when nothing else is left once that letter is removed, 0.5 with extra
    text; otherwise 0. So for gold "A": "a" → 1.0, "(A)" → 0.5, "A is correct" → 0.0 (A, I, C, C,
    E are five letters), "A, because" → 0.0. Their code scores multiple-choice only; our
    accuracy_graded scores yes/no and open records as ``accuracy`` does (an extension), and with
    ``require_tag=False`` (no-tag "direct" template) reads the whole text where theirs gives 0.
  - "yesno": both sides normalised to yes/no (case, trailing punctuation, SLAKE's Chinese forms);
    "Yes, there is" is not a yes/no answer and scores 0.
  - "open": normalised exact match (lowercase, punctuation and articles removed, spaces collapsed)
    or token F1 (``open_metric="f1"``; CJK text is tokenised per character).

Overlong (DAPO, Yu et al. 2025, soft overlong punishment), L = completion length in tokens:
    r = 0 for L ≤ max_len − buffer;  (max_len − buffer − L) / buffer in between;  −1 for L ≥ max_len.

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

import difflib
import math
import re
import string
from collections import Counter
from dataclasses import dataclass
from functools import partial
from typing import Callable, Sequence

import torch

from . import rewards_plugins as plugins
from .answers import (  # noqa: F401  (parsers re-exported: rewards are where users look for them)
    FORMAT_NOTHINK_RE,
    FORMAT_RE,
    direct_letter,
    extract_answer,
    extract_answer_medvlm,
    extract_think,
    reasoning_length,
)
from .data.record import yes_no
from .rewards_judge import LLMJudgeReward
from .rewards_output import RewardError, call_reward, reward_column  # noqa: F401 (re-export)

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

def medvlm_letter_score(answer: str | None, gold: str | None) -> float:
    """MedVLM-R1's graded score of an extracted answer: 1.0 / 0.5 / 0 (module docstring)."""
    if answer is None or not gold:
        return 0.0
    gt = re.sub(r"\s+", "", gold.upper())
    text = answer.strip()
    letters = re.findall(r"[A-J]", text.upper())             # upper-cased first, as they do
    if len(letters) != 1 or letters[0] != gt:
        return 0.0
    leftover = re.sub("(?i)" + letters[0], "", text, count=1)
    return 0.5 if leftover.strip() else 1.0


def letter_score(answer: str | None, gold: str | None, graded: bool = False, lenient: bool = False) -> float:
    """Score an extracted answer against a gold letter (strict, MedVLM-R1 graded, or lenient)."""
    if answer is None or not gold:
        return 0.0
    if graded:
        return medvlm_letter_score(answer, gold)
    gold = gold.strip().upper()
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
    """SQuAD-style bag-of-tokens F1 between normalised answer and gold; linear time (Counter)."""
    a, g = _tokens(answer or ""), _tokens(gold or "")
    if not a or not g:
        return float(a == g)
    common = sum((Counter(a) & Counter(g)).values())
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
        if graded and require_tag:
            answer = extract_answer_medvlm(completion)          # MedVLM-R1's reading, for their score
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


def accuracy_graded_reward(completions, records, *, require_tag=True, open_metric="exact") -> list[float]:
    """MedVLM-R1's graded letter accuracy (1.0 / 0.5 / 0); yes/no and open as accuracy_reward."""
    return accuracy_reward(completions, records, graded=True, require_tag=require_tag, open_metric=open_metric)


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


def overlong_reward(completions, records=None, *, max_len: int, buffer: int, completion_tokens=None,
                    tokenizer=None) -> list[float]:
    """DAPO's soft overlong punishment: 0 up to max_len − buffer, linear to −1 at max_len, −1 beyond.

    L = ``completion_tokens[i]`` (the sampler's count; combine_rewards passes it when the trainer
    gives it), else tokenizer tokens of the text, else whitespace words (a rough stand-in).
    """
    if not 0 < buffer <= max_len:
        raise ValueError(f"overlong: need 0 < buffer <= max_len, got buffer={buffer}, max_len={max_len}")
    if completion_tokens is not None and len(completion_tokens) != len(completions):
        raise ValueError(f"overlong: {len(completion_tokens)} completion_tokens for {len(completions)} completions")
    lengths = completion_tokens if completion_tokens is not None else [_length(c, tokenizer, "completion")
                                                                        for c in completions]
    start = max_len - buffer
    return [max(-1.0, min(0.0, (start - int(L)) / buffer)) for L in lengths]


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


def combine_rewards(specs: Sequence[RewardSpec], completions, records, *,
                    completion_tokens: Sequence[int] | None = None,
                    step: int | None = None) -> tuple[torch.Tensor, dict]:
    """-> (total (N,) fp32 = Σ weight·column, {name: column (N,) fp32}).

    Each reward's return value is checked (grpo_core.rewards_output: N finite real numbers) and
    any error, raised inside the reward or about what it returned, names the reward and ``step``.
    ``completion_tokens`` (N,) ints, optional: each completion's token count from the sampler,
    passed on to the rewards that declare a ``completion_tokens`` keyword (e.g. overlong).
    """
    _check_pairs(completions, records, "combine_rewards")
    n = len(completions)
    if completion_tokens is not None:
        completion_tokens = [int(t) for t in completion_tokens]
        if len(completion_tokens) != n:
            raise ValueError(f"combine_rewards: {len(completion_tokens)} completion_tokens for {n} completions")
    total = torch.zeros(n, dtype=torch.float32)                         # (N,)
    columns = {}
    for spec in specs:
        if spec.name in columns:
            raise ValueError(f"combine_rewards: two rewards are named {spec.name!r}; names must be unique")
        context = ({"completion_tokens": completion_tokens}
                   if completion_tokens is not None and plugins.takes_keyword(spec.fn, "completion_tokens") else {})
        values = call_reward(spec.fn, spec.name, step, list(completions),
                             list(records) if records is not None else None, **context)
        col = reward_column(values, n, spec.name, step)                  # (N,)
        columns[spec.name] = col
        total += spec.weight * col
    return total, columns


def _judge(**kw):
    return LLMJudgeReward.from_kwargs(**kw)


REWARDS = {           # config name -> reward function (options: its keyword parameters)
    "format": format_reward,
    "format_nothink": format_nothink_reward,
    "accuracy": accuracy_reward,
    "accuracy_graded": accuracy_graded_reward,
    "ecr": ecr_reward,
    "cwr": cwr_reward,
    "cosine_length": cosine_length_reward,
    "overlong": overlong_reward,
    "semantic_judge": _judge,    # a factory: builds the judge (a model) from its options
}


DEFAULT_ROLES = {"accuracy": "accuracy", "accuracy_graded": "accuracy", "format": "format",
                 "format_nothink": "format"}   # a config entry may set its own `role:`


def _options(name: str, fn: Callable) -> tuple[tuple, tuple, bool]:
    if fn is _judge:               # from_kwargs' loading options + the judge's own (after model, tokenizer)
        load, _, _ = plugins.signature_options(LLMJudgeReward.from_kwargs, skip=0)
        own, _, _ = plugins.signature_options(LLMJudgeReward.__init__, skip=3)
        return load + own, (), False
    return plugins.signature_options(fn)


def _option_types(fn: Callable) -> dict:
    """{option: allowed types} of a reward (the judge: its loading and its own options)."""
    if fn is _judge:
        return {**plugins.option_types(LLMJudgeReward.from_kwargs, skip=0),
                **plugins.option_types(LLMJudgeReward.__init__, skip=3)}
    return plugins.option_types(fn)


def resolve_reward(name: str, where: str = "get_reward") -> Callable:
    """The function behind a config name: a built-in, or a 'module:function' spec."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"{where}: a reward name must be a non-empty string, got {name!r}")
    if name in REWARDS:
        return REWARDS[name]
    if ":" not in name:
        close = difflib.get_close_matches(name, REWARDS, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ValueError(f"{where}: unknown reward {name!r}; {hint}known rewards: {sorted(REWARDS)}, "
                         "or your own as 'package.module:function' / 'path/to/file.py:function'")
    return plugins.load_function(name, where)


def get_reward(name: str, **kw) -> Callable:
    """A reward function by config name (built-in or 'module:function'); keywords fix its options."""
    fn = resolve_reward(name)
    kw = plugins.coerce_options(kw, _option_types(fn), "get_reward", name)   # "1e-3" → 0.001
    if fn is _judge:
        return _judge(**kw)
    return partial(fn, **kw) if kw else fn


def check_reward_entries(entries: list[dict], where: str = "config: grpo.rewards") -> None:
    """Check a config's reward list when it loads (ValueError naming the entry index and key):
    a mapping with a name, a finite number as weight, a role among ROLES (optional), a name that
    resolves, options that are the function's keywords (did you mean), none missing, no two
    entries with the same name."""
    if not isinstance(entries, (list, tuple)) or not entries:
        raise ValueError(f"{where}: must be a non-empty list of {{name: ..., weight: ...}} entries, got {entries!r}")
    seen: dict[str, int] = {}
    for i, entry in enumerate(entries):
        at = f"{where}[{i}]"
        if not isinstance(entry, dict) or "name" not in entry:
            raise ValueError(f"{at}: must be a mapping with a name, like "
                             f"{{name: accuracy, weight: 1.0}}, got {entry!r}")
        name, weight = entry["name"], entry.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
            raise ValueError(f"{at}.weight: must be a finite number, got {weight!r}")
        if entry.get("role") is not None and entry["role"] not in ROLES:
            raise ValueError(f"{at}.role: {entry['role']!r} is not one of {ROLES} (or leave it out)")
        fn = resolve_reward(name, f"{at}.name")
        try:
            names, required, any_ok = _options(name, fn)
        except TypeError as e:
            raise ValueError(f"{at}.name: {name!r} {e}") from None
        options = {k: v for k, v in entry.items() if k not in plugins.ENTRY_KEYS}
        plugins.check_options(options, names, required, any_ok, at, name)
        plugins.coerce_options(options, _option_types(fn), at, name)        # scale: big → refused
        if fn is _judge and "model_path" not in options:
            raise ValueError(f"{at}: semantic_judge needs model_path (a local folder with the judge model)")
        if name in seen:
            raise ValueError(f"{at}.name: {name!r} is also entry {seen[name]}; each reward is one column, "
                             "so a name may appear once")
        seen[name] = i
