"""The one prepared GPU run: every GPU number in one command, every result under one folder.

    python -m bench.device_check [--out DIR] [--budget-s 470] [--pack]    # on a GPU (≤ 8 min, H200)
    python -m bench.device_check --dry-run                                # CPU, tiny shapes (CI)
    bash bench/device_check.sh                                            # on the bare, offline
                                                                          # device machine (installs first)

Stages, in order of value (each a subprocess with its own time limit, all inside ``--budget-s``;
a failed or timed-out stage is recorded and the next one runs):
  env         versions, GPU, driver; what the run needs (torch with CUDA, triton, transformers in
              setup.py's range) is checked first and named if missing
  ceilings    measured device-to-device copy bandwidth (bytes read + written / s) and bf16 matrix
              rate: the roofline the loss benchmark reports against (% of measured copy bandwidth)
  cuda-lib    the CUDA library: the carried build/cuda one if it loads and runs here, else built
              now for this GPU only (csrc/build_cuda.py, nvcc)
  gpu-tests   the GPU test tier: ``pytest -m gpu tests`` (test_kernels_gpu.py, test_cuda_gpu.py,
              the Qwen-vocabulary loss test, ...), JUnit XML kept
  bench-loss  bench/bench_loss.py at Qwen2-VL-2B's shapes (16 × 1024 tokens, V = 151,936,
              H = 1,536, bf16): torch, Triton, CUDA (and Liger when installed), logits and
              fused-linear paths, fwd / bwd / full, peak memory
  bench-step  one GRPO training step at Qwen2-VL-2B's shapes (random bf16 weights), peak memory
  bench-prefix  the shared-prefix training forward vs the plain one at Qwen2-VL-2B's shapes: which
              path (and attention backend) the trainer should take on this GPU
  bench-rollout  the Qwen2-VL-2B-shaped rollout vs HF generate
then ``summary.md`` / ``summary.json``: one row per stage (status, seconds, the key numbers).
With ``--pack`` everything but the summary and the log goes into ``device_check.tar.gz`` (the
device tool returns at most 8 files).

--dry-run: the same stages on CPU with tiny shapes, no build: CI runs it so that the script itself
is tested (make device-check-dry; ~1 minute on an idle 2-core machine). Its budget is generous
(900 s, stage limits doubled): it checks that every stage runs, not how fast a shared CI box is.
"""

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

STAGES = ("env", "ceilings", "cuda-lib", "gpu-tests", "bench-loss", "bench-step", "bench-prefix", "bench-rollout")
LIMIT_S = {"env": 30, "ceilings": 60, "cuda-lib": 120, "gpu-tests": 200, "bench-loss": 150,
           "bench-step": 150, "bench-prefix": 90, "bench-rollout": 120}
RESERVE_S = 10            # kept back for the summary and packing


def _pin(pkg: str) -> tuple[str, str] | None:
    """(low, high) of setup.py's ``pkg>=low,<high`` pin, read from the file (no install needed)."""
    import re

    with open(os.path.join(REPO, "setup.py")) as f:
        m = re.search(rf'"{pkg}>=([\d.]+),<([\d.]+)"', f.read())
    return (m.group(1), m.group(2)) if m else None


def _vtuple(v: str) -> tuple:
    return tuple(int(x) for x in v.split("+")[0].split(".")[:3] if x.isdigit())


# ---- stages: each returns (ok, facts) or raises -------------------------------------------------

def stage_env(args) -> dict:
    """Versions and the run's needs; raises with what is missing."""
    import torch

    from bench.common import package_version

    facts = {"python": platform.python_version(), "torch": torch.__version__,
             "triton": package_version("triton"), "transformers": package_version("transformers"),
             "cuda_available": torch.cuda.is_available()}
    missing = []
    if not args.dry_run:
        if not torch.cuda.is_available():
            missing.append("torch sees no CUDA GPU")
        else:
            facts["gpu"] = torch.cuda.get_device_name()
            facts["capability"] = ".".join(map(str, torch.cuda.get_device_capability()))
            facts["torch_cuda"] = torch.version.cuda
        if facts["triton"] is None:
            missing.append("triton is not installed")
    low, high = _pin("transformers") or ("0", "999")
    tv = facts["transformers"]
    if tv is None or not (_vtuple(low) <= _vtuple(tv) < _vtuple(high)):
        missing.append(f"transformers {tv} is outside setup.py's >={low},<{high}: carry the wheel "
                       "(bench/device_check.sh says how)")
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.sm",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
        facts["nvidia_smi"] = smi.stdout.strip() or smi.stderr.strip()
    except (OSError, subprocess.TimeoutExpired):
        facts["nvidia_smi"] = "not available"
    if missing:
        raise RuntimeError("; ".join(missing))
    return facts


