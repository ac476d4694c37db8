"""The one prepared GPU run: every GPU number in one command, every result under one folder.

    bash bench/device_check.sh             # on the bare, offline device machine (make device-check)
    python -m bench.device_check [--out DIR] [--budget-s 420] [--only bench-step,learn] [--pack]
    python -m bench.device_check --dry-run        # CPU, tiny shapes (CI)

Stages, in order of value; each but env runs as its own process in its own process group, killed
whole (grandchildren too) at its time limit, so it leaves nothing on the GPU for the next stage; a
failed or timed-out stage is recorded and the next one runs. The time plan (PLAN below: limit and
H100 estimate per stage) is ≤ 6 minutes estimated; ``--budget-s`` (default 420) caps the whole run.
  env         versions, GPU, driver; what the run needs (torch with CUDA, triton, transformers in
              setup.py's range) is checked first and named if missing
  precision   bf16 vs fp32 GRPO updates of the tiny model at lr 1e-6 (bench/device_stages.py):
              fraction of weights moved, cosine and relative error of the weight deltas
  ceilings    measured device-to-device copy bandwidth (bytes read + written / s) and bf16 matrix
              rate: the roofline the loss benchmark reports against (% of measured copy bandwidth)
  cuda-lib    the CUDA library: the carried build/cuda one if it loads and runs here, else built
              now for this GPU only (csrc/build_cuda.py, nvcc)
  gpu-tests   the GPU test tier: ``pytest -m gpu`` (test_kernels_gpu.py, test_cuda_gpu.py, ...)
  learn       the demo's task on the GPU in bf16 for 45 s of GRPO: held-out accuracy must rise
  bench-loss  bench/bench_loss.py at Qwen2-VL-2B's shapes (16 × 1024 tokens, V = 151,936,
              H = 1,536, bf16): torch, Triton, CUDA, logits and fused-linear paths, peak memory
  bench-step  one GRPO training step at Qwen2-VL-2B's shapes (random bf16 weights), peak memory
  bench-prefix  the shared-prefix training forward vs the plain one at Qwen2-VL-2B's shapes, 448²
              images (the plain path's out-of-memory is a result, not a crash)
  bench-rollout  the Qwen2-VL-2B-shaped rollout (128 rows × 256 tokens): HF generate, ours
              eager and as a CUDA graph, and the fraction of the decode step's bound reached
  bench-patch  Qwen2-VL-2B's vision patch embedding in bf16: the stock Conv3d vs its GEMM
then ``summary.md`` / ``summary.json``: one row per stage (status, seconds, the key numbers); with
``--only`` the other stages' rows of an earlier summary in the folder are kept (a warm rerun).
With ``--pack`` everything but the summary and the log goes into ``device_check.tar.gz`` (the
device tool returns at most 8 files).

--dry-run: the same stages on CPU with tiny shapes, no build: CI runs it so that the script itself
is tested (make device-env-check, under the device's versions; make device-check-dry here). Its
budget is generous (900 s, stage limits tripled): it checks that every stage runs, not how fast
a shared CI box is.
"""

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tarfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

# stage: (time limit s, estimate s), on one H100 (80 GB), in order of value. The estimates sum to
# ≤ 360 s (6 min); BUDGET_S caps the whole run with margin (a device command may run 10 min, a
# session has 15 min of device time: start-up and one --only rerun must fit beside it). A stage
# past its limit is killed and recorded, the next one runs; one past the budget is skipped.
PLAN = {
    "env":           (20, 3),     # imports, nvidia-smi
    "precision":     (60, 15),    # 2 × (tiny model load + one rollout + 3 updates)
    "ceilings":      (30, 6),     # 4 GiB copy + 8192³ bf16 matmul, timed
    "cuda-lib":      (90, 40),    # ~2 s if the carried build/cuda runs, else nvcc for this arch
    "gpu-tests":     (100, 60),   # pytest -m gpu over tests/ (collection ≈ 15 s)
    "learn":         (90, 65),    # warm-up + 45 s GRPO + two 200-item greedy evals
    "bench-loss":    (70, 40),    # 16 × 1024 tokens × 151,936 vocab, each provider fwd/bwd/full
    "bench-step":    (70, 40),    # 2B-shaped model built (~10 s), 1 warm-up + 2 timed steps
    "bench-prefix":  (60, 30),    # 448² images; the plain path OOMs (≈ 99 GiB) at once on 80 GB
    "bench-rollout": (75, 40),    # 128 rows × 256 tokens: one repetition of HF, eager, graph
    "bench-patch":   (45, 5),     # 8192 × 1176 · 1176 × 1280 bf16; a slow cuDNN conv: ~7 s a round
}
STAGES = tuple(PLAN)
BUDGET_S = 420.0          # the whole run on a GPU (the dry run: 900, a loaded CI box)
LEARN_SECONDS = 45.0      # GRPO training seconds of the learn stage on a GPU
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


