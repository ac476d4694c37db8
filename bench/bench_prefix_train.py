"""Shared-prefix training forward vs the plain path: ``completion_hidden`` forward + backward.

    OMP_NUM_THREADS=1 python -m bench.bench_prefix_train

On the CPU demo shape (tiny Qwen2-VL, 8 prompts × G = 16, 5 completion tokens): the plain path runs
N = B·G full [prompt ; completion] rows, the shared path runs each prompt once and lets its G
completions attend to its K/V (grpo_models.prefix_train), in the "rows" and "grouped" layouts.
Reports the median process CPU time per call (1 thread: robust to other load on the machine).
"""

import statistics
import tempfile
import time

import torch
from grpo_models import prefix_train as mod
from grpo_models.qwen2_vl import Qwen2VLPolicy
from grpo_models.tiny import build_tiny_qwen2_vl

from grpo_core.data import make_synthetic_vqa, record_to_prompt


def main(steps: int = 7) -> None:
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        pol = Qwen2VLPolicy.from_pretrained(build_tiny_qwen2_vl(tmp, seed=0), dtype=torch.float32, device="cpu")
    enc = pol.encode([record_to_prompt(r, template="nothink")[0] for r in make_synthetic_vqa(8, seed=0)])
    g, c = 16, 5
    ids = torch.randint(10, 500, (8 * g, c), generator=torch.Generator().manual_seed(0))
    times = {}
    for name, on, layout in (("plain", False, "auto"), ("rows", True, "rows"), ("grouped", True, "grouped")):
        mod.ENABLED, mod.LAYOUT, runs = on, layout, []
        for _ in range(steps + 1):                                                    # first run: warm-up
            t = time.process_time()
            pol.model.zero_grad(set_to_none=True)
            pol.completion_hidden(enc, ids, torch.ones_like(ids), g).pow(2).mean().backward()
            runs.append(time.process_time() - t)
        times[name] = statistics.median(runs[1:])
    mod.ENABLED, mod.LAYOUT = True, "auto"
    print(f"B=8 G={g} P={enc.input_ids.shape[1]} C={c}, CPU ms per forward+backward: plain {times['plain'] * 1e3:.0f}, "
          + ", ".join(f"shared/{k} {times[k] * 1e3:.0f} ({times['plain'] / times[k]:.1f}x)" for k in ("rows", "grouped")))


if __name__ == "__main__":
    main()
