"""A fix for Triton's CPU interpreter (TRITON_INTERPRET=1) of Triton ≤ 3.6 under numpy ≥ 2.5.

The interpreter passes a scalar kernel argument (V, H, M …) as a 1-element 1-d numpy array and
turns a tensor into a Python int with ``int(handle.data)``, which numpy ≥ 2.5 refuses ("only
0-dimensional arrays can be converted to Python scalars"): every ``range(0, V, BLOCK_V)`` loop of
our kernels fails there (the GPU device image has Triton 3.6 and numpy 2.5). Later Tritons squeeze
the array first; ``fix()`` makes the older interpreter do the same. It changes nothing on a GPU
(the compiled path never runs this code) nor under a Triton that already squeezes.
"""

import os

_FIXED = "_grpo_core_index_fix"


def _index(self) -> int:
    return int(self.handle.data.squeeze())                      # (1,) → () → int


def fix() -> None:
    """Wrap the interpreter's per-launch tensor patch so that ``__index__`` squeezes first."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    try:
        from triton.runtime import interpreter
    except ImportError:
        return
    orig = getattr(interpreter, "_patch_lang_tensor", None)
    if orig is None or getattr(orig, _FIXED, False):
        return

    def patched(tensor, scope):
        orig(tensor, scope)
        scope.set_attr(tensor, "__index__", _index)

    setattr(patched, _FIXED, True)
    interpreter._patch_lang_tensor = patched