def _copy_bps(dev, n: int) -> float:
    """Bytes read + written per second of an n-element fp32 device-to-device copy."""
    from bench.common import time_ms

    src = _randn(n, dev)
    dst = src.new_empty(src.shape)
    ms, _, _ = time_ms(lambda: dst.copy_(src), dev)
    return 2 * n * 4 / (ms * 1e-3)                                     # tensors freed on return


def _randn(shape, dev, dtype=None):
    import torch

    return torch.randn(shape, device=dev, dtype=dtype or torch.float32)


def stage_ceilings(args) -> dict:
    """Copy bandwidth (bytes read + written per second) and bf16 matrix rate on this device; the
    8 GiB of copy buffers and the matmul operands are freed, the CUDA cache emptied, on return."""
    import torch

    from bench.common import matmul_flops

    dev = torch.device("cpu" if args.dry_run else "cuda")
    copy_bps = _copy_bps(dev, (1 << 20) if args.dry_run else (1 << 30))   # fp32: 4 MiB / 4 GiB
    k = 256 if args.dry_run else 8192
    flops = matmul_flops(dev, k, torch.float32 if args.dry_run else torch.bfloat16)
    if dev.type == "cuda":
        torch.cuda.empty_cache()                                     # nothing held for later stages
    return {"copy_GBps": copy_bps / 1e9, "matmul_TFLOPs": flops / 1e12,
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


IN_CHILD = {"ceilings": stage_ceilings, "cuda-lib": stage_cuda_lib}   # run by `--child NAME`


# ---- running a stage: its own process group, killed whole at its limit -------------------------

def _kill_group(p: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL, to every process of p's group (p was started in a new session)."""
    for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, None)):
        try:
            os.killpg(p.pid, sig)
        except (ProcessLookupError, PermissionError):
            break                                                      # the group is gone
        try:
            p.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            pass
        if sig == signal.SIGTERM and p.poll() is not None:
            time.sleep(0.2)                                           # grandchildren: one more pass


def _run(cmd: list[str], log: str, timeout: float, env: dict | None = None) -> tuple[int, float]:
    """Run cmd in a new process group, output to log; (exit code, seconds); 124 on timeout. The
    whole group (a benchmark's provider subprocesses too) is killed at the end, so no process
    of this stage keeps GPU memory into the next one."""
    t0 = time.perf_counter()
    with open(log, "w") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        p = subprocess.Popen(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT,
                             start_new_session=True,
                             env={**os.environ, **(env or {})})
        try:
            rc = p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            f.write(f"\n[device_check] timed out after {timeout:.0f} s: killed its process group\n")
            rc = 124
        finally:
            _kill_group(p)                                            # leftovers, or all on timeout
    return rc, time.perf_counter() - t0


def _lib_env() -> dict:
    lib = os.path.join(REPO, "build", "cuda", "libgrpo_core_cuda.so")
    return {"GRPO_CORE_CUDA_LIB": lib} if os.path.isfile(lib) else {}