def stage_ceilings(args) -> dict:
    """Copy bandwidth (bytes read + written per second) and bf16 matrix rate on this device."""
    import torch

    from bench.common import sync, time_ms

    dev = torch.device("cpu" if args.dry_run else "cuda")
    n = (1 << 20) if args.dry_run else (1 << 30)                       # fp32 elements: 4 MiB / 4 GiB
    src = torch.randn(n, device=dev)
    dst = torch.empty_like(src)
    ms, _, _ = time_ms(lambda: dst.copy_(src), dev)
    copy_bps = 2 * src.numel() * 4 / (ms * 1e-3)
    k = 256 if args.dry_run else 8192
    a = torch.randn(k, k, device=dev, dtype=torch.float32 if args.dry_run else torch.bfloat16)
    b = torch.randn_like(a)
    ms_mm, _, _ = time_ms(lambda: a @ b, dev)
    sync(dev)
    return {"copy_GBps": copy_bps / 1e9, "matmul_TFLOPs": 2 * k ** 3 / (ms_mm * 1e-3) / 1e12,
            "matmul": f"{k}³ {'fp32' if args.dry_run else 'bf16'}, random data"}


def stage_cuda_lib(args) -> dict:
    """The CUDA library for this GPU: carried and working, or built now for this GPU only."""
    sys.path.insert(0, os.path.join(REPO, "csrc"))
    import build_cuda

    from grpo_core.kernels import cuda

    carried = os.path.join(REPO, "build", "cuda", cuda.LIB_NAME)
    if args.dry_run:
        return {"library": cuda.library_error() or "found", "nvcc": build_cuda.find_nvcc(), "built": False}
    import torch

    if os.path.isfile(carried) and cuda.load_library(carried) is not None and cuda.available("cuda") is None:
        return {"library": carried, "built": False}
    major, minor = torch.cuda.get_device_capability()
    arch = f"{major}{minor}" + ("a" if major == 9 else "")
    path = build_cuda.build(os.path.join(REPO, "build", "cuda"), archs=arch, force=True)
    if path is None:
        raise RuntimeError("no carried library that runs here and no nvcc to build one")
    cuda.load_library(path)
    reason = cuda.available("cuda")
    if reason is not None:
        raise RuntimeError(f"built {path} but it cannot run: {reason}")
    return {"library": path, "built": True, "arch": arch}


def _run(cmd: list[str], log: str, timeout: float, env: dict | None = None) -> tuple[int, float]:
    """Run cmd with output to log; (exit code, seconds); 124 on timeout."""
    t0 = time.perf_counter()
    with open(log, "w") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        try:
            rc = subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, timeout=timeout,
                                env={**os.environ, **(env or {})}).returncode
        except subprocess.TimeoutExpired:
            f.write(f"\n[device_check] timed out after {timeout:.0f} s\n")
            rc = 124
    return rc, time.perf_counter() - t0


def _lib_env() -> dict:
    lib = os.path.join(REPO, "build", "cuda", "libgrpo_core_cuda.so")
    return {"GRPO_CORE_CUDA_LIB": lib} if os.path.isfile(lib) else {}


def stage_gpu_tests(args, out, timeout) -> dict:
    xml = os.path.join(out, "gpu_tests.xml")
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", "-o", "addopts=-ra",
           f"--junitxml={xml}"]
    # the dry run only checks that the stage works: the two GPU kernel files, not the whole suite's collection
    cmd += ["tests/test_kernels_gpu.py", "tests/test_cuda_gpu.py"] if args.dry_run else ["tests"]
    rc, s = _run(cmd, os.path.join(out, "gpu_tests.log"), timeout, _lib_env())
    tail = open(os.path.join(out, "gpu_tests.log")).read().strip().splitlines()[-1:]
    facts = {"exit": rc, "seconds": s, "result": tail[0] if tail else ""}
    if rc not in (0, 5):
        raise RuntimeError(f"pytest exit {rc}: {facts['result']}")
    return facts


def stage_bench(args, out, timeout, name) -> dict:
    py = sys.executable
    root = os.path.join(out, "bench")
    if name == "bench-loss":
        cmd = [py, "-m", "bench.bench_loss", "--out", root, "--no-compile"]
        cmd += ["--quick", "--cpu"] if args.dry_run else []
    elif name == "bench-step":
        cmd = [py, "-m", "bench.bench_step", "--providers", "ours", "--out", os.path.join(root, "step")]
        cmd += ["--quick", "--no-isolate"] if args.dry_run else ["--model", "2b", "--steps", "3", "--warmup", "1"]
    elif name == "bench-prefix":
        cmd = [py, "-m", "bench.bench_prefix_train", "--out", root]
        cmd += ["--steps", "1", "--prompts", "2", "--group", "4"] if args.dry_run else ["--model", "2b"]
    else:
        cmd = [py, "-m", "bench.bench_rollout", "--out", root, "--quick"]
        cmd += ["--config", "tiny", "--set", "prompts=1", "--set", "G=2", "--set", "new=4", "--set", "image=112",
                "--set", "hidden=64", "--set", "layers=2"] if args.dry_run else ["--config", "2b", "--set", "reps=2"]
    env = dict(_lib_env())
    bw = _ceiling(out, "copy_GBps")
    if bw:
        env["GRPO_CORE_MEASURED_BW"] = str(bw * 1e9)                  # roofline = measured copy bandwidth
    log = os.path.join(out, name.replace("-", "_") + ".log")
    rc, s = _run(cmd, log, timeout, env)
    if rc != 0:
        raise RuntimeError(f"exit {rc}; see {os.path.basename(log)}: " + _last_line(log))
    return {"seconds": s, "result": _last_line(log)}


