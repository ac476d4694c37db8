"""An example reward plug-in: name it in a config, no change to grpo_core.

    grpo:
      rewards:
        - {name: accuracy, weight: 1.0}
        - {name: "examples/custom_reward.py:reasoning_mentions", weight: 0.2, words: [lesion, quadrant]}

A reward is a function ``(completions, records, *, options) -> list[float]``, one float per
completion; ``records[i]`` is the VQARecord completion i answers. The entry's keys other than
``name`` and ``weight`` are its keyword options, checked against this signature when the config
loads (a typo gets "did you mean"). Name it by file path (relative to where you run ``grpo``) or,
once it is importable, as "package.module:function". Declaring a ``completion_tokens`` keyword
gets you each completion's token count from the sampler.
"""

from __future__ import annotations

from grpo_core.answers import extract_think


def reasoning_mentions(completions, records, *, words: list, per_word: float = 1.0, cap: float = 1.0) -> list[float]:
    """per_word for each of ``words`` that the <think> reasoning mentions (case-insensitive), at most cap.

    E.g. words=[lesion, quadrant], per_word=0.5: "the lesion is in the upper left quadrant" → 1.0,
    "a bright spot" → 0.0, no <think> block → 0.0.
    """
    if not words:
        raise ValueError("reasoning_mentions: give at least one word (words: [lesion, ...])")
    wanted = [str(w).lower() for w in words]
    out = []
    for text in completions:
        think = (extract_think(text) or "").lower()
        out.append(min(cap, per_word * sum(w in think for w in wanted)))
    return out
