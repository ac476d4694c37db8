"""Reading a completion: the answer, the reasoning, and whether the format is right.

Shared by the rewards, the LLM judge and eval, so all three read a completion the same way.

Exactly:
  - ``extract_answer(text)``: the stripped content of the FIRST ``<answer>…</answer>`` pair, tags
    matched case-insensitively, content across newlines; a pair whose content holds another
    ``<answer>`` opening is skipped in favour of the inner pair, so ``<answer><answer>A</answer>``
    gives "A". No complete pair → None (or, with ``require_tag=False``, the whole stripped text:
    Med-R1's fallback, used for the "direct" template).
  - ``extract_think(text)``: the same for ``<think>…</think>``; None when absent.
  - Format (strict, case-sensitive tags): the whole completion, surrounding whitespace allowed,
    must be ``<think>T</think>`` + whitespace + ``<answer>A</answer>`` where T and A contain no
    ``<think>``, ``</think>``, ``<answer>`` or ``</answer>``; T and A may be empty. The no-think
    variant is ``<answer>A</answer>`` alone. Stricter than Med-R1's regex, whose non-greedy ``.*?``
    under a full match still accepts repeated blocks (``…</answer> junk <answer>…``).
  - ``direct_letter(text)``: for the no-tag "direct" template, a bare option letter with optional
    brackets and trailing punctuation ("A", "(b)", "C.", "[D]:"), upper-cased; None otherwise.
  - ``extract_answer_medvlm(text)``: MedVLM-R1's reading (their ``accuracy_reward``): from the first
    ``<answer>`` to the first ``</answer>`` after it (tags case-insensitive), stripped, nested
    openings included: ``<answer><answer>A</answer>`` gives "<answer>A". None without a pair.
    Used only by the graded accuracy that reproduces their score.
"""

from __future__ import annotations

import re

_NO_TAG = r"(?:(?!</?think>|</?answer>).)*"
FORMAT_RE = re.compile(rf"\s*<think>{_NO_TAG}</think>\s*<answer>{_NO_TAG}</answer>\s*", re.DOTALL)
FORMAT_NOTHINK_RE = re.compile(rf"\s*<answer>{_NO_TAG}</answer>\s*", re.DOTALL)
_ANSWER_RE = re.compile(r"<answer>((?:(?!<answer>).)*?)</answer>", re.DOTALL | re.IGNORECASE)
_OPEN_RE, _CLOSE_RE = re.compile("<answer>", re.IGNORECASE), re.compile("</answer>", re.IGNORECASE)
_THINK_RE = re.compile(r"<think>((?:(?!<think>).)*?)</think>", re.DOTALL | re.IGNORECASE)
_DIRECT_LETTER = re.compile(r"[(\[]?\s*([A-Ja-j])\s*[)\]]?\s*[.:]?")


def extract_answer(text: str, require_tag: bool = True) -> str | None:
    """Stripped content of the first complete <answer>…</answer> pair (see module docstring)."""
    m = _ANSWER_RE.search(text)
    if m:
        return m.group(1).strip()
    return None if require_tag else text.strip()


def extract_answer_medvlm(text: str) -> str | None:
    """MedVLM-R1's reading: first <answer> to the first </answer>, stripped (module docstring).

    Their regex ``<answer>(.*?)</answer>`` as two linear scans: when the first opening has no
    closing after it, no later one has; the regex retried from every opening (quadratic: 32-39 s
    on 125k characters of unclosed ``<answer>``, 0.002 s now)."""
    start = _OPEN_RE.search(text)
    end = _CLOSE_RE.search(text, start.end()) if start else None
    return text[start.end(): end.start()].strip() if end else None


def extract_think(text: str) -> str | None:
    """Content of the first complete <think>…</think> pair, unstripped; None when absent."""
    m = _THINK_RE.search(text)
    return m.group(1) if m else None


def reasoning_length(text: str, tokenizer=None) -> int:
    """Length of the <think> content: whitespace tokens, or tokenizer tokens if one is given."""
    think = extract_think(text)
    if not think or not think.strip():
        return 0
    if tokenizer is None:
        return len(think.split())
    return len(tokenizer(think.strip(), add_special_tokens=False)["input_ids"])


def direct_letter(text: str | None) -> str | None:
    """The option letter of a bare "direct"-template answer ("(b)" → "B"), or None."""
    if text is None:
        return None
    m = _DIRECT_LETTER.fullmatch(text.strip())
    return m.group(1).upper() if m else None
