"""``import grpo_models`` from a checkout: this package is the ``models/`` folder next to it.

The policies live in ``models/`` (the project's specified layout) and are installed as the package
``grpo_models`` (setup.py's ``package_dir``; a bare top-level ``models`` collides with other
projects'). Without an install (``PYTHONPATH=$PWD``, a fresh checkout, the device machine's
fallback) Python would find no ``grpo_models``; this file points the package's search path at
``models/`` and runs its ``__init__``, so ``grpo_models.qwen2_vl`` is ``models/qwen2_vl.py`` either
way. It is not installed: an install maps the name straight to ``models/``.
"""

import os as _os

__path__ = [_os.path.join(_os.path.dirname(_os.path.dirname(_os.path.abspath(__file__))), "models")]
_init = _os.path.join(__path__[0], "__init__.py")
with open(_init, encoding="utf-8") as _f:
    exec(compile(_f.read(), _init, "exec"))   # noqa: S102 - the package's own __init__, by path
