"""Group advantages: the CUDA kernel (csrc/advantages.cu) vs grpo_core.advantages (torch).

    python -m bench.bench_advantages [--quick] [--scales group,batch] [--out bench/results]

Providers, per (N, G, scale):
  torch        grpo_core.advantages.group_advantages on the rewards' device
  cuda         grpo_core.kernels.cuda.group_advantages_cuda (same checks, incl. one host sync)
  cuda-kernel  the bare launcher on preallocated buffers (what the kernel itself costs)
On a machine without a GPU (or without the built library) only "torch" runs, on CPU, and the
report says why the CUDA providers were skipped.

Bytes moved (ideal): read N fp32 rewards, write N fp32 advantages → 8·N bytes; GB/s uses that.
Timing: warm-up, then per-call wall time (CUDA events on a GPU), median and 20/80 % quantiles.
Writes bench/results/<device>/advantages_<cpu|cuda>.json and .md (bench/common.py's folder rule).
"""

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import device_label, results_dir, time_ms, write_table  # noqa: E402
from grpo_core.advantages import SCALES, group_advantages  # noqa: E402
from grpo_core.kernels import cuda  # noqa: E402

# ---- providers -----------------------------------------------------------------------------


def providers(device: torch.device) -> tuple[dict, list[str]]:
    """name → fn(rewards, G, scale) returning a callable to time; plus skip notes."""
    def torch_p(r, G, scale):
        return lambda: group_advantages(r, G, scale)

    def cuda_p(r, G, scale):
        return lambda: cuda.group_advantages_cuda(r, G, scale)

    def kernel_p(r, G, scale):
        lib, B = cuda.load_library(), r.numel() // G
        adv = torch.empty_like(r)
        ws = torch.empty(lib.grpo_group_advantages_workspace_size(B), dtype=torch.float64, device=r.device)
        stream = torch.cuda.current_stream(r.device).cuda_stream
        args = (r.data_ptr(), adv.data_ptr(), ws.data_ptr(), B, G, SCALES.index(scale), 1e-4, stream)
        return lambda: lib.grpo_group_advantages(*args)

    found = {"torch": torch_p}
    reason = cuda.available(device if device.type == "cuda" else torch.device("cuda"))
    if reason is None:
        found.update({"cuda": cuda_p, "cuda-kernel": kernel_p})
        return found, []
    return found, [f"cuda providers skipped: {reason}"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small grid (CI smoke)")
    ap.add_argument("--scales", default="group,batch", help="comma list of group,batch,none")
    ap.add_argument("--out", default=None, help="results root (default bench/results); files go to <out>/<device>/")
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    provs, notes = providers(device)
    for n in notes:
        print(n)
    sizes = [1 << 10, 1 << 14] if args.quick else [1 << 10, 1 << 14, 1 << 18, 1 << 22]
    groups = [8] if args.quick else [4, 8, 16, 64, 2048]
    rows = []
    for scale in args.scales.split(","):
        for N in sizes:
            for G in groups:
                if N % G or G > N:
                    continue
                r = torch.randint(0, 2, (N,), device=device).float()                 # (N,) 0/1 rewards
                for name, make in provs.items():
                    ms, q20, q80 = time_ms(make(r, G, scale), device, warmup=5, rep=10 if args.quick else 30)
                    row = {"scale": scale, "N": N, "G": G, "provider": name, "ms": ms, "ms_p20": q20,
                           "ms_p80": q80, "GB/s": 8 * N / (ms * 1e-3) / 1e9}
                    rows.append(row)
                    print(f"{scale:5s} N={N:8d} G={G:5d} {name:12s} {ms:.4f} ms  {row['GB/s']:.2f} GB/s")
    meta = {"title": "group advantages: CUDA kernel vs torch", "device": device_label(device),
            "torch": torch.__version__,
            "command": "python -m bench.bench_advantages" + (" --quick" if args.quick else ""),
            "bytes": "8·N (read rewards, write advantages)", "notes": notes}
    tag = "cuda" if device.type == "cuda" else "cpu"
    stem = write_table(os.path.join(results_dir(device, args.out), f"advantages_{tag}"), meta, rows,
                       ["scale", "N", "G", "provider", "ms", "ms_p20", "ms_p80", "GB/s"])
    print(f"wrote {stem}.json and {stem}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
