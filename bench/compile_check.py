"""Compile every GPU kernel for the real targets on a machine without a GPU, and read the result.

    python -m bench.compile_check [--archs 80,90] [--quick] [--no-csrc] [--out DIR]
    make compile-check                       # what CI runs (.ci/run)

Why: the Triton interpreter (how the CPU tests run the kernels) accepts code the real compiler
rejects, and says nothing of registers, spills or load widths. This compiles

  - every Triton kernel variant the launchers produce, by calling the launchers themselves
    (grpo_core.kernels.triton_logprobs / triton_linear) on ``meta`` tensors of realistic shapes
    (V = 151,936; H = 1,536 and 3,584; bf16, fp16, fp32; bias / entropy / entropy-gradient on and
    off) with a stand-in Triton driver that reports the target (``GPUTarget("cuda", 80 | 90, 32)``;
    Triton builds sm_90a for 90) and turns every launch into a compile (``warmup``);
  - csrc/ with nvcc for sm_80, sm_90 and sm_90a with ``-Xptxas -v`` (skipped without nvcc);

then disassembles each kernel (cuobjdump, shipped in Triton's nvidia backend) and writes a table:
registers, stack frame, spill stores (STL instructions), shared memory, and the global loads and
stores by width (128-bit = 16-byte vectors, 64-bit, ≤ 32-bit) from the SASS, plus the PTX's
``ld.global.v4`` / ``.v2`` count for the Triton kernels.

Fails (exit 1) on a compile error, or when a kernel spills more than its budget:
    SPILL_BUDGET_BYTES = 0 for bf16/fp16 and the CUDA library; fp32 fused-linear: 512 bytes of
    stack (plain-FMA dot tiles; fp32 is the CPU/debug dtype, not the training one).
and when a log-prob kernel of a 16-byte-aligned vocabulary does no 128-bit load (the vectorised
loads are the point of their ROW_ALIGN hint).

No GPU and no CUDA driver are needed; ptxas and cuobjdump come with the triton wheel.
Time on the 2-core CI machine: about 1–2 minutes (two processes, one per target).
"""

import argparse
import concurrent.futures as futures
import json
import os
import re
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPILL_BUDGET_BYTES = {"bf16": 0, "fp16": 0, "fp32": 0, "fp32-linear": 512, "cuda": 0}
V_QWEN = 151936
H_SIZES = (1536, 3584)          # Qwen2-VL-2B, Qwen2-VL-7B
TOKENS = 4096


# ---- Triton: the launchers, compiled for a target without a device -----------------------------

def _fake_driver(capability: int):
    """A Triton driver stand-in: enough for JITFunction.run(warmup=True) to compile for
    ``capability``; it can launch nothing."""
    from triton.backends.compiler import GPUTarget

    class CompileOnlyDriver:
        def get_current_device(self):
            return capability            # one kernel cache per target (the cache is keyed by device)

        def get_current_stream(self, device=None):
            return 0

        def get_current_target(self):
            return GPUTarget("cuda", capability, 32)

        def get_active_torch_device(self):
            import torch
            return torch.device("meta")

    return CompileOnlyDriver()


class _Recorder:
    """Patch JITFunction.run so every launch compiles only (warmup) and is recorded."""

    def __init__(self):
        self.kernels = []   # (label, CompiledKernel)
        self.label = ""

    def __enter__(self):
        from triton.runtime.jit import JITFunction

        self._orig = JITFunction.run
        recorder = self

        def run(fn, *args, grid, warmup, **kwargs):
            kernel = recorder._orig(fn, *args, grid=grid, warmup=True, **kwargs)
            recorder.kernels.append((recorder.label, kernel))
            return kernel
        JITFunction.run = run
        return self

    def __exit__(self, *exc):
        from triton.runtime.jit import JITFunction
        JITFunction.run = self._orig


