"""Shared-prefix training forward vs the plain path: ``completion_hidden`` forward + backward.

    OMP_NUM_THREADS=1 python -m bench.bench_prefix_train                   # CPU, the demo shape
    python -m bench.bench_prefix_train --model 2b --out DIR                # GPU, Qwen2-VL-2B shapes

On the CPU demo shape (tiny Qwen2-VL, 8 prompts × G = 16, 5 completion tokens): the plain path runs
N = B·G full [prompt ; completion] rows, the shared path runs each prompt once and lets its G
completions attend to its K/V (grpo_models.prefix_train), in the "rows" and "grouped" layouts.
CPU: the median process CPU time per call (1 thread: robust to other load on the machine).
GPU (``--model 2b``: Qwen2-VL-2B architecture, random bf16 weights, 448² images (256 image tokens
a prompt), 8 prompts × G = 8, 128 completion tokens): median wall time per call (CUDA events), and
peak memory. The plain path runs 64 full [prompt ; completion] rows: ≈ 99 GiB of activations at
448², more than an 80 GB H100 holds; its out-of-memory is recorded as the row's result (and the
memory freed) instead of ending the run. The plain path
uses the model's attention implementation (flash_attention_2 when flash_attn imports, else sdpa),
the shared path its own sdpa attention: this is the measurement that decides which path the
trainer should take on that GPU (grpo_models.policy_utils.pick_attn_implementation).
"""

import argparse
import os
import statistics
import tempfile
import time

import torch
from grpo_models.qwen2_vl import Qwen2VLPolicy
from grpo_models.tiny import build_tiny_qwen2_vl

from grpo_core.data import make_synthetic_vqa, record_to_prompt
from grpo_models import prefix_train as mod

LAYOUTS = (("plain", False, "auto"), ("rows", True, "rows"), ("grouped", True, "grouped"))


def _policy(model: str, tmp: str):
    if model == "tiny":
        return Qwen2VLPolicy.from_pretrained(build_tiny_qwen2_vl(tmp, seed=0), dtype=torch.float32, device="cpu")
    from bench.bench_step import build_2b_shaped

    return Qwen2VLPolicy.from_pretrained(build_2b_shaped(tmp, 0, 448 * 448), dtype=torch.bfloat16, device="cuda")


def _cpu_ms(step, steps: int) -> float:
    runs = []
    for _ in range(steps + 1):                                                        # first run: warm-up
        t = time.process_time()
        step()
        runs.append(time.process_time() - t)
    return statistics.median(runs[1:]) * 1e3


def _free(pol) -> None:
    """Gradients dropped and the CUDA cache emptied: the next path starts from the same memory."""
    pol.model.zero_grad(set_to_none=True)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny", choices=["tiny", "2b"], help="2b: Qwen2-VL-2B shapes on a GPU")
    ap.add_argument("--steps", type=int, default=7)
    ap.add_argument("--prompts", type=int, default=None, help="B (default 8)")
    ap.add_argument("--group", type=int, default=None, help="G (default 16 on CPU, 8 on a GPU)")
    ap.add_argument("--image-size", type=int, default=None,
                    help="square scans, px (default 56 on CPU, 448 on a GPU)")
    ap.add_argument("--out", default=None, help="results root; writes <out>/<device>/prefix_train.{json,md}")
    args = ap.parse_args(argv)
    gpu = args.model == "2b"
    B, g, c = (8, 8, 128) if gpu else (8, 16, 5)
    B, g = args.prompts or B, args.group or g
    px = args.image_size or (448 if gpu else 56)
    if not gpu:
        torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        pol = _policy(args.model, tmp)
    records = make_synthetic_vqa(B, seed=0, image_size=px)
    enc = pol.encode([record_to_prompt(r, template="nothink")[0] for r in records])
    ids = torch.randint(10, 500, (B * g, c), generator=torch.Generator().manual_seed(0)).to(pol.device)
    ones = torch.ones_like(ids)

    def step():
        pol.model.zero_grad(set_to_none=True)
        pol.completion_hidden(enc, ids, ones, g).float().pow(2).mean().backward()

    rows = []
    for name, on, layout in LAYOUTS:
        mod.ENABLED, mod.LAYOUT = on, layout
        try:
            if gpu:
                from bench.common import peak_memory, time_ms

                ms = time_ms(step, torch.device("cuda"))[0]
                mem = peak_memory(step, torch.device("cuda"))[0] / 2 ** 20
            else:
                ms, mem = _cpu_ms(step, args.steps), None
            rows.append({"path": name, "ms": ms, "peak_mem_mb": mem})
        except torch.OutOfMemoryError as exc:                                # a result, not a crash
            rows.append({"path": name, "ms": None, "note": f"out of memory: {str(exc)[:80]}"})
        _free(pol)
    mod.ENABLED, mod.LAYOUT = True, "auto"
    plain = rows[0]["ms"]
    for r in rows:
        r["speedup_vs_plain"] = plain / r["ms"] if plain and r["ms"] else None
    attn = pol._lm.config._attn_implementation
    print(f"B={B} G={g} P={enc.input_ids.shape[1]} C={c}, {px}² images, "
          f"{'GPU wall' if gpu else 'CPU'} ms per forward+backward "
          f"(plain: {attn}): "
          + ", ".join(f"{r['path']} {r['ms']:.0f}" if r["ms"] else f"{r['path']} OOM"
                      for r in rows))
    if args.out or gpu:
        from bench.common import device_label, results_dir, write_table

        dev = torch.device("cuda" if gpu else "cpu")
        meta = {"title": "shared-prefix training forward vs plain (completion_hidden fwd+bwd)",
                "device": device_label(dev), "command": "python -m bench.bench_prefix_train --model " + args.model,
                "notes": [f"B={B} G={g} P={enc.input_ids.shape[1]} C={c}, {px}² images; "
                          f"plain path attention: {attn}; "
                          "shared path: its own sdpa attention"]}
        stem = write_table(os.path.join(results_dir(dev, args.out), "prefix_train"), meta, rows,
                           ["path", "ms", "speedup_vs_plain", "peak_mem_mb", "note"])
        print(f"wrote {stem}.md")


if __name__ == "__main__":
    main()