def _command(args, out: str, name: str) -> list[str]:
    """The stage's command line (each stage but env is a process of its own)."""
    py, root, dry = sys.executable, os.path.join(out, "bench"), args.dry_run
    if name in IN_CHILD:
        cmd = [py, "-m", "bench.device_check", "--child", name, "--out", out]
        return cmd + (["--dry-run"] if dry else [])
    if name in ("precision", "learn"):
        cmd = [py, "-m", "bench.device_stages", name, "--out", out] + (["--dry-run"] if dry else [])
        return cmd + (["--seconds", str(LEARN_SECONDS)] if name == "learn" and not dry else [])
    if name == "gpu-tests":
        cmd = [py, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", "-o", "addopts=-ra",
               f"--junitxml={os.path.join(out, 'gpu_tests.xml')}"]
        # the dry run only checks that the stage works: the two GPU kernel files, not all tests
        return cmd + (["tests/test_kernels_gpu.py", "tests/test_cuda_gpu.py"] if dry else ["tests"])
    if name == "bench-loss":
        cmd = [py, "-m", "bench.bench_loss", "--out", root, "--no-compile"]
        return cmd + (["--quick", "--cpu"] if dry else [])
    if name == "bench-step":
        cmd = [py, "-m", "bench.bench_step", "--providers", "ours", "--out", os.path.join(root, "step")]
        gpu = ["--model", "2b", "--steps", "2", "--warmup", "1"]
        return cmd + (["--quick", "--no-isolate"] if dry else gpu)
    if name == "bench-prefix":
        cmd = [py, "-m", "bench.bench_prefix_train", "--out", root]
        dry_args = ["--steps", "1", "--prompts", "2", "--group", "4"]
        return cmd + (dry_args if dry else ["--model", "2b"])
    if name == "bench-patch":
        cmd = [py, "-m", "bench.bench_patch_embed", "--out", root]
        return cmd + (["--rounds", "1"] if dry else ["--model", "2b", "--rounds", "2"])
    cmd = [py, "-m", "bench.bench_rollout", "--out", root, "--quick"]
    tiny = ["prompts=1", "G=2", "new=4", "image=112", "hidden=64", "layers=2"]
    sets = [a for kv in tiny for a in ("--set", kv)]
    return cmd + (["--config", "tiny", *sets] if dry else ["--config", "2b", "--set", "reps=1"])


def run_stage(args, out: str, name: str, timeout: float) -> dict:
    """Run one stage's process; its facts: the <out>/<name>.json it wrote, else its last line."""
    env = dict(_lib_env())
    bw, rate = _ceiling(out, "copy_GBps"), _ceiling(out, "matmul_TFLOPs")
    if bw and name.startswith("bench"):
        env["GRPO_CORE_MEASURED_BW"] = str(bw * 1e9)                  # roofline = measured copy bandwidth
    if rate and name.startswith("bench"):
        env["GRPO_CORE_MEASURED_MATMUL"] = str(rate * 1e12)          # and measured matmul rate
    log = os.path.join(out, name.replace("-", "_") + ".log")
    facts_file = os.path.join(out, name + ".json")
    if os.path.exists(facts_file):
        os.remove(facts_file)
    rc, s = _run(_command(args, out, name), log, timeout, env)
    wrote = os.path.isfile(facts_file)
    facts = json.load(open(facts_file)) if wrote else {"result": _last_line(log)}
    facts["seconds"] = s
    if rc == 124:
        raise TimeoutError(f"over its {timeout:.0f} s limit, killed; see {os.path.basename(log)}: "
                           + _last_line(log))
    if rc not in (0, 5) or (rc == 5 and name != "gpu-tests"):      # pytest 5: no GPU test collected
        raise StageFailed(f"exit {rc}; see {os.path.basename(log)}: " + _last_line(log), facts)
    return facts


class StageFailed(RuntimeError):
    def __init__(self, msg: str, facts: dict):
        super().__init__(msg)
        self.facts = facts


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

def plan_text(budget: float, stages, scale: float) -> str:
    est = sum(PLAN[n][1] for n in stages)
    rows = ", ".join(f"{n} {PLAN[n][1]}/{PLAN[n][0] * scale:.0f}" for n in stages)
    return (f"[device_check] time plan (H100 estimate/limit s): {rows}; estimated {est} s "
            f"of a {budget:.0f} s budget")


def _child(args) -> int:
    """``--child NAME``: one in-process stage in this separate process; facts to <out>/NAME.json."""
    facts = IN_CHILD[args.child](args)
    with open(os.path.join(args.out, args.child + ".json"), "w") as f:
        json.dump(facts, f)
    print(json.dumps(facts))
    return 0


