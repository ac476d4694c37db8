"""The benchmark suite: run every benchmark, collect one JSON + markdown report and plots.

    python -m bench [--quick] [--only loss,step] [--skip rollout] [--out bench/results] [--isolate]

Benchmarks (each is also a script of its own, ``python -m bench.<module> --help``):
  loss        fused log-prob / GRPO-loss kernels, fwd / bwd / full, all providers, N and V sweeps
  advantages  group advantages: CUDA kernel vs torch
  rollout     prefix-shared rollout vs HF generate
  step        one full GRPO training step vs TRL's GRPOTrainer (when trl is installed)

Each script writes ``{"meta", "rows"}`` JSON files into a scratch folder; this driver gathers
them into ``<out>/<device>/<date>.json`` (``<date>-quick`` for --quick runs, so a smoke run never
overwrites a real one) and ``.md``, adds ratio columns against each benchmark's reference measured
in the same run (bench/report.py), and plots time / memory vs N and V for the loss kernels.
A benchmark whose script is missing is reported as skipped; one that fails is reported with
its error and makes the exit status 1, after the others have run.

--quick: small shapes, torch providers, Triton only where it is not interpreted, TRL left out of
the step benchmark; the scripts run in this process (saves an interpreter + torch import each).
Full runs start one subprocess per benchmark (--isolate is the default there): peak memory and
CUDA state do not leak from one benchmark into the next.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import glob
import importlib
import importlib.util
import inspect
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from bench import common, report  # noqa: E402


@dataclass
class Bench:
    name: str            # short name in reports and --only/--skip
    module: str          # bench.<module>: main(argv) (or run(parse_args(argv))) writing JSON results
    reference: str       # provider every ratio is taken against
    quick: list          # argv of each run in --quick mode (one run per entry; rows are concatenated)
    full: list           # argv of each run in a full run


# The loss kernels are swept by calling bench_loss once per shape: N = seqs · tokens-per-seq
# tokens at V = 151,936, then V at N = 16 × 1024 (GPU). --quick: three small CPU fp32 shapes.
# The step runs on the tiny Qwen2-VL, and on a GPU also on the Qwen2-VL-2B shapes.
_LOSS_CPU = ["--cpu", "--dtype", "fp32", "--seqs", "4", "--hidden", "64"]
BENCHES = [
    Bench("loss", "bench.bench_loss", "torch-eager",
          quick=[_LOSS_CPU + ["--tokens-per-seq", t, "--vocab", v]
                 for t, v in (("32", "4096"), ("64", "4096"), ("32", "1024"))],
          full=[[]] + [["--tokens-per-seq", t] for t in ("256", "512", "2048")]
          + [["--vocab", v] for v in ("16384", "32768", "65536")]),
    Bench("advantages", "bench.bench_advantages", "torch", quick=[["--quick"]], full=[[]]),
    Bench("rollout", "bench.bench_rollout", "hf_generate", quick=[["--quick", "--config", "tiny"]], full=[[]]),
    Bench("step", "bench.bench_step", "trl", quick=[["--quick", "--providers", "ours"]],
          full=[[]] + ([["--model", "2b", "--steps", "3"]] if torch.cuda.is_available() else [])),
]


def device_name() -> str:
    """The report's device line (bench/common.py's device_label)."""
    return common.device_label(torch.device("cuda" if torch.cuda.is_available() else "cpu"))


def device_dir() -> str:
    """The folder of this device's results; the same name bench/common.py gives it."""
    return common.device_name(torch.device("cuda" if torch.cuda.is_available() else "cpu"))


def load_average() -> str:
    try:
        return "{:.2f} {:.2f} {:.2f}".format(*os.getloadavg())
    except OSError:
        return "n/a"


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                             text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True,
                               text=True, timeout=10).stdout.strip()
        return out.stdout.strip() + ("+dirty" if dirty else "") if out.returncode == 0 else "n/a"
    except (OSError, subprocess.TimeoutExpired):
        return "n/a"


# ---- running one benchmark -------------------------------------------------------------------


def _files(folder: str) -> dict:
    out = {}
    for path in glob.glob(os.path.join(folder, "**", "*"), recursive=True):
        if os.path.isfile(path):
            with open(path, "rb") as f:
                out[path] = f.read()
    return out


