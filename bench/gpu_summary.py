"""Summarise bench/gpu.sh's JSON lines: the fused groups, the sweep, the ladder and the packing,
as Markdown tables."""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

from tune_kd.plan import MEMBERS

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
GROUPS = ("fused-wrn", "fused-r32", "fused-mbv2")
GRID_STUDENT_IMAGES = 45 * EPOCHS * 50_000  # the study's first grid


def main(path: str, out: str | None = None) -> int:
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    if not rows:
        print("no measurements")
        return 1
    print(f"device: {rows[0]['device']}, torch {rows[0]['torch']}\n")
    print_groups(rows)
    if out is not None:
        print_sweep(Path(out))
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


def print_groups(rows: list[dict]) -> None:
    """Medians of the interleaved rounds: one student, the group one after another, fused."""
    measured = [r for r in rows if r["rung"] in GROUPS]
    if not measured:
        return
    print("| pair | students | path | student-images/s | x one student | peak GiB |")
    print("| --- | ---: | --- | ---: | ---: | ---: |")
    for rung in GROUPS:
        paths: dict[str, list[dict]] = {}
        for row in measured:
            if row["rung"] == rung:
                paths.setdefault(row["path"], []).append(row)
        if not paths:
            print(f"| {rung} | | not measured | | | |")
            continue
        speed = {
            p: statistics.median(r["student_images_per_second"] for r in rs)
            for p, rs in paths.items()
        }
        alone = speed.get("ours", float("nan"))
        for path, rs in paths.items():
            pair = f"{rs[0]['teacher']} -> {rs[0]['student']}"
            memory = rs[-1].get("peak_memory_gib")
            memory = "-" if memory is None else f"{memory:.2f}"
            print(
                f"| {pair} | {rs[0]['students']} | {path} | {speed[path]:.0f} | "
                f"{speed[path] / alone:.2f} | {memory} |"
            )
        fused = next((v for p, v in speed.items() if p.endswith("fused")), None)
        if rung == "fused-wrn" and fused:
            hours = GRID_STUDENT_IMAGES / fused / 3600
            print(f"\nthe study's 45-trial grid at the fused rate: {hours:.2f} GPU-hours\n")


def print_sweep(out: Path) -> None:
    """The sweep's wall time, and 240 epochs projected from its epochs after the first."""
    summary = out / "sweep.json"
    if not summary.exists():
        return
    wall = json.loads(summary.read_text())
    seconds: dict[str, list[float]] = {}  # per Ray trial: epoch_seconds of epochs 2..E
    for result in (out / "sweep").glob("*/*/result.json"):
        for line in result.read_text().splitlines():
            row = json.loads(line)
            row = next(iter(row[MEMBERS].values())) if MEMBERS in row else row
            if row["epoch"] > 1:
                seconds.setdefault(str(result.parent), []).append(row["epoch_seconds"])
    if not seconds:
        print(f"\nsweep: {wall['wall_seconds']} s, no epoch after the first reported")
        return
    epoch = max(statistics.mean(v) for v in seconds.values())  # the groups run side by side
    projected = wall["wall_seconds"] + (EPOCHS - wall["epochs"]) * epoch
    print(
        f"\nsweep (study_losses.yaml, {len(seconds)} Ray trials, {wall['epochs']} epochs): "
        f"{wall['wall_seconds']} s; an epoch {epoch:.1f} s; 240 epochs projected: "
        f"{projected / 3600:.2f} h"
    )


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
