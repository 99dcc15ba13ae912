"""Build a Cython-compiled copy of src/ (an overlay) to A/B against the interpreted tree (issue 18).

Copies `src/` into `DEST/src` and compiles the per-message modules of the port-forward path there in
place, unchanged (Cython's pure-Python mode: no .pyx, no source rewrite; `annotation_typing=False`
so the type hints are not checked at run time). Each compiled module's .so sits beside its .py and
is what Python imports. Nothing here touches the package build: Cython is a measuring tool.

    .venv/bin/pip install 'cython>=3,<4' setuptools
    .venv/bin/python -m bench.experiments.cython_overlay /tmp/compiled [--jobs 2]
    .venv/bin/python -m bench.experiments.forward_ab --redis --rounds 10000 --repeats 4 \
        --a-env PYTHONPATH=$PWD/src --b-env PYTHONPATH=/tmp/compiled/src

A module Cython cannot translate is left interpreted and listed at the end (`--exclude GLOB` leaves
more interpreted); a C compiler error stops the build. 82 modules took 7.5 min on the 2-core VM
under load (gcc -O3, about 5 min of CPU); the overlay's .so files are about 70 MB with debug info.
"""

from __future__ import annotations

import argparse
import fnmatch
import os
import shutil
import sys
import time
from pathlib import Path

# The per-message path of the three processes: frame layer, socket pumps, resume numbering, the
# router's relay, the wire codec, the transports and both ends of the forward.
MODULES = (
    "osmo_router/h2/*.py",
    "osmo_router/io/*.py",
    "osmo_router/resume/*.py",
    "osmo_router/router/core/*.py",
    "osmo_router/router/grpc/*.py",
    "osmo_router/router/ops/metrics.py",
    "osmo_router/wire/*.py",
    "osmo_router/transport/*.py",
    "osmo_router/dial/*.py",
    "osmo_router/client/forward*.py",
    "osmo_router/client/session.py",
    "osmo_router/agent/forward*.py",
)
DIRECTIVES = {"language_level": 3, "annotation_typing": False, "binding": True}


def selected(src: Path, excludes: list[str]) -> list[Path]:
    """The modules under `src` that MODULES names, less package __init__ files and `excludes`."""
    found = sorted({p for pattern in MODULES for p in src.glob(pattern)})
    rel = [p.relative_to(src).as_posix() for p in found]
    return [
        p
        for p, r in zip(found, rel, strict=True)
        if p.name != "__init__.py" and not any(fnmatch.fnmatch(r, x) for x in excludes)
    ]


def build(src: Path, modules: list[Path], jobs: int) -> list[str]:
    """Compile `modules` in place under `src`; the ones Cython could not translate (left interpreted)."""
    # Imported here: Cython and setuptools are installed by hand for this measurement, not by scripts/install.
    from Cython.Build import cythonize
    from setuptools import Distribution

    failed: list[str] = []
    ext_modules = []
    for path in modules:
        try:
            ext_modules += cythonize(
                [str(path.relative_to(src))], compiler_directives=DIRECTIVES, quiet=True, force=True
            )
        except Exception as exc:  # Cython raises CompileError and friends: leave that module interpreted
            failed.append(f"{path.relative_to(src)}: {exc}")
    dist = Distribution({"ext_modules": ext_modules})
    cmd = dist.get_command_obj("build_ext")
    cmd.inplace = True
    cmd.parallel = jobs
    cmd.ensure_finalized()
    cmd.run()
    return failed


def main() -> None:
    """Copy src/ to DEST/src and compile the per-message modules there."""
    parser = argparse.ArgumentParser(prog="bench.experiments.cython_overlay")
    parser.add_argument("dest", type=Path, help="directory to build the overlay in (DEST/src)")
    parser.add_argument("--jobs", type=int, default=2, help="parallel C compiles")
    parser.add_argument("--exclude", action="append", default=[], help="GLOB of modules to leave interpreted")
    args = parser.parse_args()
    src = args.dest / "src"
    if src.exists():
        shutil.rmtree(src)
    shutil.copytree(Path(__file__).resolve().parents[2] / "src", src, ignore=shutil.ignore_patterns("__pycache__"))
    modules = selected(src, args.exclude)
    start = time.monotonic()
    os.chdir(src)  # cythonize and build_ext --inplace work on paths relative to the package root
    failed = build(src, modules, args.jobs)
    for path in src.rglob("*.c"):
        path.unlink()
    shutil.rmtree(src / "build", ignore_errors=True)
    print(f"compiled {len(modules) - len(failed)} of {len(modules)} modules in {time.monotonic() - start:.0f} s")
    for line in failed:
        print(f"not compiled: {line}", file=sys.stderr)


if __name__ == "__main__":
    main()
