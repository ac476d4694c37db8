"""docs/CONFIG.md from the config dataclasses: every key, its type, default, allowed values, one line.

    python -m grpo_app.config_doc            # rewrite docs/CONFIG.md
    python -m grpo_app.config_doc --check    # exit 1 when docs/CONFIG.md differs (tests/test_config_doc.py)

The one line is the comment written beside the field in its dataclass, or on the ``#:`` line just
above it (grpo_core/config.py, grpo_core/loss.py for the loss options, grpo_core/sampling.py for
the sampling options under ``rollout``); the allowed values and the resume class come from the
field's ``option(...)`` declaration, so the reference cannot drift from the code: a field without
a comment is an error here, and a test fails when the committed file is stale.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import io
import os
import sys
import tokenize
import typing

from grpo_core.config import TrainConfig

DOC_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "CONFIG.md")


def field_comments(cls) -> dict:
    """{field name: the comment on its (last) line, or on the ``#:`` line just above it} for
    ``cls`` and its dataclass bases (source read once)."""
    out = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass) or klass is object:
            continue
        src, first = inspect.getsourcelines(klass)
        text = "".join(src)
        comments = {}
        for tok in tokenize.generate_tokens(io.StringIO(text).readline):
            if tok.type == tokenize.COMMENT:
                comments[tok.start[0]] = tok.string[1:]
        body = ast.parse(inspect.cleandoc("\n" + text) if text[0].isspace() else text).body[0]
        for node in body.body:
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                above = comments.get(node.lineno - 1, "")
                beside = comments.get(node.end_lineno, "").strip()
                out[node.target.id] = beside or (above[1:].strip() if above.startswith(":") else "")
    return out


def _type_name(t) -> str:
    if t is type(None):
        return "null"
    args = typing.get_args(t)
    if args and type(None) in args:
        return " \\| ".join(_type_name(a) for a in args)
    return {"int": "int", "float": "float", "str": "str", "bool": "bool", "list": "list", "tuple": "list"}.get(
        getattr(t, "__name__", str(t)), str(t).replace("typing.", ""))


def _allowed(meta: dict) -> str:
    parts = []
    if "choices" in meta:
        parts.append(", ".join(f"`{c}`" for c in meta["choices"]))
    for k, op in (("gt", ">"), ("ge", "≥"), ("lt", "<"), ("le", "≤")):
        if k in meta:
            parts.append(f"{op} {meta[k]}")
    if "length" in meta:
        parts.append(f"{meta['length']} values")
    return "; ".join(parts)


def _resume(meta: dict) -> str:
    kind, why = meta.get("resume", ("", ""))
    return {"fixed": f"fixed: {why}", "may_change": f"may change: {why}"}.get(kind, "")


def _default(v) -> str:
    if v is None:
        return "`null`"
    if isinstance(v, bool):
        return f"`{str(v).lower()}`"
    if isinstance(v, str):
        return f'`"{v}"`' if v else '`""`'
    if isinstance(v, (list, tuple)):
        return "`" + repr(list(v)).replace("'", "") + "`" if len(repr(v)) < 60 else f"{len(v)} entries (see below)"
    return f"`{v}`"


def rows(obj, prefix: str = "") -> list[tuple]:
    """(key, type, default, allowed, comment, resume) for every leaf field under ``obj``; nested
    dataclasses (e.g. sft.optim) recurse with their own defaults."""
    cls = type(obj)
    hints, comments, out = typing.get_type_hints(cls), field_comments(cls), []
    for f in dataclasses.fields(cls):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            out += rows(value, f"{prefix}{f.name}.")
            continue
        if not comments.get(f.name):
            raise ValueError(f"config_doc: {cls.__name__}.{f.name} has no comment on its line in "
                             f"{inspect.getsourcefile(cls)}; write its one-line meaning there")
        out.append((prefix + f.name, _type_name(hints[f.name]), _default(value),
                    _allowed(dict(f.metadata)), comments[f.name], _resume(dict(f.metadata))))
    return out


def _cell(text: str) -> str:
    return text.replace("|", chr(92) + "|")


def render() -> str:
    cfg = TrainConfig()
    lines = ["# Config reference", "",
             "Every key of a `grpo` config (YAML sections, or `section.key=value` on the command line), generated "
             "from the dataclasses in `grpo_core/config.py` by `python -m grpo_app.config_doc`; "
             "`tests/test_config_doc.py` fails when this file is stale. Examples: "
             "`examples/configs/`.", "",
             "*On resume*: a **fixed** setting defines the run, so resuming a checkpoint with "
             "another value is refused (unless `run.resume_force=true`); a setting that **may "
             "change** takes the new value and the change is reported (`grpo_core/resume.py`).", ""]
    for f in dataclasses.fields(cfg):
        section = getattr(cfg, f.name)
        doc = inspect.getdoc(type(section)) or ""
        lines += [f"## `{f.name}`", ""]
        if doc and not doc.startswith(type(section).__name__ + "("):
            lines += [" ".join(doc.split()), ""]
        if dict(f.metadata).get("resume", ("",))[0] == "not_compared":
            lines += [f"On resume: not compared ({f.metadata['resume'][1]}).", ""]
        lines += ["| key | type | default | allowed | meaning | on resume |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| `{k}` | {t} | {d} | {a} | {_cell(c)} | {_cell(r)} |"
                  for k, t, d, a, c, r in rows(section, f"{f.name}.")]
        lines.append("")
    rewards = cfg.grpo.rewards
    lines += ["The default `grpo.rewards`:", "", "```yaml", "rewards:"]
    lines += [f"  - {{{', '.join(f'{k}: {v}' for k, v in e.items())}}}" for e in rewards]
    lines += ["```", "", "Reward names and their options: `grpo_core/rewards.py` (`REWARDS`), the judge: "
              "`grpo_core/rewards_judge.py`.", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m grpo_app.config_doc", description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="exit 1 when the file differs from the generated text")
    ap.add_argument("--path", default=DOC_PATH)
    args = ap.parse_args(argv)
    text = render()
    if args.check:
        current = open(args.path, encoding="utf-8").read() if os.path.exists(args.path) else ""
        if current != text:
            print(f"{args.path} is stale: run python -m grpo_app.config_doc", file=sys.stderr)
            return 1
        return 0
    with open(args.path, "w", encoding="utf-8") as f:
        f.write(text)
    print(f"wrote {args.path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
