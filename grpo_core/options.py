"""Declared options: a dataclass field carries its own allowed values, checked in one place.

    temperature: float = option(1.0, gt=0)                 # T: logits / T before softmax
    agg: str = option("token_mean", choices=AGGS)         # AGGS defined once, in loss.py

``check_options(obj, where)`` checks every field of a dataclass instance against what its field
declares (``choices``, ``gt``/``ge``/``lt``/``le`` bounds, finiteness of every float, the length of
a tuple; a value under bounds must be a number: a string inside ``optim.betas`` is refused) and
raises one ValueError that names the key, the value and what is allowed, with a "did you mean"
for a near-miss choice. The configs (config.py) and SamplingConfig use it, so an
allowed value is written once, beside the code that gives it meaning, and never retyped.

A config field also declares its resume class (``resume=``, read by grpo_core.resume):

    fixed(why)          the run is defined by it: a resume with another value is refused (``why``
                        is printed), unless forced
    may_change(what)    a budget, cadence or knob that leaves the objective alone: the new value
                        applies on resume and the change is reported with ``what``
    not_compared(why)   never compared (how a run starts; on a nested section: the whole section)
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from typing import Any

RESUME_CLASSES = ("fixed", "may_change", "not_compared")


def fixed(why: str) -> tuple:
    """Resume class: may not change mid-run, because ``why`` (e.g. "the objective")."""
    return ("fixed", why)


def may_change(what: str) -> tuple:
    """Resume class: may change mid-run; ``what`` happens then (e.g. "applies from then on")."""
    return ("may_change", what)


def not_compared(why: str) -> tuple:
    """Resume class: not compared at all (how a run starts, or another trainer's own section)."""
    return ("not_compared", why)


def option(default: Any = dataclasses.MISSING, *, default_factory: Any = dataclasses.MISSING,
           choices=None, gt=None, ge=None, lt=None, le=None, length=None,
           nonfinite_ok: bool = False, resume: tuple | None = None):
    """A dataclass field with declared constraints (None or a missing bound = unconstrained) and,
    for a config field, its resume class (``fixed(...)``, ``may_change(...)``, ``not_compared``)."""
    declared = dict(choices=choices, gt=gt, ge=ge, lt=lt, le=le, length=length)
    meta = {k: v for k, v in declared.items() if v is not None}
    if nonfinite_ok:
        meta["nonfinite_ok"] = True
    if resume is not None:
        if not (isinstance(resume, tuple) and len(resume) == 2 and resume[0] in RESUME_CLASSES):
            raise TypeError(f"option: resume must be fixed(why), may_change(what) or "
                            f"not_compared(why), got {resume!r}")
        meta["resume"] = resume
    return dataclasses.field(default=default, default_factory=default_factory, metadata=meta)


def _bounds_text(m: dict) -> str:
    parts = [f"{op} {m[k]}" for k, op in (("gt", ">"), ("ge", "≥"), ("lt", "<"), ("le", "≤")) if k in m]
    return " and ".join(parts)


def check_value(value, meta: dict, key: str, where: str = "config") -> None:
    """One value against one field's declared constraints; ValueError "<where>: <key> ..."."""
    choices = meta.get("choices")
    if choices is not None and value not in choices:
        close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"{where}: {key}={value!r} is not one of {tuple(choices)}{hint}")
    if isinstance(value, (tuple, list)):
        n = meta.get("length")
        if n is not None and len(value) != n:
            raise ValueError(f"{where}: {key} must hold {n} values, got {len(value)}: "
                             f"{list(value)!r}")
        for i, v in enumerate(value):
            inner = {k: x for k, x in meta.items() if k not in ("length", "choices")}
            check_value(v, inner, f"{key}[{i}]", where)
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        if any(k in meta for k in ("gt", "ge", "lt", "le")):     # bounds: a number ("0.9" is not)
            raise ValueError(f"config: {key} must be a number ({_bounds_text(meta)}), "
                             f"got {value!r}")
        return
    if isinstance(value, float) and not math.isfinite(value) and not meta.get("nonfinite_ok"):
        raise ValueError(f"{where}: {key} must be a finite number, got {value!r}")
    bad = (("gt" in meta and not value > meta["gt"]) or ("ge" in meta and not value >= meta["ge"])
           or ("lt" in meta and not value < meta["lt"]) or ("le" in meta and not value <= meta["le"]))
    if bad:
        raise ValueError(f"{where}: {key} must be {_bounds_text(meta)}, got {value!r}")


def check_options(obj, where: str, fields=None, origin: str = "config") -> None:
    """Every field of dataclass instance ``obj`` (not nested dataclasses; only ``fields`` when
    given) against its declaration; errors read "<origin>: <where>.<field> ..."."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value) or value is None or (fields and f.name not in fields):
            continue
        check_value(value, f.metadata, f"{where}.{f.name}" if where else f.name, origin)