def _previous(out: str, only: bool) -> dict:
    """With --only: the stages of an earlier summary in this folder (kept, then overwritten)."""
    path = os.path.join(out, "summary.json")
    if not only or not os.path.isfile(path):
        return {}
    return json.load(open(path)).get("stages", {})


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes: tests the script itself")
    ap.add_argument("--out", default=None, help="result folder (default bench/results/<device>/device-check, "
                                                "dry run: build/device-check-dry)")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="whole run (default 420; dry run 900: it checks the script, not the time)")
    ap.add_argument("--only", default=None,
                    help=f"comma list of {','.join(STAGES)} (a rerun on a warm machine)")
    ap.add_argument("--pack", action="store_true", help="pack everything but summary and log into one tar.gz")
    ap.add_argument("--child", choices=sorted(IN_CHILD), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return _child(args)
    budget = args.budget_s or (900.0 if args.dry_run else BUDGET_S)
    scale = 3.0 if args.dry_run else 1.0                           # dry run: a loaded 2-core CI box
    out = args.out or _default_out(args.dry_run)
    os.makedirs(out, exist_ok=True)
    only = args.only.split(",") if args.only else None
    if only and set(only) - set(STAGES):
        ap.error(f"--only: unknown stage(s) {sorted(set(only) - set(STAGES))}; "
                 f"stages: {','.join(STAGES)}")
    stages = [s for s in STAGES if only is None or s in only]
    print(plan_text(budget, stages, scale), flush=True)
    t_start = time.perf_counter()
    summary = {"command": "python -m bench.device_check " + " ".join(argv if argv is not None else sys.argv[1:]),
               "dry_run": args.dry_run, "budget_s": budget, "stages": _previous(out, bool(only))}
    for name in stages:
        left = budget - (time.perf_counter() - t_start) - RESERVE_S
        limit = min(PLAN[name][0] * scale, left)
        entry = {"status": "skipped", "seconds": 0.0, "facts": {}, "limit_s": PLAN[name][0] * scale,
                 "estimate_s": PLAN[name][1]}
        if limit < 5:
            entry["error"] = "no time left in the budget"
        else:
            t0 = time.perf_counter()
            try:
                entry["facts"] = (stage_env(args) if name == "env"
                                  else run_stage(args, out, name, limit))
                entry["status"] = "ok"
            except Exception as exc:  # noqa: BLE001 - record it, run the next stage
                entry["facts"] = getattr(exc, "facts", {})
                entry["status"] = "timeout" if isinstance(exc, TimeoutError) else "failed"
                entry["error"] = f"{type(exc).__name__}: {exc}"[:1000]
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
    failed = [n for n in stages if summary["stages"][n]["status"] != "ok"]
    return 1 if failed else 0


def _default_out(dry_run: bool) -> str:
    if dry_run:
        return os.path.join(REPO, "build", "device-check-dry")
    import torch

    from bench.common import results_dir
    return os.path.join(results_dir(torch.device("cuda")), "device-check")


def _short(facts: dict) -> str:
    keep = {k: (float(f"{v:.3g}") if isinstance(v, float) else v)
            for k, v in facts.items() if k != "nvidia_smi"}
    return json.dumps(keep)[:240]


def _write_summary(out: str, summary: dict) -> None:
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    lines = [f"# device check ({'dry run, CPU' if summary['dry_run'] else 'GPU'})", "",
             f"command: `{summary['command']}`; budget {summary['budget_s']:.0f} s"
             + (f"; took {summary['seconds']:.0f} s" if "seconds" in summary else ""), "",
             "| stage | status | s | estimate / limit s | result |", "|---|---|---:|---:|---|"]
    for name, e in summary["stages"].items():
        plan = f"{e.get('estimate_s', '')} / {e.get('limit_s', 0):.0f}" if "limit_s" in e else ""
        result = (e.get("error") or _short(e["facts"])).replace("|", "/")
        lines.append(f"| {name} | {e['status']} | {e['seconds']:.1f} | {plan} | {result} |")
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
