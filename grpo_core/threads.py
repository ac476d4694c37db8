"""How many CPU threads torch uses: ``run.threads``, applied the same way by every entry point.

    apply_threads(cfg.run.threads, cfg.model.device)   # grpo train/sft/eval, demo, API example

``run.threads`` > 0 is taken as given (per process). 0 = auto:
  - on CPU, 1 thread per process. Measured with ``synthetic_gspo.yaml`` (6 steps, no warm-up, on
    a 2-core machine shared with other jobs, load average 10-12): 1 thread 0.5-3 s/step, 2 threads
    (torch's default there) 21 s/step. The tiny CPU models run their small matmuls fastest on one
    thread even on an idle machine (thread sync costs more than it saves), and several processes
    (torchrun ranks, a study's workers) sharing the cores each take one instead of all of them;
  - on GPU, torch's own default (the CPU only feeds the GPU there).
A real model trained on CPU wants more: set ``run.threads`` to the cores it may use.
"""

from __future__ import annotations

import torch


def resolved_threads(threads: int, device: str) -> int | None:
    """The thread count ``threads`` (0 = auto) means on ``device``; None = leave torch's default."""
    if threads > 0:
        return threads
    on_gpu = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    return None if on_gpu else 1


def apply_threads(threads: int, device: str = "auto") -> int:
    """Set torch's intra-op thread count for ``run.threads`` / ``model.device``; returns it."""
    n = resolved_threads(threads, device)
    if n is not None and n != torch.get_num_threads():
        torch.set_num_threads(n)
    return torch.get_num_threads()