def _variants(quick: bool):
    """(label, callable) for every launcher call the trainer can make, on meta tensors."""
    import torch

    from grpo_core.kernels import triton_linear, triton_logprobs

    meta = torch.device("meta")
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    if quick:
        dtypes = {"bf16": torch.bfloat16}
    M, V = TOKENS, V_QWEN
    i64 = dict(dtype=torch.int64, device=meta)
    f32 = dict(dtype=torch.float32, device=meta)
    n_idx, t_idx, ys = torch.zeros(M, **i64), torch.zeros(M, **i64), torch.zeros(M, **i64)
    lse, g, ent = torch.zeros(M, **f32), torch.zeros(M, **f32), torch.zeros(M, **f32)
    out = []
    for dn, dt in dtypes.items():
        logits = torch.empty(8, M // 8, V, dtype=dt, device=meta)          # (N, T, V) contiguous
        for want in (False, True):
            out.append((f"logprobs_fwd {dn} entropy={int(want)}",
                        lambda x=logits, w=want: triton_logprobs.logprobs_forward(x, n_idx, t_idx, ys, 1.0, w)))
        for eg in (False, True):
            out.append((f"logprobs_bwd {dn} ent_grad={int(eg)}",
                        lambda x=logits, e=eg: triton_logprobs.logprobs_backward(
                            x, n_idx, t_idx, ys, lse, g, 1.0, x, ent if e else None, g if e else None)))
        for H in (H_SIZES[:1] if quick else H_SIZES):
            h = torch.empty(M, H, dtype=dt, device=meta)
            w = torch.empty(V, H, dtype=dt, device=meta)
            for b in (None, torch.empty(V, **f32)):
                for want in (False, True):
                    out.append((f"linear_fwd {dn} H={H} bias={int(b is not None)} entropy={int(want)}",
                                lambda h=h, w=w, b=b, e=want: triton_linear.linear_forward(h, w, b, ys, 1.0, e)))
                for eg in (False, True):
                    out.append((f"linear_dz {dn} H={H} bias={int(b is not None)} ent_grad={int(eg)}",
                                lambda h=h, w=w, b=b, e=eg: triton_linear.linear_backward(
                                    h, w, b, ys, lse, g, 1.0, ent if e else None, g if e else None)))
    return out


def compile_triton(capability: int, quick: bool) -> list[dict]:
    """Compile every variant for one target in this process; rows for the table."""
    os.environ["TRITON_INTERPRET"] = "0"   # real kernels, not the interpreter's
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")   # Triton 3.9's default, stated (no warning)
    from triton.runtime.driver import driver

    driver.set_active(_fake_driver(capability))
    rows, seen = [], {}
    with _Recorder() as rec:
        for label, call in _variants(quick):
            rec.label = label
            n0 = len(rec.kernels)
            try:
                call()
            except Exception as exc:  # a compile error: report it, keep compiling the rest
                rows.append(dict(kind="triton", kernel=label.split()[0], variant=label, arch=capability,
                                 error=f"{type(exc).__name__}: {str(exc)[:400]}"))
                continue
            for _, k in {id(k): (None, k) for _, k in rec.kernels[n0:]}.values():   # chunks relaunch one kernel
                key = id(k)
                if key not in seen:   # e.g. H = 1536 and 3584 share one specialisation
                    seen[key] = _triton_row(k, capability)
                rows.append(dict(seen[key], variant=label))
    return rows


def _triton_row(kernel, capability: int) -> dict:
    ptx = kernel.asm["ptx"]
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        usage = _resource_usage(f.name)
        sass = _cuobjdump(["-sass", f.name])
    name = kernel.metadata.name
    row = dict(kind="triton", kernel=name, arch=f"sm_{capability}{'a' if capability == 90 else ''}",
               warps=kernel.metadata.num_warps, smem=kernel.metadata.shared,
               ptx_ld_v4=len(re.findall(r"ld\.global(?:\.\w+)*\.v4", ptx)),
               ptx_ld_v2=len(re.findall(r"ld\.global(?:\.\w+)*\.v2", ptx)),
               ptx_mul64=len(re.findall(r"\bmul\.(?:wide\.[su]32|lo\.[su]64)\b", ptx)))
    row.update(usage.get(name, {}))
    row.update(_sass_widths(sass))
    return row


# ---- reading cubins -----------------------------------------------------------------------------

def _tool(name: str) -> str:
    import triton
    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    return path if os.path.exists(path) else name


def _cuobjdump(args: list[str]) -> str:
    return subprocess.run([_tool("cuobjdump"), *args], capture_output=True, text=True, check=True).stdout


def _resource_usage(path: str) -> dict:
    """{function: {regs, stack, smem_static}} from cuobjdump --dump-resource-usage."""
    out, name = {}, None
    for line in _cuobjdump(["--dump-resource-usage", path]).splitlines():
        m = re.search(r"Function (\S+):", line)
        if m:
            name = m.group(1)
            continue
        m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+)", line)
        if m and name:
            out[name] = dict(regs=int(m.group(1)), stack=int(m.group(2)), smem_static=int(m.group(3)))
    return out


