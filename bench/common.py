"""Shared helpers for the benchmark scripts: device name, timing, memory, roofline, result files.

Every script takes these from here (one definition each):
  device_name(device)   the results folder: bench/results/<device_name>/, one per machine. Rule:
                        a GPU's marketing name ("NVIDIA-H200"); a CPU's "cpu-<vendor>-<family>",
                        the first two words of its model name without (R)/(TM) ("cpu-AMD-EPYC",
                        "cpu-Intel-Xeon"): results of one machine kind land in one folder.
  device_label(device)  the human-readable line for a report ("NVIDIA H200", "CPU (AMD EPYC
                        7B13, 2 threads)").
  results_dir(device)   bench/results/<device_name>/ (created).
  loadavg()             "1.02 0.87 0.66": the load averages, published beside CPU timings.
  matmul_flops(device, k, dtype) / matmul_rate(device)   the measured matrix rate (roofline).
  time_ms(fn, device)   (median, q20, q80) ms.
  write_table(stem, meta, rows, columns)   {"meta", "rows"} JSON + a markdown table.

Timing: on a GPU ``triton.testing.do_bench`` (it flushes L2 and synchronises) with the median and
the 20 / 80 % quantiles; on CPU a ``perf_counter`` loop after warm-up, same quantiles.
Memory: on a GPU the peak of ``torch.cuda.max_memory_allocated`` above what was allocated before
the call; on CPU (no allocator statistics for torch's CPU heap) the size of the largest single
tensor any op creates during the call, recorded with a TorchDispatchMode — a lower bound of the
peak that still separates "materialises (N·T, V)" from "does not".
Roofline: achieved bytes / time against the device's HBM bandwidth (PEAK_BYTES_PER_S).
"""

import json
import os
import platform
import re
import statistics
import time
from dataclasses import asdict, dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# HBM bandwidth in bytes/s by a substring of torch.cuda.get_device_name() (vendor datasheets).
PEAK_BYTES_PER_S = {"H200": 4.8e12, "H100": 3.35e12, "A100": 2.0e12, "L40S": 0.864e12, "A10": 0.6e12, "L4": 0.3e12}
QUANTILES = (0.5, 0.2, 0.8)
RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def device_name(device: torch.device) -> str:
    """The results folder's name (see the module docstring for the rule); file-system safe."""
    if device.type == "cuda":
        raw = torch.cuda.get_device_name(device)
    else:
        model = re.sub(r"\((R|TM|tm|r)\)", "", _cpu_model() or platform.machine())
        raw = "cpu-" + "-".join(model.split()[:2])
    return re.sub(r"[^A-Za-z0-9._-]+", "-", raw).strip("-")


def device_label(device: torch.device) -> str:
    """What a report says the device was."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({_cpu_model() or platform.machine()}, {torch.get_num_threads()} threads)"


def loadavg() -> str | None:
    """The 1/5/15-minute load averages as written in /proc/loadavg (None where there is none):
    published beside every CPU timing, since these machines are shared."""
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return None


def results_dir(device: torch.device, root: str | None = None) -> str:
    """<root or bench/results>/<device_name>/, created."""
    out = os.path.join(root or RESULTS_DIR, device_name(device))
    os.makedirs(out, exist_ok=True)
    return out


def _cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


MEASURED_BYTES_PER_S: dict[str, float] = {}   # device name → measured copy bandwidth (set_measured_bandwidth)


def set_measured_bandwidth(device: torch.device, bytes_per_s: float) -> None:
    """Use a measured device-to-device copy bandwidth (bytes read + written per second) as the
    roofline instead of the datasheet figure (bench/device_check.py measures it first)."""
    MEASURED_BYTES_PER_S[device_name(device)] = bytes_per_s


def peak_bandwidth(device: torch.device) -> float | None:
    """Memory bytes/s of the device: measured if set, else the datasheet; None when unknown (CPU)."""
    if device.type != "cuda":
        return None
    if os.environ.get("GRPO_CORE_MEASURED_BW"):                # set by bench/device_check.py
        return float(os.environ["GRPO_CORE_MEASURED_BW"])
    if device_name(device) in MEASURED_BYTES_PER_S:
        return MEASURED_BYTES_PER_S[device_name(device)]
    name = torch.cuda.get_device_name(device)
    return next((bw for key, bw in PEAK_BYTES_PER_S.items() if key in name), None)


def matmul_flops(device: torch.device, k: int, dtype: torch.dtype) -> float:
    """FLOP/s of a k³ matrix product on random data (median of ``time_ms``)."""
    a = torch.randn(k, k, device=device, dtype=dtype)
    b = torch.randn(k, k, device=device, dtype=dtype)
    ms, _, _ = time_ms(lambda: a @ b, device)
    return 2 * k ** 3 / (ms * 1e-3)


def matmul_rate(device: torch.device) -> float:
    """Matrix-multiply FLOP/s of the device: the device check's measured bf16 rate where it set
    one (``GRPO_CORE_MEASURED_MATMUL``), else measured now (GPU: 8192³ bf16; CPU: 1024³ fp32, in
    this process's thread setting)."""
    if os.environ.get("GRPO_CORE_MEASURED_MATMUL"):            # set by bench/device_check.py
        return float(os.environ["GRPO_CORE_MEASURED_MATMUL"])
    if device.type == "cuda":
        return matmul_flops(device, 8192, torch.bfloat16)
    return matmul_flops(device, 1024, torch.float32)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn, device: torch.device, warmup: int = 3, rep: int = 10, budget_s: float = 2.0):
    """(median, q20, q80) milliseconds of fn()."""
    if device.type == "cuda":
        import triton.testing

        return tuple(triton.testing.do_bench(fn, warmup=25, rep=100, quantiles=list(QUANTILES)))
    for _ in range(warmup):
        fn()
    times, start = [], time.perf_counter()
    while len(times) < rep and (len(times) < 3 or time.perf_counter() - start < budget_s):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    q = statistics.quantiles(times, n=10) if len(times) > 1 else times * 9
    return statistics.median(times), q[1], q[7]


