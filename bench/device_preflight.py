"""Before the GPU run: does this Python meet setup.py's install_requires? (metadata only, < 1 s)

    python3 bench/device_preflight.py            # exit 0: go on; exit 3: prints what to carry
    python3 bench/device_preflight.py --download SPEC ...   # fetch wheels for the device into .whl/

The device machine reaches no registry, so a package missing there, or outside setup.py's range,
must travel as a wheel in .whl/ (bench/device_check.sh installs those first). This check reads
setup.py's requirements (no import of setup.py, no torch import) and, for each unmet one, prints
the exact ``pip download`` line to run on a machine with pip access. Extras are not checked:
the run needs none of them (datasets/pandas/pyarrow are the ``data`` extra).
"""

import ast
import os
import sys
from importlib import metadata

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The device image's Python and platforms (/work/.library/device/README.md: pip download there).
DOWNLOAD = ("python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 "
            "--implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 "
            "--platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 "
            "--platform manylinux1_x86_64 -d .whl")


def install_requires(path: str = os.path.join(REPO, "setup.py")) -> list[str]:
    """The literal ``install_requires=[...]`` list of setup.py's setup() call."""
    tree = ast.parse(open(path).read())
    for node in ast.walk(tree):
        if isinstance(node, ast.keyword) and node.arg == "install_requires":
            return list(ast.literal_eval(node.value))
    raise RuntimeError(f"{path}: no install_requires=[...] literal in setup()")


def unmet(requirements: list[str]) -> list[tuple[str, str]]:
    """(requirement, why) for each requirement this Python does not meet (markers honoured)."""
    from packaging.requirements import Requirement

    bad = []
    for line in requirements:
        req = Requirement(line)
        if req.marker is not None and not req.marker.evaluate():
            continue
        try:
            have = metadata.version(req.name)
        except metadata.PackageNotFoundError:
            bad.append((str(req), "not installed"))
            continue
        if req.specifier and not req.specifier.contains(have, prereleases=True):
            bad.append((str(req), f"{have} installed"))
    return bad


def download_line(specs: list[str]) -> str:
    return DOWNLOAD + " " + " ".join(f"'{s}'" for s in specs)


def download(specs: list[str]) -> int:
    """``make device-wheels``: the wheels for the device's Python into .whl/, and their size."""
    import shlex
    import subprocess

    if not specs:
        print("device_preflight: nothing to carry (bench/device_wheels.txt lists no wheel: the "
              "device image meets setup.py); WHEELS='spec ...' names some")
        return 0
    rc = subprocess.call(shlex.split(download_line(specs)), cwd=REPO)
    whl = os.path.join(REPO, ".whl")
    names = sorted(os.listdir(whl)) if os.path.isdir(whl) else []
    mib = sum(os.path.getsize(os.path.join(whl, n)) for n in names) / 2 ** 20
    print(f"device_preflight: .whl/ holds {len(names)} wheels, {mib:.1f} MiB (a device run carries "
          "64 MiB in all, the tree and build/cuda included): " + ", ".join(names))
    return rc


def main(argv: list[str]) -> int:
    if argv[:1] == ["--download"]:
        return download(argv[1:])
    bad = unmet(install_requires())
    if not bad:
        print("device_preflight: this Python meets setup.py's install_requires")
        return 0
    if any(r.startswith("torch") and why == "not installed" for r, why in bad):
        print(f"device_preflight: {sys.executable} has no torch: run with PYTHON=<the python that "
              "has torch> (on the device machine: python3)")
        return 3
    specs = [r.split(";")[0].strip() for r, _ in bad]
    print("device_preflight: this Python lacks what the run needs, and no carried wheel has it:")
    for req, why in bad:
        print(f"  {req}: {why}")
    print("Fetch the wheels on a machine with pip access, in the repository root, then carry .whl:")
    print(f"  make device-wheels WHEELS=\"{' '.join(specs)}\"")
    print("or, the same by hand (each wheel's own missing needs too: unzip -p .whl/NAME-*.whl "
          "'*/METADATA' | grep ^Requires-Dist):")
    print("  " + download_line(specs))
    return 3


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
