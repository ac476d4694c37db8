"""The three layers and their one-way arrows, read from the source (nothing is imported or run).

    engine    grpo_core/   knows no policy and no app, not even by a string in its code
    policies  models/      (installed as grpo_models) imports the engine's public modules, never the app
    app       grpo_app/    the only layer that imports both

and no import cycle anywhere among the project's modules (a cycle hides which way an arrow runs).
Docstrings and comments may point a reader to another layer; code may not.
"""

import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAYERS = {"grpo_core": "grpo_core", "grpo_models": "models", "grpo_app": "grpo_app"}   # package → folder
ALLOWED = {"grpo_core": {"grpo_core"}, "grpo_models": {"grpo_core", "grpo_models"},
           "grpo_app": {"grpo_core", "grpo_models", "grpo_app"}}


def _modules():
    """{module name: path} for every .py file of the three packages."""
    out = {}
    for pkg, folder in LAYERS.items():
        base = os.path.join(ROOT, folder)
        for dirpath, _, files in os.walk(base):
            for f in files:
                if f.endswith(".py"):
                    rel = os.path.relpath(os.path.join(dirpath, f), base)[:-3].replace(os.sep, ".")
                    name = pkg if rel == "__init__" else f"{pkg}.{rel.removesuffix('.__init__')}"
                    out[name] = os.path.join(dirpath, f)
    return out


def _imports(name: str, path: str) -> list[str]:
    """Absolute names of every module ``name`` imports (relative imports resolved)."""
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    is_pkg = path.endswith("__init__.py")
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = name.split(".")
                base = parts[: len(parts) - node.level + (1 if is_pkg else 0)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            out.append(mod)
            out += [f"{mod}.{a.name}" for a in node.names]       # `from pkg import module`
    return out


def _code_strings(path: str) -> list[tuple[int, str]]:
    """String constants in code, docstrings excluded."""
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    docs = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                docs.add(id(first.value))
    return [(n.lineno, n.value) for n in ast.walk(tree)
            if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docs]


MODULES = _modules()


def _graph():
    """Project-internal import arrows {module: {imported project module}}."""
    graph = {}
    for name, path in MODULES.items():
        targets = set()
        for imp in _imports(name, path):
            while imp and imp not in MODULES:                       # `pkg.mod.attr` → `pkg.mod`
                imp = imp.rpartition(".")[0]
            if imp and imp != name:
                targets.add(imp)
        graph[name] = targets
    return graph


def _cycles(graph):
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def _parent_packages_are_not_arrows(graph):
    """A module importing its own package's ``__init__`` (e.g. ``from . import x``) is not a cycle."""
    return {m: {t for t in ts if not m.startswith(t + ".")} for m, ts in graph.items()}


def test_the_three_packages_are_found():
    assert {"grpo_core.trainer", "grpo_models.qwen2_vl", "grpo_app.cli"} <= set(MODULES)


def test_no_import_cycles():
    cycles = _cycles(_parent_packages_are_not_arrows(_graph()))
    assert not cycles, "import cycles (each line one cycle): " + "; ".join(" <-> ".join(c) for c in cycles)


@pytest.mark.parametrize("layer", list(LAYERS))
def test_arrows_go_one_way(layer):
    bad = []
    for name, path in MODULES.items():
        if name.split(".")[0] != layer:
            continue
        for imp in _imports(name, path):
            top = imp.split(".")[0]
            if top in LAYERS and top not in ALLOWED[layer]:
                bad.append(f"{os.path.relpath(path, ROOT)} imports {imp}")
            if top == "models":
                bad.append(f"{os.path.relpath(path, ROOT)} imports the bare name 'models' (use grpo_models)")
    assert not bad, f"{layer} may import only {sorted(ALLOWED[layer])}:\n" + "\n".join(bad)


def test_engine_names_no_policy_or_app_in_code():
    bad = []
    for name, path in MODULES.items():
        if not name.startswith("grpo_core"):
            continue
        for line, s in _code_strings(path):
            if any(w in s for w in ("grpo_models", "grpo_app", "models.")):
                bad.append(f"{os.path.relpath(path, ROOT)}:{line}: {s!r}")
    assert not bad, "the engine names another layer in a string (an import by name):\n" + "\n".join(bad)


def test_the_check_can_fail():
    """The cycle finder and the string scan find what they are meant to find."""
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == [["a", "b", "c"]]
    assert _imports("grpo_core.x", os.path.join(ROOT, "grpo_app", "factory.py"))   # reads real files
    factory = os.path.join(ROOT, "grpo_app", "factory.py")
    assert any("grpo_models." in s for _, s in _code_strings(factory))             # the app names policies


def test_a_plain_checkout_imports_grpo_models():
    """Without any install (``PYTHONPATH`` = the checkout, ``-S``: no site-packages, so no editable
    finder), ``grpo_models`` is the ``models/`` folder (the shim ``grpo_models/__init__.py``; the
    device script's fallback relies on it)."""
    import subprocess
    import sys

    code = "import grpo_models, os; print(os.path.realpath(grpo_models.__path__[0])); print(grpo_models.__all__)"
    out = subprocess.run([sys.executable, "-S", "-c", code], cwd="/", capture_output=True, text=True,
                         env={"PYTHONPATH": ROOT, "PATH": os.environ.get("PATH", "")})
    assert out.returncode == 0, out.stderr
    path, names = out.stdout.splitlines()
    assert path == os.path.realpath(os.path.join(ROOT, "models"))
    assert "Qwen2VLPolicy" in names