@contextlib.contextmanager
def captured_results(scratch: str, restore: bool):
    """Collect result files a script writes into bench/results by itself (scripts without --out).

    bench/common.py's RESULTS_DIR is pointed at `scratch` meanwhile, so scripts built on
    common.write_results write there instead; any other file that appears or changes under
    bench/results during the run is read back. With `restore` (--quick runs) a file that existed
    before gets its old content back, so a smoke run never replaces a real run's numbers (a
    process writing the same file at the same moment would lose its write; nothing is deleted)."""
    before = _files(common.RESULTS_DIR)
    old_dir, common.RESULTS_DIR = common.RESULTS_DIR, scratch
    written: dict = {}
    try:
        yield written
    finally:
        common.RESULTS_DIR = old_dir
        written.update({p: d for p, d in _files(old_dir).items() if before.get(p) != d})
        for path in written:
            if restore and path in before:
                with open(path, "wb") as f:
                    f.write(before[path])


def normalise(data: dict, source: str) -> dict | None:
    """One result file → {file, meta, rows}; accepts {"meta", "rows"} and {..., "results": [...]}."""
    if not isinstance(data, dict):
        return None
    rows = data.get("rows", data.get("results"))
    if not isinstance(rows, list):
        return None
    meta = data.get("meta") or {k: v for k, v in data.items() if k not in ("rows", "results")}
    flat = []
    for r in rows:
        r = dict(r)
        for nested in ("shape", "extra"):            # bench.common.Result keeps the case in dicts
            if isinstance(r.get(nested), dict):
                r.update(r.pop(nested))
        flat.append(r)
    return {"file": source, "meta": meta, "rows": flat}


def collect(b: Bench, quick: bool) -> list[dict]:
    """Run every argv of `b` in this process; returns the parts (one per result file per run)."""
    mod = importlib.import_module(b.module)
    takes_out = '"--out"' in inspect.getsource(mod)
    parts = []
    for argv in (b.quick if quick else b.full):
        with tempfile.TemporaryDirectory(prefix=f"bench-{b.name}-") as tmp:
            full_argv = list(argv) + (["--out", tmp] if takes_out else [])
            with captured_results(tmp, restore=quick) as written:
                if hasattr(mod, "main"):
                    rc = mod.main(full_argv)
                else:                                # bench_loss style: run(parse_args(argv))
                    mod.run(mod.parse_args(full_argv))
                    rc = 0
            if rc:
                raise RuntimeError(f"{b.module}.main({full_argv}) returned {rc}")
            files = {p: open(p, "rb").read() for p in glob.glob(os.path.join(tmp, "**", "*.json"), recursive=True)}
            files.update({p: d for p, d in written.items() if p.endswith(".json")})
            for path, data in sorted(files.items()):
                part = normalise(json.loads(data), os.path.basename(path))
                if part:
                    part["argv"] = list(argv)
                    parts.append(part)
    if not parts:
        raise RuntimeError(f"{b.module} wrote no JSON results (neither into --out nor into bench/results)")
    return parts


def run_one(b: Bench, quick: bool, isolate: bool, timeout: float) -> dict:
    """Run one benchmark (in a child interpreter if `isolate`); returns {status, seconds, parts | error}."""
    if importlib.util.find_spec(b.module) is None:
        return {"status": "skipped", "seconds": 0.0, "error": f"{b.module} not found (not written yet?)"}
    t0 = time.perf_counter()
    try:
        if isolate:
            with tempfile.TemporaryDirectory() as tmp:
                res = os.path.join(tmp, "parts.json")
                cmd = [sys.executable, "-m", "bench.run_all", "--child", b.name,
                       "--child-out", res] + (["--quick"] if quick else [])
                p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
                print(p.stdout, end="")
                if p.returncode != 0:
                    raise RuntimeError(f"exit {p.returncode}\n{p.stderr[-4000:]}")
                with open(res) as f:
                    parts = json.load(f)
        else:
            parts = collect(b, quick)
    except (Exception, SystemExit) as e:  # one broken benchmark must not stop the others
        detail = str(e) if isolate else traceback.format_exc()
        return {"status": "failed", "seconds": time.perf_counter() - t0, "error": detail}
    for part in parts:
        part["reference"] = part["meta"].get("reference", b.reference)
    return {"status": "ok", "seconds": time.perf_counter() - t0, "parts": parts}