def _last_line(path: str) -> str:
    lines = [ln for ln in open(path).read().splitlines() if ln.strip()]
    return lines[-1][:300] if lines else ""


def _ceiling(out: str, key: str):
    path = os.path.join(out, "summary.json")
    if not os.path.isfile(path):
        return None
    stages = json.load(open(path)).get("stages", {})
    return stages.get("ceilings", {}).get("facts", {}).get(key)


# ---- driver ---------------------------------------------------------------------------------------

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes: tests the script itself")
    ap.add_argument("--out", default=None, help="result folder (default bench/results/<device>/device-check, "
                                                "dry run: build/device-check-dry)")
    ap.add_argument("--budget-s", type=float, default=None, help="whole run (default 470; dry run 900: it checks the "
                                                                 "script, not the time, and CI machines are shared)")
    ap.add_argument("--only", default=None, help=f"comma list of {','.join(STAGES)}")
    ap.add_argument("--pack", action="store_true", help="pack everything but summary and log into one tar.gz")
    args = ap.parse_args(argv)
    budget = args.budget_s or (900.0 if args.dry_run else 470.0)
    out = args.out or _default_out(args.dry_run)
    os.makedirs(out, exist_ok=True)
    stages = [s for s in STAGES if args.only is None or s in args.only.split(",")]
    t_start = time.perf_counter()
    summary = {"command": "python -m bench.device_check " + " ".join(argv if argv is not None else sys.argv[1:]),
               "dry_run": args.dry_run, "budget_s": budget, "stages": {}}
    for name in stages:
        left = budget - (time.perf_counter() - t_start) - RESERVE_S
        limit = min(LIMIT_S[name] * (2.0 if args.dry_run else 1.0), left)   # dry run: a loaded 2-core CI box
        entry = {"status": "skipped", "seconds": 0.0, "facts": {}}
        if limit < 5:
            entry["error"] = "no time left in the budget"
        else:
            t0 = time.perf_counter()
            try:
                if name == "env":
                    entry["facts"] = stage_env(args)
                elif name == "ceilings":
                    entry["facts"] = stage_ceilings(args)
                elif name == "cuda-lib":
                    entry["facts"] = stage_cuda_lib(args)
                elif name == "gpu-tests":
                    entry["facts"] = stage_gpu_tests(args, out, limit)
                else:
                    entry["facts"] = stage_bench(args, out, limit, name)
                entry["status"] = "ok"
            except Exception as exc:  # noqa: BLE001 - record it, run the next stage
                entry["status"], entry["error"] = "failed", f"{type(exc).__name__}: {exc}"[:1000]
            entry["seconds"] = round(time.perf_counter() - t0, 1)
        summary["stages"][name] = entry
        print(f"[device_check] {name:13s} {entry['status']:7s} {entry['seconds']:6.1f} s  "
              f"{entry.get('error') or _short(entry['facts'])}", flush=True)
        _write_summary(out, summary)
    summary["seconds"] = round(time.perf_counter() - t_start, 1)
    _write_summary(out, summary)
    if args.pack:
        _pack(out)
    print(open(os.path.join(out, "summary.md")).read())
    failed = [n for n, e in summary["stages"].items() if e["status"] != "ok"]
    return 1 if failed else 0


def _default_out(dry_run: bool) -> str:
    if dry_run:
        return os.path.join(REPO, "build", "device-check-dry")
    import torch

    from bench.common import results_dir
    return os.path.join(results_dir(torch.device("cuda")), "device-check")


def _short(facts: dict) -> str:
    keep = {k: (round(v, 2) if isinstance(v, float) else v) for k, v in facts.items() if k != "nvidia_smi"}
    return json.dumps(keep)[:240]


def _write_summary(out: str, summary: dict) -> None:
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    lines = [f"# device check ({'dry run, CPU' if summary['dry_run'] else 'GPU'})", "",
             f"command: `{summary['command']}`; budget {summary['budget_s']:.0f} s"
             + (f"; took {summary['seconds']:.0f} s" if "seconds" in summary else ""), "",
             "| stage | status | s | result |", "|---|---|---:|---|"]
    for name, e in summary["stages"].items():
        lines.append(f"| {name} | {e['status']} | {e['seconds']:.1f} | {(e.get('error') or _short(e['facts'])).replace('|', '/')} |")
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


def _pack(out: str) -> None:
    """Everything except summary.* and the top-level log into device_check.tar.gz (files removed)."""
    keep = {"summary.md", "summary.json", "device_check.log", "device_check.tar.gz"}
    names = [n for n in os.listdir(out) if n not in keep]
    if not names:
        return
    with tarfile.open(os.path.join(out, "device_check.tar.gz"), "w:gz") as tar:
        for n in names:
            tar.add(os.path.join(out, n), arcname=n)
    for n in names:
        p = os.path.join(out, n)
        shutil.rmtree(p) if os.path.isdir(p) else os.remove(p)


if __name__ == "__main__":
    sys.exit(main())
