"""What a reward returns, checked before it becomes a column of the step's rewards.

A reward is ``fn(completions, records, **options) -> N real numbers``, one per completion. Python
coerces too much on its own: ``float(True)`` is 1.0, ``float("0.5")`` is 0.5 and a dict
``{i: 0.5}`` iterates over its KEYS (0, 1, ..., N−1), so a wrong return type would train on
garbage with exit code 0. ``reward_column`` accepts exactly

    a list / tuple / 1-D torch tensor / 1-D numpy array of N finite real numbers (int or float,
    numpy / 0-d tensor scalars included; bool, str, None, nested sequences refused)

and ``call_reward`` runs the function, so that every error (a bad return value, or an exception
raised inside the reward, with the file:line it came from) starts with ``step S: reward 'name'``.
"""

from __future__ import annotations

import math
import numbers
import traceback
from typing import Callable

import torch


class RewardError(ValueError):
    """A reward function failed or returned something that is not N finite real numbers."""


def _where(name: str, step: int | None) -> str:
    return (f"step {step}: " if step is not None else "") + f"reward {name!r}"


def _raised_at(exc: BaseException) -> str:
    """'file:line' of the innermost frame of ``exc`` (where the reward's code raised it)."""
    frames = traceback.extract_tb(exc.__traceback__)
    return f" (at {frames[-1].filename}:{frames[-1].lineno})" if frames else ""


def call_reward(fn: Callable, name: str, step: int | None, *args, **kw):
    """``fn(*args, **kw)``; an exception inside it becomes a RewardError naming reward and step."""
    try:
        return fn(*args, **kw)
    except RewardError:
        raise
    except Exception as e:  # noqa: BLE001  (a user's function: any error, named, cause kept)
        raise RewardError(
            f"{_where(name, step)} raised {type(e).__name__}: {e}{_raised_at(e)}; "
            "fix that reward function (in Python, the error's __cause__ holds its traceback)"
        ) from e


def _as_list(values, where: str) -> list:
    """The returned container as a flat Python list, or RewardError saying what it is."""
    if isinstance(values, torch.Tensor) or type(values).__module__ == "numpy":
        if getattr(values, "ndim", None) != 1:
            raise RewardError(
                f"{where} returned a {type(values).__name__} of shape {tuple(values.shape)}; "
                "return a 1-D list of N numbers, one per completion"
            )
        if str(values.dtype).endswith("bool"):
            raise RewardError(
                f"{where} returned booleans ({values.dtype}); return numbers (e.g. 1.0 / 0.0)"
            )
        return values.tolist()
    if isinstance(values, (list, tuple)):
        return list(values)
    what = (
        "None (a missing return?)"
        if values is None
        else f"a {type(values).__name__} {_short(values)}"
    )
    hint = " (a dict is read by its keys, not its values)" if isinstance(values, dict) else ""
    raise RewardError(
        f"{where} returned {what}{hint}; return a list of N numbers, one per completion"
    )


def _short(v) -> str:
    text = repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


def _is_real(v) -> bool:
    if isinstance(v, torch.Tensor):
        return v.ndim == 0 and not v.dtype.is_complex and v.dtype != torch.bool
    return isinstance(v, numbers.Real) and not isinstance(v, bool)  # numpy's bool is no Real


def _float(v) -> float:
    try:
        return float(v)
    except OverflowError:  # a Python int beyond float's range (10**400)
        return math.inf


def reward_column(values, n: int, name: str, step: int | None = None) -> torch.Tensor:
    """A reward's return value → (n,) fp32 column; RewardError naming the reward, step and index."""
    where = _where(name, step)
    vals = _as_list(values, where)
    if len(vals) != n:
        raise RewardError(
            f"{where} returned {len(vals)} values for {n} completions; return one per completion"
        )
    bad = [i for i, v in enumerate(vals) if not _is_real(v)]
    if bad:
        i = bad[0]
        raise RewardError(
            f"{where} returned a {type(vals[i]).__name__} at completion {i} ({_short(vals[i])}; "
            f"{len(bad)} of {n} are not real numbers); return int or float values (no bool, str, "
            "None or nested lists)"
        )
    floats = [_float(v) for v in vals]
    bad = [i for i, v in enumerate(floats) if not math.isfinite(v)]
    if bad:
        raise RewardError(
            f"{where} returned NaN/inf at completions {bad[:8]} (values "
            f"{[floats[i] for i in bad[:4]]}); fix that reward function"
        )
    return torch.tensor(floats, dtype=torch.float32)  # (n,)