def select(only: str | None, skip: str | None) -> list[Bench]:
    names = [b.name for b in BENCHES]
    for flag, value in (("--only", only), ("--skip", skip)):
        bad = [n for n in (value or "").split(",") if n and n not in names]
        if bad:
            raise SystemExit(f"bench: {flag} names unknown benchmark(s) {bad}; known: {names}")
    keep = [b for b in BENCHES if not only or b.name in only.split(",")]
    return [b for b in keep if not skip or b.name not in skip.split(",")]


def run_suite(quick: bool = False, out: str | None = None, only: str | None = None, skip: str | None = None,
              isolate: bool | None = None, timeout: float = 900.0, command: str = "python -m bench") -> dict:
    """Run the selected benchmarks; write <out>/<device>/<date>[-quick].{json,md} and PNGs; return the suite."""
    out = out or os.path.join(ROOT, "bench", "results")
    isolate = (not quick) if isolate is None else isolate
    dev = device_name()
    folder = os.path.join(out, device_dir())
    os.makedirs(folder, exist_ok=True)
    stem = os.path.join(folder, datetime.date.today().isoformat() + ("-quick" if quick else ""))
    meta = {"device": dev, "date": datetime.datetime.now().isoformat(timespec="seconds"), "command": command,
            "torch": torch.__version__, "git": git_commit(), "quick": quick, "isolate": isolate,
            "cpu_threads": torch.get_num_threads(), "load_start": load_average(), "notes": []}
    if not torch.cuda.is_available():
        meta["notes"].append("no CUDA device: CPU numbers (torch providers; Triton interpreter never timed)")
    t0 = time.perf_counter()
    benches = {}
    for b in select(only, skip):
        print(f"== {b.name} ({b.module}{' --quick' if quick else ''})", flush=True)
        benches[b.name] = run_one(b, quick, isolate, timeout)
        res = benches[b.name]
        print(f"== {b.name}: {res['status']} in {res['seconds']:.1f} s" + (f": {res['error'].strip().splitlines()[-1]}"
                                                                          if res["status"] != "ok" else ""), flush=True)
    meta.update(seconds=time.perf_counter() - t0, load_end=load_average())
    plots = []
    peak = common.peak_bandwidth(torch.device("cuda")) if torch.cuda.is_available() else None   # bytes/s
    for name, res in benches.items():
        for part in res.get("parts", []):
            part["ratio_columns"] = report.add_ratios(part["rows"], part["reference"], peak)
        if name == "loss" and res["status"] == "ok":   # one plot set over every run of the sweep
            rows = [r for part in res["parts"] for r in part["rows"]]
            plots += report.plot_loss(rows, f"{stem}_loss", res["parts"][0]["meta"].get("title", "GRPO loss"))
    suite = {"meta": meta, "benchmarks": benches, "plots": [os.path.basename(p) for p in plots]}
    with open(stem + ".json", "w") as f:
        json.dump(suite, f, indent=1)
    with open(stem + ".md", "w") as f:
        f.write(report.markdown(suite))
    suite["paths"] = {"json": stem + ".json", "md": stem + ".md", "plots": plots}
    print(f"wrote {stem}.json, {stem}.md" + (f" and {len(plots)} plot(s)" if plots else ""))
    return suite


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="CPU smoke: small shapes, torch providers, < 1 min")
    ap.add_argument("--only", help="comma list of " + ",".join(b.name for b in BENCHES))
    ap.add_argument("--skip", help="comma list of benchmarks to leave out")
    ap.add_argument("--out", help="results root (default bench/results); files go to <out>/<device>/")
    ap.add_argument("--isolate", action=argparse.BooleanOptionalAction, default=None,
                    help="one subprocess per benchmark (default: on for full runs, off for --quick)")
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds per isolated benchmark")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--child-out", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:                       # isolated run of one benchmark: parts → --child-out
        parts = collect(next(b for b in BENCHES if b.name == args.child), args.quick)
        with open(args.child_out, "w") as f:
            json.dump(parts, f)
        return 0
    given = argv if argv is not None else sys.argv[1:]
    suite = run_suite(args.quick, args.out, args.only, args.skip, args.isolate, args.timeout,
                      command=" ".join(["python -m bench", *map(shlex.quote, given)]))
    return 1 if any(b["status"] == "failed" for b in suite["benchmarks"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