def _sass_widths(sass: str) -> dict:
    """Global loads/stores by width and local stores (spills) in one function's SASS."""
    def count(op, width):
        pat = {128: rf"\b{op}\.E[\w.]*\.128\b", 64: rf"\b{op}\.E[\w.]*\.64\b"}.get(width)
        if pat:
            return len(re.findall(pat, sass))
        return len(re.findall(rf"\b{op}\.E\b(?![\w.]*\.(?:128|64)\b)[\w.]*", sass))
    return dict(ld128=count("LDG", 128), ld64=count("LDG", 64), ld32=count("LDG", 32),
                st128=count("STG", 128), st64=count("STG", 64), st32=count("STG", 32),
                ldgsts=len(re.findall(r"\bLDGSTS\b", sass)), stl=len(re.findall(r"\bSTL\b", sass)))


def _per_function_sass(sass: str) -> dict:
    """Split a cuobjdump -sass listing into {function: text} (one arch per call)."""
    parts, name, buf = {}, None, []
    for line in sass.splitlines():
        m = re.search(r"Function : (\S+)", line)
        if m:
            if name:
                parts[name] = parts.get(name, "") + "\n".join(buf)
            name, buf = m.group(1), []
        elif name:
            buf.append(line)
    if name:
        parts[name] = parts.get(name, "") + "\n".join(buf)
    return parts


# ---- csrc/: nvcc with -Xptxas -v ------------------------------------------------------------------

def compile_csrc(archs: list[str]) -> list[dict]:
    sys.path.insert(0, os.path.join(REPO, "csrc"))
    import build_cuda

    nvcc = build_cuda.find_nvcc()
    if nvcc is None:
        return [dict(kind="cuda", kernel="csrc/*.cu", arch="-", error=None, note="skipped: nvcc not found")]
    with tempfile.TemporaryDirectory() as tmp:
        lib = os.path.join(tmp, build_cuda.LIB_NAME)
        flags = build_cuda.nvcc_flags(archs) + ["-Xptxas", "-v", "--threads", str(os.cpu_count() or 1)]
        proc = subprocess.run([nvcc, *flags, *build_cuda.sources(), "-o", lib], capture_output=True, text=True)
        if proc.returncode != 0:
            return [dict(kind="cuda", kernel="csrc/*.cu", arch=";".join(archs), error=proc.stderr[-2000:])]
        warnings = [ln for ln in proc.stderr.splitlines() if "warning" in ln.lower()]
        rows = _ptxas_rows(proc.stderr)
        for arch in sorted({r["arch"] for r in rows}):
            sass = _per_function_sass(_cuobjdump(["-sass", "-arch", arch, lib]))
            for r in rows:
                if r["arch"] == arch and r["kernel"] in sass:
                    r.update(_sass_widths(sass[r["kernel"]]))
        for r in rows:
            r["kernel"] = _demangle(r["kernel"])
        if warnings:
            rows.append(dict(kind="cuda", kernel="nvcc warnings", arch=";".join(archs), error="\n".join(warnings)))
        return rows


def _ptxas_rows(log: str) -> list[dict]:
    """Rows from ptxas -v: one per (entry function, arch)."""
    rows, cur = [], None
    for line in log.splitlines():
        m = re.search(r"Compiling entry function '(\S+)' for '(sm_\w+)'", line)
        if m:
            cur = dict(kind="cuda", kernel=m.group(1), arch=m.group(2), warps=None, smem=0)
            rows.append(cur)
            continue
        if cur is None:
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            cur.update(stack=int(m.group(1)), spill_bytes=int(m.group(2)))
        m = re.search(r"Used (\d+) registers", line)
        if m:
            cur["regs"] = int(m.group(1))
            s = re.search(r"(\d+) bytes smem", line)
            cur["smem"] = int(s.group(1)) if s else 0
    return rows


def _demangle(name: str) -> str:
    try:
        return subprocess.run(["c++filt", name], capture_output=True, text=True).stdout.strip() or name
    except OSError:
        return name


# ---- the table and the verdict --------------------------------------------------------------------

def budget_key(row: dict) -> str:
    if row["kind"] == "cuda":
        return "cuda"
    dt = next((d for d in ("bf16", "fp16", "fp32") if f" {d} " in f" {row.get('variant', '')} "), "bf16")
    return "fp32-linear" if dt == "fp32" and "linear" in row["variant"] else dt


