"""Wall time of the README's quickstart: its main command, run N times, each in a fresh storage
folder (so each trains its teacher, as a first quickstart does).

    python bench/quickstart.py --runs 3

Each run is `python -m tune_kd.run --space search_spaces/quickstart.yaml` on a Ray of its own on
this machine, with `--storage` in a temporary folder; without a GPU its trials run on CPUs.
Prints each run's wall time with the load average at its start (other work on the machine slows
it), and the median, with the machine's CPU count.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tune_kd import cli

ROOT = Path(__file__).resolve().parents[1]
SPACE = "search_spaces/quickstart.yaml"


def quickstart_seconds(storage: str) -> float:
    """One quickstart into `storage`, timed; a failed run exits with its last line of output."""
    command = [sys.executable, "-m", "tune_kd.run", "--space", SPACE, "--storage", storage]
    start = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode:
        lines = (done.stderr or done.stdout).strip().splitlines() or ["no output"]
        sys.exit(f"the quickstart failed (exit {done.returncode}): {lines[-1]}")
    return seconds


def main(argv: list[str] | None = None) -> int:
    parser = cli.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="how many quickstarts (default 3)")
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    times = []
    for index in range(args.runs):
        load = os.getloadavg()[0]
        with tempfile.TemporaryDirectory() as folder:
            times.append(quickstart_seconds(folder))
        print(
            f"run {index + 1}: {times[-1]:.1f} s (load average {load:.1f} at its start)", flush=True
        )
    print(
        f"quickstart ({SPACE}), {args.runs} run(s) on {os.cpu_count()} CPU cores: "
        f"median {statistics.median(times):.1f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
