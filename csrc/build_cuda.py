"""Build csrc/*.cu into one shared library, libgrpo_core_cuda.so, with nvcc alone (no torch).

    python csrc/build_cuda.py --out build/cuda [--archs "80;90a"] [--force]

Used by setup.py (``build(out_dir, quiet=...)``), by ``make cuda`` and by the tests.

- nvcc: $NVCC, else ``nvcc`` on PATH, else $CUDA_HOME/bin/nvcc (then /usr/local/cuda/bin/nvcc).
  Missing → ``build`` returns None after a one-line warning.
- Architectures: $GRPO_CORE_CUDA_ARCHS (default "80;90;90a"), entries like "80", "8.0", "sm_90a".
  Each becomes ``-gencode arch=compute_X,code=sm_X`` (a fat binary); the highest plain (non-"a")
  arch also embeds its PTX so newer GPUs can JIT-compile it. CUDA 13 supports sm_75 and up.
- The CUDA runtime is linked statically (``-cudart static``): the library needs only the driver
  (libcuda), not a libcudart.so of a matching major version, so it sits next to any torch build.
  The driver must be at least as new as the nvcc that built it (the probe checks this at run time).
- Symbols are hidden except the ``GRPO_API`` launchers (-fvisibility=hidden).
- Cache: the build is skipped when the .so is newer than every source (csrc/*.cu, *.cuh, *.h,
  emulate/*.cu and this file) and the stamp file next to it (<lib>.stamp.json) records the same
  compiler and flags. The .so is written to a temporary name and renamed, so a half-written
  library is never loaded (and concurrent builds cannot clash).
- ``build_emulator`` compiles csrc/emulate/emulate.cu, a host-only twin of the kernels' per-thread
  arithmetic, which the CPU tests run against the PyTorch reference (no GPU needed).
- Time (shared 2-core box, nvcc 13.0): default 3 archs ≈ 52 s; one arch (sm_80, what the CPU
  test builds) ≈ 10–22 s; the emulator ≈ 8 s; an up-to-date check ≈ 0.3 s.
"""

import argparse
import glob
import json
import os
import shutil
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
LIB_NAME = "libgrpo_core_cuda.so"
EMULATOR_NAME = "libgrpo_core_cuda_emulate.so"
STAMP_SUFFIX = ".stamp.json"
DEFAULT_ARCHS = "80;90;90a"


def find_nvcc() -> str | None:
    """$NVCC, nvcc on PATH, $CUDA_HOME/bin/nvcc, /usr/local/cuda/bin/nvcc — the first that exists."""
    env = os.environ.get("NVCC")
    if env:
        return env if os.path.isfile(env) and os.access(env, os.X_OK) else None
    on_path = shutil.which("nvcc")
    if on_path:
        return on_path
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home:
            cand = os.path.join(home, "bin", "nvcc")
            if os.path.isfile(cand) and os.access(cand, os.X_OK):
                return cand
    return None


def parse_archs(spec: str | None = None) -> list[str]:
    """"80;90;90a" (or "8.0 sm_90a", commas too) → ["80", "90", "90a"]."""
    spec = spec if spec is not None else os.environ.get("GRPO_CORE_CUDA_ARCHS", DEFAULT_ARCHS)
    archs = []
    for item in spec.replace(",", ";").replace(" ", ";").split(";"):
        a = item.strip().lower().removeprefix("sm_").removeprefix("compute_").replace(".", "")
        if not a:
            continue
        if not (a.rstrip("af").isdigit() and len(a.rstrip("af")) >= 2):
            raise ValueError(f"GRPO_CORE_CUDA_ARCHS: cannot read architecture {item!r} in {spec!r}; "
                             "use entries like '80', '90a' or 'sm_90a'")
        if a not in archs:
            archs.append(a)
    if not archs:
        raise ValueError(f"GRPO_CORE_CUDA_ARCHS={spec!r} names no architecture")
    return archs


def gencode_flags(archs: list[str]) -> list[str]:
    flags = []
    for a in archs:
        flags += ["-gencode", f"arch=compute_{a},code=sm_{a}"]
    plain = [a for a in archs if a.isdigit()]  # "90a"/"100f" PTX is not forward compatible
    if plain:
        top = max(plain, key=int)
        flags += ["-gencode", f"arch=compute_{top},code=compute_{top}"]
    return flags


def sources() -> list[str]:
    return sorted(glob.glob(os.path.join(HERE, "*.cu")))


