"""A trial of a sweep, rerun alone with `tune_kd.train` and the same values, reports the same
metrics: both run with the threads the space file's `resources.cpu` gives a trial."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml
from conftest import ROOT, result_lines, sweep


@pytest.mark.e2e
def test_a_sweeps_trial_rerun_alone_reports_its_metrics(tiny, tmp_path):
    # Enough images that a second thread would split the sums of a batch differently.
    values = {**tiny, "synthetic_train_size": 192}
    space = tmp_path / "space.yaml"
    space.write_text(
        yaml.safe_dump(
            {**values, "name": "rerun", "grid": {"lr": [0.05, 0.2]}, "resources": {"cpu": 1}}
        )
    )
    done = sweep("--space", str(space), "--storage", str(tmp_path / "results"))
    assert done.returncode == 0, done.stderr[-3000:]
    command = ["-m", "tune_kd.train", "--config", str(space), "--set", "lr=0.2"]
    command += ["--out", str(tmp_path / "run"), "--storage", str(tmp_path / "results")]
    alone = subprocess.run(
        [sys.executable, *command], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert alone.returncode == 0, alone.stderr[-3000:]
    [trial] = [
        lines
        for path in (tmp_path / "results").glob("rerun-*/*/result.json")
        if (lines := result_lines(path.parent))[0]["lr"] == 0.2
    ]
    rows = [
        json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    ]
    keys = ("epoch", "train_loss", "test_acc")
    assert len(trial) == len(rows) == values["epochs"]
    assert [[r[k] for k in keys] for r in rows] == [[r[k] for k in keys] for r in trial]
