"""Your own reward function from a config: ``{name: "mypkg.rewards:my_reward", weight: 0.5, <options>}``.

A spec names a function as ``module:function``: either an importable module path
("mypkg.rewards:my_reward", found on sys.path like any import) or a Python file
("examples/custom_reward.py:keyword_reward", relative to the working directory). The function
is a reward like the built-ins,

    def my_reward(completions: list[str], records: list[VQARecord], *, option=default, ...) -> list[float]

and the entry's other keys are its options: each must be a keyword parameter after the first two
(unless the function takes ``**kwargs``), and every parameter without a default must be given.
``completion_tokens`` is not an option: it is context that ``combine_rewards`` fills in.
An option's value must have its parameter's type (``option_types``: the annotation, else the
default's type, among bool / int / float / str; ``scale: big`` for a float is refused when the
config loads); a float option also takes a number YAML left as a string ("1e-3").

Everything here answers with ValueError(what, where, what to do), so a config with a typo fails
when it loads, not after the first rollout. This module knows no reward; grpo_core.rewards holds
the registry and calls in here.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import inspect
import math
import os
import sys
from typing import Callable

ENTRY_KEYS = ("name", "weight", "role")    # what an entry holds besides the function's options
CONTEXT_KEYWORDS = ("completion_tokens",)  # filled in by combine_rewards, never by the config


def _load_module(path: str, where: str):
    if path.endswith(".py") or os.sep in path or "/" in path:
        file = os.path.abspath(path)
        if not os.path.isfile(file):
            raise ValueError(f"{where}: reward file {path!r} does not exist (looked at {file}; a relative path "
                             "is read from the directory you run from)")
        mod_name = f"grpo_user_reward_{abs(hash(file)):x}"
        if mod_name in sys.modules:
            return sys.modules[mod_name]
        spec = importlib.util.spec_from_file_location(mod_name, file)
        module = importlib.util.module_from_spec(spec)
        sys.modules[mod_name] = module
        try:
            spec.loader.exec_module(module)
        except Exception as e:
            del sys.modules[mod_name]
            raise ValueError(f"{where}: importing reward file {path!r} failed: {type(e).__name__}: {e}") from e
        return module
    try:
        return importlib.import_module(path)
    except ImportError as e:
        raise ValueError(f"{where}: cannot import reward module {path!r} ({type(e).__name__}: {e}); install it or "
                         "put it on PYTHONPATH, or give a file path ending in .py") from e


def load_function(spec: str, where: str) -> Callable:
    """The function a ``module:function`` spec names; ValueError naming ``where`` otherwise."""
    module_path, sep, attr = spec.rpartition(":")
    if not sep or not module_path or not attr.isidentifier():
        raise ValueError(f"{where}: {spec!r} is not a reward spec; write 'package.module:function' or "
                         "'path/to/file.py:function'")
    module = _load_module(module_path, where)
    if not hasattr(module, attr):
        public = [n for n in dir(module) if not n.startswith("_") and callable(getattr(module, n))]
        close = difflib.get_close_matches(attr, public, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else f"; it defines {public[:12]}"
        raise ValueError(f"{where}: module {module_path!r} has no function {attr!r}{hint}")
    fn = getattr(module, attr)
    if inspect.isclass(fn) or not callable(fn):
        raise ValueError(f"{where}: {spec!r} is a {type(fn).__name__}, not a function; point to a function "
                         "(completions, records, *, options) -> list[float]")
    return fn


def signature_options(fn: Callable, skip: int = 2) -> tuple[tuple, tuple, bool]:
    """(option names, required option names, takes **kwargs) of ``fn`` after its first ``skip``
    positional parameters (completions, records); context keywords are left out."""
    params = list(inspect.signature(fn).parameters.values())
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    takes_varargs = any(p.kind == p.VAR_POSITIONAL for p in params)
    if len(positional) < skip and not takes_varargs:
        raise TypeError(f"takes {len(positional)} positional parameter(s); a reward takes (completions, records)")
    rest = [p for p in params if p not in positional[:skip]]
    names = tuple(p.name for p in rest if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
                  and p.name not in CONTEXT_KEYWORDS)
    required = tuple(p.name for p in rest if p.name in names and p.default is p.empty)
    return names, required, any(p.kind == p.VAR_KEYWORD for p in params)


def check_options(options: dict, names: tuple, required: tuple, any_ok: bool, where: str, label: str) -> None:
    """The entry's options against a function's keywords: unknown (did you mean), reserved, missing."""
    for key in options:
        if key in CONTEXT_KEYWORDS:
            raise ValueError(f"{where}.{key}: filled in by the trainer (the sampler's token counts); remove it")
        if key not in names and not any_ok:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else f"; its options are {list(names)}"
            raise ValueError(f"{where}.{key}: reward {label!r} has no option {key!r}{hint}")
    missing = [k for k in required if k not in options]
    if missing:
        raise ValueError(f"{where}: reward {label!r} needs option(s) {missing} (no default); add them to the entry")


def takes_keyword(fn: Callable, keyword: str) -> bool:
    """Whether calling ``fn(..., keyword=...)`` is allowed (a named parameter or **kwargs)."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == keyword and p.kind != p.POSITIONAL_ONLY or p.kind == p.VAR_KEYWORD for p in params)


SIMPLE_TYPES = {"bool": bool, "int": int, "float": float, "str": str, "None": type(None)}


def _param_types(p) -> tuple | None:
    """The types a parameter takes: its annotation (a simple type or a union of them), else the
    default's type; None when it cannot be said (no annotation, no simple default)."""
    ann = p.annotation
    if isinstance(ann, str):
        names = [a.strip() for a in ann.split("|")]
        if all(a in SIMPLE_TYPES for a in names):
            return tuple(SIMPLE_TYPES[a] for a in names)
        return None
    if ann in SIMPLE_TYPES.values():
        return (ann,)
    if ann is p.empty and p.default is not p.empty and type(p.default) in SIMPLE_TYPES.values():
        return (type(p.default),) if p.default is not None else None
    return None


def option_types(fn: Callable, skip: int = 2) -> dict:
    """{option name: allowed types} for the options of ``fn`` whose type can be read (see above)."""
    params = list(inspect.signature(fn).parameters.values())[skip:]
    return {p.name: t for p in params if (t := _param_types(p)) is not None}


def coerce_option(value, types: tuple, where: str, label: str):
    """``value`` as one of ``types`` (an int or "1e-3" is a float); ValueError otherwise."""
    for t in types:
        if t is type(None) and value is None:
            return None
        if t is bool and isinstance(value, bool) or t is str and isinstance(value, str):
            return value
        if t is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if t is float and not isinstance(value, bool):
            try:
                number = float(value) if isinstance(value, (int, float, str)) else None
            except ValueError:
                number = None
            if number is not None and math.isfinite(number):
                return number
    names = " or ".join("null" if t is type(None) else "a finite number" if t is float
                        else "an integer" if t is int else "true/false" if t is bool else "a string"
                        for t in types)
    raise ValueError(f"{where}: reward {label!r} takes {names} here, got {value!r}")


def coerce_options(options: dict, types: dict, where: str, label: str) -> dict:
    """Every option whose type is known, checked and converted (``coerce_option``)."""
    return {k: coerce_option(v, types[k], f"{where}.{k}", label) if k in types else v
            for k, v in options.items()}