def problems(rows: list[dict]) -> list[str]:
    out = []
    for r in rows:
        what = f"{r.get('variant') or r['kernel']} [{r['arch']}]"
        if r.get("error"):
            out.append(f"{what}: {r['error']}")
            continue
        if "regs" not in r:
            continue
        # ptxas's own count for csrc/; for Triton (no ptxas report) the stack frame when the SASS
        # stores to local memory at all
        spilled = r.get("spill_bytes", 0) if r["kind"] == "cuda" else (r.get("stack", 0) if r.get("stl") else 0)
        budget = SPILL_BUDGET_BYTES[budget_key(r)]
        if spilled > budget:
            out.append(f"{what}: {spilled} bytes of stack/spills ({r.get('stl', 0)} STL) > budget {budget}")
        if r["kind"] == "triton" and r["kernel"].startswith("_logprobs") and r.get("ld128", 0) == 0:
            out.append(f"{what}: no 128-bit global load (ROW_ALIGN hint lost?)")
    return out


COLUMNS = ["kind", "variant", "arch", "regs", "stack", "spill_bytes", "stl", "smem", "ld128", "ld64", "ld32",
           "st128", "st64", "st32", "ldgsts", "ptx_ld_v4", "ptx_ld_v2", "ptx_mul64", "warps"]


def markdown(rows: list[dict]) -> str:
    head = "| " + " | ".join(COLUMNS) + " |\n|" + "---|" * len(COLUMNS) + "\n"
    lines = []
    for r in rows:
        if r.get("error") or "regs" not in r:
            continue
        r = dict(r, variant=r.get("variant") or r["kernel"])
        lines.append("| " + " | ".join("" if r.get(c) is None else str(r.get(c)) for c in COLUMNS) + " |")
    return head + "\n".join(lines) + "\n"


def main(argv=None) -> int:
    from bench.common import package_version

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--archs", default="80,90", help="Triton targets as capabilities (90 builds sm_90a)")
    ap.add_argument("--cuda-archs", default="80;90;90a", help="csrc/ targets (build_cuda syntax)")
    ap.add_argument("--quick", action="store_true", help="bf16 and one H only (a smoke run)")
    ap.add_argument("--no-csrc", action="store_true", help="skip the CUDA library")
    ap.add_argument("--out", default=os.path.join(REPO, "bench", "results", "compile"),
                    help="folder for compile_check.{md,json}")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    caps = [int(c) for c in args.archs.split(",") if c]
    jobs = [("triton", c) for c in caps] + ([] if args.no_csrc else [("cuda", args.cuda_archs)])
    rows = []
    # one process per job: Triton's kernel caches and the stand-in driver stay per target
    with futures.ProcessPoolExecutor(max_workers=min(len(jobs), os.cpu_count() or 1)) as pool:
        done = [pool.submit(compile_triton, c, args.quick) if kind == "triton"
                else pool.submit(compile_csrc, build_archs(c)) for kind, c in jobs]
        for f in done:
            rows += f.result()
    bad = problems(rows)
    os.makedirs(args.out, exist_ok=True)
    table = markdown(rows)
    meta = dict(seconds=round(time.perf_counter() - t0, 1), triton=package_version("triton"),
                budgets=SPILL_BUDGET_BYTES, problems=bad, tokens=TOKENS, V=V_QWEN, H=list(H_SIZES))
    with open(os.path.join(args.out, "compile_check.json"), "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    with open(os.path.join(args.out, "compile_check.md"), "w") as f:
        f.write("# Compile check (no GPU): registers, spills, shared memory, load/store widths\n\n"
                f"Command: `python -m bench.compile_check{' --quick' if args.quick else ''}`; triton "
                f"{meta['triton']}; {TOKENS} tokens, V = {V_QWEN}. ld128/ld64/ld32 = global loads by width "
                "in the SASS; ldgsts = asynchronous global→shared copies (the dot operands on sm_80); ptx_mul64 = "
                "64-bit integer multiplies in the PTX (the int64 row offsets); stl = local-memory "
                "stores in the SASS; stack = stack frame bytes; spill_bytes = ptxas's spill stores "
                "(csrc/ only).\n\n" + table)
    print(table)
    print(f"compile check: {len(rows)} kernel rows in {meta['seconds']} s; table in {args.out}/compile_check.md")
    if bad:
        print("FAILED:\n  " + "\n  ".join(bad), file=sys.stderr)
        return 1
    print("compile check: OK (no compile error, spills within budget, vectorised log-prob loads)")
    return 0


def build_archs(spec: str) -> list[str]:
    sys.path.insert(0, os.path.join(REPO, "csrc"))
    import build_cuda
    return build_cuda.parse_archs(spec)


if __name__ == "__main__":
    sys.exit(main())