class LargestTensor(TorchDispatchMode):
    """Records the byte size of the largest tensor any op returns while active."""

    def __init__(self):
        super().__init__()
        self.biggest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.biggest = max(self.biggest, t.numel() * t.element_size())
        return out


def peak_memory(fn, device: torch.device) -> tuple[int, str]:
    """(bytes, kind): GPU 'peak' allocated above the baseline, CPU 'largest-tensor'."""
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        sync(device)
        return torch.cuda.max_memory_allocated(device) - base, "peak"
    with LargestTensor() as rec:
        fn()
    return rec.biggest, "largest-tensor"


@dataclass
class Result:
    """One benchmark row."""
    op: str                      # e.g. "logits-loss", "linear-loss"
    provider: str                # e.g. "torch-eager", "ours-triton"
    mode: str                    # "fwd" | "bwd" | "full"
    shape: dict                  # N, T, V, H, dtype …
    ms: float | None = None      # median
    ms_q20: float | None = None
    ms_q80: float | None = None
    gbps: float | None = None    # achieved bytes / time (model bytes, see the op's formula)
    roofline_pct: float | None = None  # gbps / HBM peak
    tflops: float | None = None  # achieved FLOP/s / 1e12 (compute-bound ops, FLOPs formula)
    mem_mb: float | None = None
    mem_kind: str = ""
    note: str = ""
    extra: dict = field(default_factory=dict)


def fill_throughput(r: Result, bytes_moved: float | None, device: torch.device, flops: float | None = None) -> None:
    if r.ms and flops:
        r.tflops = flops / (r.ms * 1e-3) / 1e12
    if r.ms and bytes_moved:
        r.gbps = bytes_moved / (r.ms * 1e-3) / 1e9
        peak = peak_bandwidth(device)
        if peak:
            r.roofline_pct = 100.0 * r.gbps * 1e9 / peak


def markdown_table(results: list[Result]) -> str:
    head = "| op | provider | mode | median ms | q20–q80 ms | GB/s | % HBM | TFLOP/s | memory MB | note |\n"
    head += "|---|---|---|---:|---:|---:|---:|---:|---:|---|\n"

    def f(x, nd=2):
        return "—" if x is None else f"{x:.{nd}f}"

    rows = []
    for r in results:
        mem = "—" if r.mem_mb is None else f"{r.mem_mb:.1f} ({r.mem_kind})"
        quant = "—" if r.ms_q20 is None else f"{r.ms_q20:.2f}–{r.ms_q80:.2f}"
        rows.append(f"| {r.op} | {r.provider} | {r.mode} | {f(r.ms)} | {quant} | {f(r.gbps, 1)} | "
                    f"{f(r.roofline_pct, 1)} | {f(r.tflops, 1)} | {mem} | {r.note} |")
    return head + "\n".join(rows) + "\n"


def write_results(name: str, results: list[Result], device: torch.device, meta: dict, root: str | None = None) -> str:
    """Write <root>/<device>/<name>.json and .md (root: bench/results); returns the directory."""
    out_dir = results_dir(device, root)
    meta = dict(meta, device=device_name(device), torch=torch.__version__,
                time=time.strftime("%Y-%m-%d %H:%M:%S"))
    with open(os.path.join(out_dir, f"{name}.json"), "w") as f:
        json.dump({"meta": meta, "results": [asdict(r) for r in results]}, f, indent=1)
    with open(os.path.join(out_dir, f"{name}.md"), "w") as f:
        f.write(f"# {name} on {meta['device']}\n\n")
        f.write("".join(f"- {k}: {v}\n" for k, v in meta.items()) + "\n")
        f.write(markdown_table(results))
    return out_dir


def package_version(pkg: str) -> str | None:
    """Installed version of ``pkg`` (distribution name), or None."""
    try:
        from importlib.metadata import version
        return version(pkg)
    except Exception:
        return None


def _cell(v) -> str:
    if v is None:
        return "—"
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def write_table(stem: str, meta: dict, rows: list[dict], columns: list[str]) -> str:
    """<stem>.json = {"meta", "rows"}; <stem>.md = meta["title"], the device, the command, the
    notes, then one table row per dict. Returns stem."""
    os.makedirs(os.path.dirname(stem) or ".", exist_ok=True)
    with open(stem + ".json", "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    lines = [f"# {meta.get('title', os.path.basename(stem))}", "", f"device: {meta.get('device', '?')}  ",
             f"command: `{meta.get('command', '?')}`", ""]
    lines += [f"note: {n}  " for n in meta.get("notes", [])] + [""]
    lines += ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(r.get(c)) for c in columns) + " |" for r in rows]
    with open(stem + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    return stem
