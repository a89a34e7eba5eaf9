"""`python -m bench.install [--repeats 3] [--installers uv pip]`: what installing dagfactory costs.

The pre-commit hook and every CI job install dagfactory into a fresh environment (pre-commit
with pip), so this is the wait before the first validation. Each case: a fresh virtualenv, the
checkout installed with and without the `airflow` extra, caches warm (one untimed install
first), the median of the timed installs, and the size of the virtualenv in MB.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
UV = Path(sys.executable).parent / "uv"
VARIANTS = {"dagfactory": str(ROOT), "dagfactory[airflow]": f"{ROOT}[airflow]"}


def _venv(where: Path, installer: str) -> Path:
    if installer == "uv":
        subprocess.run([UV, "venv", "--quiet", "--python", sys.executable, where], check=True)
    else:
        subprocess.run([sys.executable, "-m", "venv", where], check=True)
    return where / "bin" / "python"


def _install(python: Path, target: str, installer: str) -> None:
    if installer == "uv":
        command = [UV, "pip", "install", "--quiet", "--python", python, target]
    else:
        command = [python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
        command.append(target)
    # The installer's own chatter (pip warns about every configured index) only on failure.
    out = subprocess.run(command, capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"{' '.join(map(str, command))} failed:\n{out.stdout}{out.stderr}")


def _size_mb(folder: Path) -> float:
    total = 0
    for dirpath, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(dirpath, name)
            if not os.path.islink(path):
                total += os.path.getsize(path)
    return total / 1e6


def measure(installer: str, variant: str, repeats: int) -> tuple[float, float]:
    """(median seconds to create the venv and install, venv size in MB)."""
    times, size = [], 0.0
    for attempt in range(repeats + 1):  # the first one warms the caches and is not counted
        where = Path(tempfile.mkdtemp(prefix="bench-install-")) / "venv"
        try:
            started = time.perf_counter()
            _install(_venv(where, installer), VARIANTS[variant], installer)
            elapsed = time.perf_counter() - started
            size = _size_mb(where)
        finally:
            shutil.rmtree(where.parent, ignore_errors=True)
        if attempt:
            times.append(elapsed)
        shown = f"{installer} {variant} #{attempt}"
        print(f"  {shown}: {elapsed:.1f} s, {size:.0f} MB", file=sys.stderr)
    return statistics.median(times), size


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.install", description=__doc__)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--installers", nargs="+", choices=["uv", "pip"], default=["uv", "pip"])
    args = parser.parse_args(argv)
    rows = []
    for installer in args.installers:
        for variant in VARIANTS:
            seconds, size = measure(installer, variant, args.repeats)
            rows.append((installer, variant, seconds, size))
    print(f"Install into a fresh venv, warm caches, median of {args.repeats}:\n")
    print("| installer | package | time (s) | venv size (MB) |")
    print("| --- | --- | ---: | ---: |")
    for installer, variant, seconds, size in rows:
        print(f"| {installer} | {variant} | {seconds:.1f} | {size:.0f} |")
    print(f"\nreproduce: .venv/bin/python -m bench.install --repeats {args.repeats}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
