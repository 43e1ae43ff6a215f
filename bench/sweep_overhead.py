"""Seconds of overhead per trial: N short trials through `python -m tune_kd.run` against the same
trials through a bare `tune.Tuner` calling the training engine directly.

    python bench/sweep_overhead.py --trials 8

Both run in a fresh process with a local Ray, so both pay Ray's start; the difference is what the
sweep adds: validating the space file, the plan, sharing data through the object store,
checkpoints every epoch, and the tables and plots at the end.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

CONFIG = {
    "dataset": "synthetic",
    "synthetic_train_size": 128,
    "synthetic_test_size": 64,
    "method": "student",
    "student": "resnet8",
    "batch_size": 32,
    "epochs": 2,
    "lr_decay_epochs": [],
}


def bare_tuner(trials: int, storage: str) -> None:
    """The same trials with nothing but Ray Tune around the engine."""
    import ray
    from ray import tune

    from tune_kd.train import Run

    def trainable(params: dict) -> None:
        run = Run([{**CONFIG, "seed": params["seed"]}])
        while not run.done:
            tune.report(run.train_epoch()[0])

    ray.init(log_to_driver=False, logging_level="ERROR")
    tuner = tune.Tuner(
        tune.with_resources(trainable, {"cpu": 1}),
        param_space={"seed": tune.grid_search(list(range(trials)))},
        run_config=tune.RunConfig(storage_path=storage, name="bare", verbose=0),
    )
    tuner.fit()


def timed(command: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--bare", metavar="STORAGE", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.bare:
        bare_tuner(args.trials, args.bare)
        return 0
    with tempfile.TemporaryDirectory() as folder:
        space = Path(folder) / "overhead.yaml"
        grid = {"seed": list(range(args.trials))}
        space.write_text(yaml.safe_dump({"name": "overhead", **CONFIG, "grid": grid}))
        ours = timed(
            [
                sys.executable,
                "-m",
                "tune_kd.run",
                "--space",
                str(space),
                "--storage",
                f"{folder}/ours",
            ]
        )
        bare = timed(
            [sys.executable, __file__, "--trials", str(args.trials), "--bare", f"{folder}/bare"]
        )
    print(
        f"{args.trials} trials: tune_kd.run {ours:.1f} s, bare tune.Tuner {bare:.1f} s, "
        f"overhead {(ours - bare) / args.trials:.2f} s per trial"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
