"""Run a fixed-shape decode step ``fn(tokens (N,)) → logits (N, V)``: plainly, compiled, or replayed
as one CUDA graph.

``fn`` must have fixed shapes and update its state only in place (``prefix_decode.
decode_layers_static``), so the same kernels with the same addresses do the same work every step:

    graph:   warm up once on a side stream, restore the state, capture one step into a graph;
             then each step = copy tokens into the static input, replay, read the static output
             (one launch for the whole step instead of one per small op per layer).
    compile: ``torch.compile(fn)`` (fuses the small ops; pays only where measured, see
             bench/bench_rollout.py).
    static:  ``fn`` as it is (the fixed-shape path without either; tests compare it to eager).

The returned logits of a graph are its static output buffer: valid until the next step.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Sequence

import torch

MODES = ("static", "compile", "graph")


def resolve(graphs: str, compile: str, device: torch.device) -> str | None:
    """``rollout.graphs`` / ``rollout.compile`` (auto|on|off) on ``device`` → a MODE, None = eager.

    auto: eager, for both. Compile does not pay on CPU: the rollout bench's decode step gets ~1.3×
    faster (3.0 vs 3.7–4.3 ms), but a whole GRPO step does not (bench_step --rollout-compile on,
    448 px: median 0.255–0.266 s vs 0.259–0.273 s eager) while compiling costs 4–15 s (cached /
    cold; 45 s+ under load), recompiles when a shape changes mid-run and holds ~100 MB more.
    The graph path has not yet run on a GPU (no GPU was lent when it was
    written), so it is opt-in (``graphs: on``) until the device check has measured it against
    eager (bench_rollout --config 2b reports both); then "auto" may turn it on for CUDA."""
    if graphs == "on" and device.type != "cuda":
        raise ValueError(f"rollout.graphs='on' needs a CUDA device, the policy is on {device}; "
                         "use graphs='auto' or 'off'")
    if graphs == "on":
        return "graph"
    if compile == "on":
        return "compile"
    return None


class StepRunner:
    """Calls ``fn`` in ``mode``; ``mutable`` are the tensors ``fn`` updates in place (restored after
    the graph's warm-up, which runs real steps)."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], mode: str,
                 mutable: Sequence[torch.Tensor] = ()):
        if mode not in MODES:
            raise ValueError(f"StepRunner: mode must be one of {MODES}, got {mode!r}")
        self.mode, self._mutable = mode, list(mutable)
        self._fn = _compiled(fn) if mode == "compile" else fn
        self._graph = self._tokens = self._logits = None

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.mode != "graph":
            return self._fn(tokens)
        if self._graph is None:
            self._capture(tokens)
        self._tokens.copy_(tokens)
        self._graph.replay()
        return self._logits

    def _capture(self, tokens: torch.Tensor) -> None:
        saved = [t.clone() for t in self._mutable]
        self._tokens = tokens.clone()
        side = torch.cuda.Stream(device=tokens.device)
        side.wait_stream(torch.cuda.current_stream(tokens.device))
        with torch.cuda.stream(side), _no_autocast_cache(tokens.device):
            self._fn(self._tokens)       # one real step: lazy init, workspaces (column stays < cap)
        torch.cuda.current_stream(tokens.device).wait_stream(side)
        self._graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self._graph), _no_autocast_cache(tokens.device):
            self._logits = self._fn(self._tokens)                         # recorded, not run
        self._restore(saved)                                              # undo the warm-up step

    def _restore(self, saved) -> None:
        for t, s in zip(self._mutable, saved):
            t.copy_(s)


def _no_autocast_cache(device: torch.device):
    """Autocast's cast-weight cache must be off while capturing (cached casts would be freed)."""
    if not torch.is_autocast_enabled(device.type):
        return contextlib.nullcontext()
    dtype = torch.get_autocast_dtype(device.type)
    return torch.autocast(device.type, dtype=dtype, cache_enabled=False)



def _compiled(fn):
    return torch.compile(fn, dynamic=None, fullgraph=False)
