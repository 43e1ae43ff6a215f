"""The paper's shipped search spaces run end to end through `python -m tune_kd.run`, each
shrunk by `--set` to one seed, one epoch and a few synthetic images, teachers trained first
included: every method, teacher and pair of the file runs its own code path."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import epochs_of, sweep

from tune_kd import models

SPACES = Path(__file__).parents[1] / "search_spaces"
TINY = {
    "dataset": "synthetic",
    "synthetic_train_size": 32,
    "synthetic_test_size": 16,
    "batch_size": 16,
    "epochs": 1,
    "lr_decay_epochs": [1],
    "seed": [0],
    "teacher_train.epochs": 1,
    "teacher_train.lr_decay_epochs": [1],
    # Sixteen small steps, so that the teachers' batch-norm statistics are mostly their data's and
    # their weights still near their initialisation: after two steps, or sixteen of lr 0.05, a
    # ResNet-110x2 evaluates to logits of 1e4 to 1e8, and SimKD's students of it diverge.
    "teacher_train.batch_size": 2,
    "teacher_train.lr": 0.0001,
}


def run_tiny(file: str, storage: Path, name: str) -> tuple[Path, str]:
    """The shipped space `file` swept as `TINY`: its experiment folder and the command's output."""
    flags = [
        part for key, value in TINY.items() for part in ("--set", f"{key}={json.dumps(value)}")
    ]
    done = sweep("--space", str(SPACES / file), *flags, "--storage", str(storage), "--name", name)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return storage / name, done.stdout


def finished_trials(experiment: Path) -> pd.DataFrame:
    """The experiment's trials table, every planned trial in it and completed after its epoch."""
    plan = json.loads((experiment / "tune_kd_plan.json").read_text())
    trials = pd.read_parquet(experiment / "results" / "trials.parquet")
    assert sorted(trials["trial_id"]) == [f"trial_{i:04d}" for i in range(plan["planned"])]
    assert set(trials["status"]) == {"completed"}
    assert set(trials["epochs_done"]) == {1}
    for group in range(len(plan["groups"])):
        assert epochs_of(experiment / f"group_{group:04d}") == [1]
    return trials


@pytest.mark.e2e
def test_paper_reuse_runs_every_method_and_ranks_their_pruning_ratios(tmp_path):
    experiment, out = run_tiny("paper_reuse.yaml", tmp_path / "results", "reuse")
    assert "training 1 teacher(s) first: resnet32x4" in out
    assert "9 planned: 9 completed" in out
    trials = finished_trials(experiment)
    assert sorted(trials["method"]) == ["kd", *["reuse"] * 6, "simkd", "student"]
    reuse = trials[trials["method"].eq("reuse")]
    assert sorted(zip(reuse["reuse_stage"], reuse["reuse_factor"])) == [
        (stage, factor) for stage in (1, 2) for factor in (1, 2, 4)
    ]

    summary = pd.read_csv(experiment / "results" / "summary.csv")
    ratio = summary.groupby("method")["pruning_ratio"]
    assert ratio.min()["student"] == ratio.min()["kd"] > ratio.max()["simkd"]
    assert ratio.min()["simkd"] > ratio.max()["reuse"]
    reused = summary[summary["method"].eq("reuse")].set_index(["reuse_stage", "reuse_factor"])
    for factor in (1, 2, 4):  # reusing the teacher from an earlier stage deploys more of it
        assert reused.loc[(1, factor), "pruning_ratio"] < reused.loc[(2, factor), "pruning_ratio"]
    for suffix in ("png", "svg"):
        assert (experiment / "results" / f"accuracy_vs_pruning_ratio.{suffix}").stat().st_size


@pytest.mark.e2e
def test_paper_table6_trains_both_teacher_groups_from_all_their_teachers(tmp_path):
    experiment, out = run_tiny("paper_table6.yaml", tmp_path / "results", "table6")
    assert "training 4 teacher(s) first: resnet32x4, resnet32x4, resnet32x4, resnet110x2" in out
    assert "7 planned: 7 completed" in out
    trials = finished_trials(experiment)
    groups = trials.groupby("extra_teachers")["method"].apply(sorted).to_dict()
    assert groups == {
        '["resnet32x4", "resnet32x4"]': ["aekd", "aveg", "simkd"],
        '["resnet32x4", "resnet110x2"]': ["aekd", "aveg", "simkd"],
    }

    plan = json.loads((experiment / "tune_kd_plan.json").read_text())
    distilled = 0
    for group in range(len(plan["groups"])):
        folder = experiment / f"group_{group:04d}" / "checkpoint_000000"
        state = torch.load(folder / "run.pt", weights_only=True)
        for member in state["members"]:
            config = member["config"]
            if config["method"] == "student":
                continue
            distilled += 1
            files = [config["teacher_checkpoint"], *config["extra_teacher_checkpoints"]]
            assert len(set(files)) == 3  # three teachers, three networks
            archs = [config["teacher"], *config["extra_teachers"]]
            widths = [models.load_checkpoint(f).get_classifier().in_features for f in files]
            assert widths == [models.create(a, 10).get_classifier().in_features for a in archs]
            if config["method"] == "simkd":  # one projector to each teacher's width
                last_conv = {  # a projector's convolutions in order: its last one stays
                    int(key.split(".")[1]): value.shape[0]
                    for key, value in member["distiller"].items()
                    if key.startswith("projectors.") and value.ndim == 4
                }
                assert [last_conv[i] for i in sorted(last_conv)] == widths
    assert distilled == 6


@pytest.mark.e2e
def test_paper_table4_trains_each_pairs_simkd_run_first_then_both_classifiers(tmp_path):
    experiment, out = run_tiny("paper_table4.yaml", tmp_path / "results", "table4")
    teachers_line = out.index("teacher(s) first")
    stage1_line = out.index("training 7 stage-1 SimKD run(s) first")
    assert teachers_line < stage1_line < out.index("14 planned: 14 completed")
    trials = finished_trials(experiment)
    pairs = trials.groupby(["teacher", "student"])["sequential_input"].apply(sorted)
    assert len(pairs) == 7 and all(inputs == ["projected", "student_pooled"] for inputs in pairs)
    plan = json.loads((experiment / "tune_kd_plan.json").read_text())
    sources = {t["config"]["sequential_from"] for t in plan["trials"]}
    assert len(sources) == 7  # one stage-1 run per pair, shared by its two classifiers
    assert all((Path(s) / "checkpoint.pt").exists() or Path(s).exists() for s in sources)
