"""Summarise bench/gpu.sh's JSON lines: the ladder and the packing, as Markdown tables."""

from __future__ import annotations

import json
import sys
from pathlib import Path

LADDER = (
    "reference",
    "device-fp32",
    "device-bf16-cl",
    "compiled",
    "cuda-graphs",
    "step-graph-fp32",
    "step-graph",
)
EPOCHS = 240


def main(path: str) -> int:
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    if not rows:
        print("no measurements")
        return 1
    print(f"device: {rows[0]['device']}, torch {rows[0]['torch']}\n")
    timed = {}
    for row in rows:
        if row["rung"] in LADDER:
            timed[row["rung"]] = row  # the last epoch of a rung is its timed one
    reference = timed.get("reference")
    print("| rung | epoch (s) | train images/s | x reference | 240 epochs (min) | peak GiB |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for rung in LADDER:
        if rung not in timed:
            print(f"| {rung} | not measured | | | | |")
            continue
        row = timed[rung]
        speed = row["student_images_per_second"]
        ratio = speed / reference["student_images_per_second"] if reference else float("nan")
        memory = "-" if row.get("peak_memory_gib") is None else f"{row['peak_memory_gib']:.2f}"
        print(
            f"| {rung} | {row['epoch_seconds']:.2f} | {speed:.0f} | {ratio:.1f} | "
            f"{EPOCHS * row['epoch_seconds'] / 60:.1f} | {memory} |"
        )
    eager, graphed = timed.get("device-fp32"), timed.get("step-graph-fp32")
    if eager and graphed and "train_loss" in eager:
        print(
            f"\nfp32, same seed, eager vs one CUDA graph per step: train loss "
            f"{eager['train_loss']:.6f} vs {graphed['train_loss']:.6f}, test accuracy "
            f"{eager['test_acc']:.2f} vs {graphed['test_acc']:.2f}"
        )
    packed = {}
    for row in rows:
        if row["rung"].startswith("packed-") and row["epoch"] == 2:
            packed.setdefault(int(row["rung"].split("-")[1]), []).append(row)
    if packed:
        print("\n| trials on the GPU | aggregate images/s | x one trial | peak GiB per trial |")
        print("| ---: | ---: | ---: | ---: |")
        single = sum(r["student_images_per_second"] for r in packed.get(1, [])) or float("nan")
        for k in sorted(packed):
            total = sum(r["student_images_per_second"] for r in packed[k])
            memory = max(r.get("peak_memory_gib") or 0 for r in packed[k])
            label = f"{k} ({len(packed[k])} reported)"
            print(f"| {label} | {total:.0f} | {total / single:.2f} | {memory:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
