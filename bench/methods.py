"""Every method's training step against KD's: student-images/s and peak memory, one process per
method (so each peak is its own), ResNet-32x4 -> ResNet-8x4 at batch 64 by default.

    python bench/methods.py                    # on this machine's device, 1,280 images an epoch
    python bench/methods.py --device cuda --train-size 25600 --json docs/gpu-methods.jsonl

Each method runs `bench/step.py --paths ours --method NAME` for two epochs and the second is
timed. The table gives each method's images/s, its time per step relative to KD's, and its peak
memory (CUDA: allocated by torch; CPU: the process's resident set).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from tune_kd import distillers

STEP = Path(__file__).with_name("step.py")


def measure(method: str, args: argparse.Namespace) -> dict:
    command = [sys.executable, str(STEP), "--paths", "ours", "--method", method]
    command += ["--teacher", args.teacher, "--student", args.student]
    command += ["--train-size", str(args.train_size), "--epochs", "2"]
    if args.device:
        command += ["--device", args.device]
    if args.device == "cuda":
        command += ["--cuda-graphs"]
    lines = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    rows = [json.loads(line) for line in lines.splitlines() if line.startswith("{")]
    return rows[-1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", default=",".join(distillers.names()))
    parser.add_argument("--teacher", default="resnet32x4")
    parser.add_argument("--student", default="resnet8x4")
    parser.add_argument("--device", default="")
    parser.add_argument("--train-size", type=int, default=64 * 20)
    parser.add_argument("--json", type=Path, help="append each method's JSON line here")
    args = parser.parse_args(argv)
    rows = {m: measure(m, args) for m in args.methods.split(",")}
    if args.json:
        with open(args.json, "a") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows.values())
    kd = rows.get("kd", next(iter(rows.values())))["student_images_per_second"]
    print(f"{'method':<10} {'img/s':>9} {'step x kd':>9} {'peak GiB':>9}")
    for method, row in rows.items():
        speed = row["student_images_per_second"]
        peak = row.get("peak_memory_gib", row.get("peak_rss_gib", float("nan")))
        print(f"{method:<10} {speed:>9,.0f} {kd / speed:>9.2f} {peak:>9.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
