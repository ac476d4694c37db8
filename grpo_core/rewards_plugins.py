"""Your own reward function from a config: ``{name: "mypkg.rewards:my_reward", weight: 0.5, <options>}``.

A spec names a function as ``module:function``: either an importable module path
("mypkg.rewards:my_reward", found on sys.path like any import) or a Python file
("examples/custom_reward.py:keyword_reward", relative to the working directory). The function
is a reward like the built-ins,

    def my_reward(completions: list[str], records: list[VQARecord], *, option=default, ...) -> list[float]

and the entry's other keys are its options: each must be a keyword parameter after the first two
(unless the function takes ``**kwargs``), and every parameter without a default must be given.
``completion_tokens`` is not an option: it is context that ``combine_rewards`` fills in.

Everything here answers with ValueError(what, where, what to do), so a config with a typo fails
when it loads, not after the first rollout. This module knows no reward; grpo_core.rewards holds
the registry and calls in here.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import inspect
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