def _inputs() -> list[str]:
    """Every file whose change must trigger a rebuild."""
    pats = ("*.cu", "*.cuh", "*.h", "emulate/*.cu")
    return sorted(sum((glob.glob(os.path.join(HERE, p)) for p in pats), [])) + [os.path.abspath(__file__)]


def nvcc_flags(archs: list[str]) -> list[str]:
    """Everything that decides the binary (stored in the stamp); not the thread count or output."""
    return [
        "-O3", "--std=c++17", "-shared", "-Xcompiler", "-fPIC,-fvisibility=hidden",
        "-cudart", "static", "-lineinfo", f"-I{HERE}", *gencode_flags(archs),
    ]


def is_up_to_date(lib_path: str, key: dict) -> bool:
    stamp_path = lib_path + STAMP_SUFFIX
    if not (os.path.isfile(lib_path) and os.path.isfile(stamp_path)):
        return False
    try:
        with open(stamp_path) as f:
            if json.load(f) != key:
                return False
    except (OSError, ValueError):
        return False
    built = os.path.getmtime(lib_path)
    return all(os.path.getmtime(p) <= built for p in _inputs())


def _compile(name: str, nvcc: str, flags: list[str], srcs: list[str], out_dir: str, quiet: bool,
             force: bool, what: str) -> str:
    """nvcc flags srcs -o out_dir/name, unless the stamp and mtimes say it is up to date."""
    out_dir = os.path.abspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    lib_path = os.path.join(out_dir, name)
    key = {"nvcc": nvcc, "flags": flags, "sources": [os.path.relpath(s, HERE) for s in srcs]}
    if not force and is_up_to_date(lib_path, key):
        return lib_path
    if not quiet:
        print(f"grpo_core: building {name} ({what}) with {nvcc} ...", file=sys.stderr)
    tmp_path = os.path.join(out_dir, f".{name}.{os.getpid()}.tmp")
    threads = ["--threads", str(min(8, os.cpu_count() or 1))]  # parallel over -gencode targets
    cmd = [nvcc, *flags, *threads, *srcs, "-o", tmp_path]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)
        raise RuntimeError(f"nvcc failed (exit {proc.returncode}) building {name}:\n"
                           f"{' '.join(cmd)}\n{proc.stdout}{proc.stderr}")
    os.replace(tmp_path, lib_path)  # atomic: a process that loaded the old file keeps its inode
    with open(lib_path + STAMP_SUFFIX, "w") as f:
        json.dump(key, f, indent=1)
    if not quiet:
        print(f"grpo_core: built {lib_path} in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return lib_path


def _nvcc_or_warn() -> str | None:
    nvcc = find_nvcc()
    if nvcc is None:
        print("grpo_core: warning: nvcc not found (set NVCC or CUDA_HOME); CUDA library not built",
              file=sys.stderr)
    return nvcc


def build(out_dir: str, quiet: bool = False, archs: list[str] | str | None = None,
          force: bool = False) -> str | None:
    """Compile csrc/*.cu into out_dir/libgrpo_core_cuda.so; return its path, or None without nvcc.

    archs: list like ["80"] or a spec string; default $GRPO_CORE_CUDA_ARCHS or "80;90;90a".
    Raises RuntimeError (with nvcc's output) when the compiler fails.
    """
    nvcc = _nvcc_or_warn()
    if nvcc is None:
        return None
    archs = parse_archs(";".join(archs) if isinstance(archs, list) else archs)
    return _compile(LIB_NAME, nvcc, nvcc_flags(archs), sources(), out_dir, quiet, force,
                    "sm_" + ", sm_".join(archs))


def build_emulator(out_dir: str, quiet: bool = True, force: bool = False) -> str | None:
    """Host-only emulation of the kernels' per-thread arithmetic (csrc/emulate/emulate.cu), for
    CPU tests: same sources and math, no GPU needed. None without nvcc."""
    nvcc = _nvcc_or_warn()
    if nvcc is None:
        return None
    flags = ["-O2", "--std=c++17", "-shared", "-Xcompiler", "-fPIC,-fvisibility=hidden", f"-I{HERE}"]
    src = [os.path.join(HERE, "emulate", "emulate.cu")]
    return _compile(EMULATOR_NAME, nvcc, flags, src, out_dir, quiet, force, "host emulator")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.join(HERE, "..", "build", "cuda"), help="output folder")
    ap.add_argument("--archs", default=None, help='e.g. "80;90a" (default $GRPO_CORE_CUDA_ARCHS or 80;90;90a)')
    ap.add_argument("--force", action="store_true", help="rebuild even if up to date")
    args = ap.parse_args(argv)
    path = build(args.out, quiet=False, archs=args.archs, force=args.force)
    if path is None:
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
