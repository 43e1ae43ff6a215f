"""How long the analysis of a large sweep takes: by default 2,000 trials of 240 epochs.

    .venv/bin/python bench/analysis_scale.py [--trials 2000] [--epochs 240] [--keep DIR]

Builds the experiment's folders as Ray Tune and the sweep write them (the plan, and per trial
params.json and result.json with one line per epoch: the trainable's metrics plus Tune's own keys)
in a temporary folder, then times `load_experiment`, `summarize` and writing every file, in wall
and CPU seconds: for a first analysis, again with nothing changed (what keeps the parses and the
plots of the first one is then used), and again after 5% of the trials reported another epoch
(their result.json parsed again, every plot drawn again).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import tempfile
import time
from pathlib import Path

from tune_kd import analysis
from tune_kd.plan import PLAN_FILE

LOSSES = ("l2", "kl")
RATES = (0.001, 0.005, 0.01, 0.05, 0.1)
PROJECTORS = ("single", "multi")
SECONDS_PER_EPOCH = 25.0


def plan(trials: int, epochs: int) -> dict:
    """loss x lr x projector x as many seeds as it takes to reach `trials`."""
    seeds = range(-(-trials // (len(LOSSES) * len(RATES) * len(PROJECTORS))))
    grid = list(itertools.product(LOSSES, RATES, PROJECTORS, seeds))[:trials]
    planned = []
    for index, (loss, lr, projector, seed) in enumerate(grid):
        axes = {"loss": loss, "lr": lr, "projector": projector, "seed": seed}
        labels = {"teacher": "resnet32x4", "student": "MobileNetV2_1_0", "method": "simkd", **axes}
        config = {**labels, "projector_design": "1x1-3x3-1x1", "epochs": epochs}
        planned.append({"index": index, "axes": axes, "labels": labels, "config": config})
    return {
        "name": "scale",
        "resources": {"cpu": 2.0, "gpu": 0.25},
        "space_text": "",
        "overrides": {},
        "planned": trials,
        "axes": ["loss", "lr", "projector", "seed"],
        "groups": [[i] for i in range(trials)],
        "metric": "best_test_acc",
        "trials": planned,
    }


def result_lines(index: int, axes: dict, epochs: int, rng: random.Random) -> str:
    """A trial's result.json: accuracy rising towards a plateau that depends on the lr."""
    plateau = 70 + 5 * (axes["lr"] >= 0.01) + rng.gauss(0, 0.5)
    lines, best = [], 0.0
    for epoch in range(1, epochs + 1):
        acc = plateau * (1 - 0.6 ** (epoch / 10)) + rng.gauss(0, 0.3)
        best = max(best, acc)
        line = {
            "epoch": epoch,
            "lr": axes["lr"],
            "train_loss": 4.6 * 0.99**epoch,
            "train_acc": acc + 10,
            "test_loss": 3.5 - acc / 40,
            "test_acc": acc,
            "test_acc_top5": min(100.0, acc + 18),
            "best_test_acc": best,
            "dropped_samples": 0,
            "epoch_seconds": SECONDS_PER_EPOCH,
            "images_per_second": 2000.0 + rng.random(),
            "teacher_test_acc": 79.42,
            "diverged": False,
            "timestamp": 1795732046 + epoch,
            "checkpoint_dir_name": f"checkpoint_{epoch - 1:06d}",
            "should_checkpoint": True,
            "done": False,
            "training_iteration": epoch,
            "trial_id": f"8a64b_{index:05d}",
            "date": "2026-11-26_22-27-26",
            "time_this_iter_s": SECONDS_PER_EPOCH,
            "time_total_s": SECONDS_PER_EPOCH * epoch,
            "pid": 10170,
            "hostname": "node-7",
            "node_ip": "10.0.0.7",
            "config": {"index": index, **axes},
            "time_since_restore": SECONDS_PER_EPOCH * epoch,
            "iterations_since_restore": epoch,
        }
        lines.append(json.dumps(line))
    return "\n".join(lines) + "\n"


def build(root: Path, trials: int, epochs: int) -> None:
    rng = random.Random(0)
    experiment = plan(trials, epochs)
    root.mkdir(parents=True)
    (root / PLAN_FILE).write_text(json.dumps(experiment))
    for trial in experiment["trials"]:
        folder = root / f"trial_{trial['index']:04d}"
        folder.mkdir()
        (folder / "params.json").write_text(json.dumps({"index": trial["index"], **trial["axes"]}))
        lines = result_lines(trial["index"], trial["axes"], epochs, rng)
        (folder / "result.json").write_text(lines)


def timed(label: str, work):
    """Run `work`, printing its wall time and the CPU time of every thread of this process (on a
    machine that other work shares, the CPU time varies less)."""
    start, cpu = time.perf_counter(), time.process_time()
    result = work()
    print(
        f"{label:<34}{time.perf_counter() - start:7.1f} s  ({time.process_time() - cpu:.1f} s CPU)"
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=2000)
    parser.add_argument("--epochs", type=int, default=240)
    parser.add_argument("--keep", type=Path, help="build the experiment here and keep it")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        root = (args.keep or Path(scratch)) / "scale"
        timed(
            f"build {args.trials} x {args.epochs} epochs",
            lambda: build(root, args.trials, args.epochs),
        )
        size = sum(f.stat().st_size for f in root.glob("*/result.json")) / 2**20
        print(f"result.json files: {size:.0f} MiB")
        out = str(root / analysis.RESULTS_FOLDER)
        first = analyse(root, out, "first analysis")
        analyse(root, out, "again, nothing changed")
        touched = sorted(root.glob("*/result.json"))[::20]
        for path in touched:  # a sweep still running: some trials reported another epoch
            line = json.loads(path.read_text().splitlines()[-1])
            line["epoch"] += 1
            line["training_iteration"] += 1
            with path.open("a") as file:
                file.write(json.dumps(line) + "\n")
        analyse(root, out, f"again, {len(touched)} result.json grown")
        rows, cells = len(first[0].epochs), len(first[1])
        print(
            f"{len(first[0].trials)} trials, {rows} epoch rows, {cells} cells, "
            f"{len(first[2])} files"
        )


def analyse(root: Path, out: str, label: str) -> tuple:
    """What `write_report` does, each step timed; the parses and plots it keeps in `out` make a
    second analysis of the same experiment quicker."""
    print(label)
    total, cpu = time.perf_counter(), time.process_time()
    experiment = timed("  load_experiment", lambda: analysis.load_experiment(str(root), out))
    summary = timed("  summarize", lambda: analysis.summarize(experiment.trials))
    files = timed(
        "  write parquet, tables and plots",
        lambda: analysis.write_files(experiment, summary, "best", out),
    )
    print(
        f"{'  total (read, summarize, write)':<34}{time.perf_counter() - total:7.1f} s"
        f"  ({time.process_time() - cpu:.1f} s CPU, load average {os.getloadavg()[0]:.1f})"
    )
    return experiment, summary, files


if __name__ == "__main__":
    main()
