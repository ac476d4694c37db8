"""Declared options: a dataclass field carries its own allowed values, checked in one place.

    temperature: float = option(1.0, gt=0)                 # T: logits / T before softmax
    agg: str = option("token_mean", choices=AGGS)         # AGGS defined once, in loss.py

``check_options(obj, where)`` checks every field of a dataclass instance against what its field
declares (``choices``, ``gt``/``ge``/``lt``/``le`` bounds, finiteness of every float, the length of
a tuple; a value under bounds must be a number: a string inside ``optim.betas`` is refused) and
raises one ValueError that names the key, the value and what is allowed, with a "did you mean"
for a near-miss choice. The configs (config.py) and SamplingConfig use it, so an
allowed value is written once, beside the code that gives it meaning, and never retyped.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from typing import Any


def option(default: Any = dataclasses.MISSING, *, default_factory: Any = dataclasses.MISSING, choices=None,
           gt=None, ge=None, lt=None, le=None, length=None, nonfinite_ok: bool = False):
    """A dataclass field with declared constraints (None or a missing bound = unconstrained)."""
    meta = {k: v for k, v in dict(choices=choices, gt=gt, ge=ge, lt=lt, le=le, length=length).items() if v is not None}
    if nonfinite_ok:
        meta["nonfinite_ok"] = True
    return dataclasses.field(default=default, default_factory=default_factory, metadata=meta)


def _bounds_text(m: dict) -> str:
    parts = [f"{op} {m[k]}" for k, op in (("gt", ">"), ("ge", "≥"), ("lt", "<"), ("le", "≤")) if k in m]
    return " and ".join(parts)


def check_value(value, meta: dict, key: str) -> None:
    """One value against one field's declared constraints; ValueError naming ``key``."""
    choices = meta.get("choices")
    if choices is not None and value not in choices:
        close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"config: {key}={value!r} is not one of {tuple(choices)}{hint}")
    if isinstance(value, (tuple, list)):
        n = meta.get("length")
        if n is not None and len(value) != n:
            raise ValueError(f"config: {key} must hold {n} values, got {len(value)}: {list(value)!r}")
        for i, v in enumerate(value):
            check_value(v, {k: x for k, x in meta.items() if k not in ("length", "choices")}, f"{key}[{i}]")
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        if any(k in meta for k in ("gt", "ge", "lt", "le")):     # bounds: a number ("0.9" is not)
            raise ValueError(f"config: {key} must be a number ({_bounds_text(meta)}), "
                             f"got {value!r}")
        return
    if isinstance(value, float) and not math.isfinite(value) and not meta.get("nonfinite_ok"):
        raise ValueError(f"config: {key} must be a finite number, got {value!r}")
    bad = (("gt" in meta and not value > meta["gt"]) or ("ge" in meta and not value >= meta["ge"])
           or ("lt" in meta and not value < meta["lt"]) or ("le" in meta and not value <= meta["le"]))
    if bad:
        raise ValueError(f"config: {key} must be {_bounds_text(meta)}, got {value!r}")


def check_options(obj, where: str) -> None:
    """Every field of dataclass instance ``obj`` (not nested dataclasses) against its declaration."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value) or value is None:
            continue
        check_value(value, f.metadata, f"{where}.{f.name}" if where else f.name)
