"""Tests for tune_kd.analysis: Tune folders -> trials and epochs frames -> summary, files, plots."""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pandas as pd
import pyarrow as pa
import pytest
from nbclient import NotebookClient

from tune_kd import analysis
from tune_kd.analysis import read as read_module
from tune_kd.analysis import report as report_module
from tune_kd.analysis.plots import PUBLISHED_OFFSET
from tune_kd.plan import PLAN_FILE

EPOCHS = 4
GPU = 0.5
SECONDS_PER_EPOCH = 900.0  # a lone trial: 4 epochs = 1 h = 0.5 GPU-hours
GROUP_SECONDS_PER_EPOCH = 1200.0  # the group: 4 epochs = 4800 s = 2/3 GPU-hours for two students
TEACHER = "resnet32x4"
STUDENT = "MobileNetV2_1_0"
ROOT = Path(__file__).parents[1]
NOTEBOOK = ROOT / "analysis" / "sweep_report.ipynb"

# ----------------------------------------------------------------------------- building folders


def engine_row(epoch: int, acc: float, best: float, diverged: bool = False) -> dict:
    """What the trainable reports for one student and epoch."""
    return {
        "epoch": epoch,
        "lr": 0.01,
        "train_loss": 1.5,
        "train_acc": acc + 5,
        "test_loss": 3.0 - acc / 50,
        "test_acc": acc,
        "test_acc_top5": acc + 20,
        "best_test_acc": best,
        "dropped_samples": 0,
        "epoch_seconds": 10.0,
        "images_per_second": 5000.0,
        "teacher_test_acc": 79.0,
        "diverged": diverged,
    }


def engine_rows(accuracies: list[float], diverged_at: int | None = None) -> list[dict]:
    rows, best = [], 0.0
    for epoch, acc in enumerate(accuracies, 1):
        diverged = epoch == diverged_at
        best = best if diverged else max(best, acc)
        rows.append(engine_row(epoch, acc, best, diverged))
    return rows


def curve(base: float, epochs: int = EPOCHS) -> list[float]:
    """Best at epoch 2 (`base`), last `base - 0.5`."""
    return [base - 3, base, base - 1, base - 0.5][:epochs]


def tune_line(metrics: dict, position: int, seconds: float) -> dict:
    """A result.json line as Tune writes it: the reported metrics plus Tune's own keys."""
    epoch = metrics["epoch"]
    return {
        **metrics,
        "timestamp": 1795732046 + epoch,
        "checkpoint_dir_name": f"checkpoint_{epoch - 1:06d}",
        "should_checkpoint": True,
        "done": False,
        "training_iteration": epoch,
        "trial_id": f"8a64b_{position:05d}",
        "date": "2026-11-26_22-27-26",
        "time_this_iter_s": seconds,
        "time_total_s": seconds * epoch,
        "pid": 10170,
        "hostname": "node",
        "node_ip": "10.0.0.2",
        "config": {"index": position},
        "time_since_restore": seconds * epoch,
        "iterations_since_restore": epoch,
    }


def group_line(members: dict[int, dict], position: int, seconds: float) -> dict:
    rows = list(members.values())
    top = {key: max(r[key] for r in rows) for key in ("test_acc", "best_test_acc", "test_acc_top5")}
    metrics = {"epoch": rows[0]["epoch"], **top, "members": {str(i): r for i, r in members.items()}}
    return tune_line(metrics, position, seconds)


def tune_error(*failures: str) -> str:
    """error.txt as Tune appends to it: each failure under a `Failure # N` header."""
    return "".join(
        f"Failure # {n} (occurred at 2026-11-27_09-59-4{n})\n{failure}\n"
        for n, failure in enumerate(failures, 1)
    )


def traceback(line: str) -> str:
    """A trial's exception as Tune writes it: the end of a traceback through Ray's worker."""
    return (
        "ray::ImplicitFunc.train() (pid=9038, ip=192.0.2.2, repr=train_trial)\n"
        '  File "tune_kd/trainable.py", line 63, in train_trial\n'
        "    metrics = run.train_epoch()\n"
        f"{line}"
    )


ACTOR_DIED = """The actor died unexpectedly before finishing this task.
\tclass_name: ImplicitFunc
\tpid: 9039
The actor is dead because its worker process has died. Worker exit type: SYSTEM_ERROR"""


def write_lines(folder: Path, lines: list[dict], cut_last: bool = False) -> None:
    text = "".join(json.dumps(line) + "\n" for line in lines)
    if cut_last:
        text = text[: -len(json.dumps(lines[-1])) // 2]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "result.json").write_text(text)


def write_params(folder: Path, params: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "params.json").write_text(json.dumps(params))


def plan_trial(index: int, axes: dict, projector: str = "multi") -> dict:
    labels = {
        "teacher": TEACHER,
        "student": STUDENT,
        "method": "simkd",
        "loss": axes["loss"],
        "projector": projector,
        "lr": axes["lr"],
        "seed": axes["seed"],
    }
    config = {
        **labels,
        "projector_design": "1x1-3x3-1x1",
        "teacher_correct_only": False,
        "epochs": EPOCHS,
    }
    return {"index": index, "axes": axes, "labels": labels, "config": config}


def write_plan(root: Path, trials: list[dict], groups: list[list[int]], **extra) -> None:
    plan = {
        "name": "test-sweep",
        "resources": {"cpu": 2.0, "gpu": GPU},
        "space_file": "search_spaces/test.yaml",
        "space_text": "",
        "overrides": {},
        "planned": len(trials),
        "axes": ["loss", "lr", "seed"],
        "groups": groups,
        "metric": "best_test_acc",
        "trials": trials,
        **extra,
    }
    root.mkdir(parents=True, exist_ok=True)
    (root / PLAN_FILE).write_text(json.dumps(plan, indent=1))


GRID = [(loss, lr, seed) for loss in ("l2", "kl") for lr in (0.01, 0.05) for seed in (0, 1, 2)]
GROUPS = [[0], [1], [2, 5], [3], [4], [6], [7], [8], [9], [10], [11]]  # position 2: two students
BASES = {0: 70, 1: 71, 2: 72, 3: 74, 5: 76, 6: 60, 9: 65, 11: 67}  # completed: best accuracy


def build_experiment(root: Path) -> Path:
    """12 planned trials (loss x lr x seed), packed into 11 Ray trials; one group of two students
    (plan 2 and 5); plan 4 diverges, 7 errors, 8 never starts, 10's last line is cut mid-write."""
    trials = [
        plan_trial(i, {"loss": lo, "lr": lr, "seed": s}) for i, (lo, lr, s) in enumerate(GRID)
    ]
    write_plan(root, trials, GROUPS)
    for position, members in enumerate(GROUPS):
        folder = root / f"group_{position:04d}"
        if members == [8]:
            continue
        write_params(folder, {"index": position, "students": len(members)})
        if len(members) == 2:
            rows = {i: engine_rows(curve(BASES[i])) for i in members}
            lines = [
                group_line({i: rows[i][e] for i in members}, position, GROUP_SECONDS_PER_EPOCH)
                for e in range(EPOCHS)
            ]
            write_lines(folder, lines)
            continue
        index = members[0]
        if index == 4:
            rows = engine_rows([40.0, 1.0], diverged_at=2)
        elif index == 7:
            rows = engine_rows(curve(62, epochs=2))
            error = traceback("RuntimeError: CUDA out of memory")
            (folder / "error.txt").write_text(tune_error(error))
        elif index == 10:
            rows = engine_rows(curve(66))
        else:
            rows = engine_rows(curve(BASES[index]))
        lines = [tune_line(row, position, SECONDS_PER_EPOCH) for row in rows]
        write_lines(folder, lines, cut_last=index == 10)
    return root


@pytest.fixture(scope="module")
def experiment_dir(tmp_path_factory) -> Path:
    return build_experiment(tmp_path_factory.mktemp("exp") / "test-sweep")


@pytest.fixture(scope="module")
def experiment(experiment_dir) -> analysis.Experiment:
    return analysis.load_experiment(str(experiment_dir))


@pytest.fixture(scope="module")
def cli_run(experiment_dir) -> tuple[int, str]:
    """The command line run once over the experiment: its exit code and printed summary."""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = analysis.main([str(experiment_dir)])
    return code, printed.getvalue()


def cell(summary: pd.DataFrame, loss: str, lr: float) -> pd.Series:
    rows = summary[(summary["loss"] == loss) & (summary["lr"] == lr)]
    assert len(rows) == 1
    return rows.iloc[0]


def trial(trials: pd.DataFrame, index: int) -> pd.Series:
    return trials.set_index("trial_id").loc[f"trial_{index:04d}"]


# ----------------------------------------------------------------------------- trials and epochs


def test_every_planned_trial_has_a_row_with_its_status(experiment):
    trials = experiment.trials
    assert list(trials["trial_id"]) == [f"trial_{i:04d}" for i in range(12)]
    statuses = dict(zip(trials["trial_id"], trials["status"]))
    assert statuses == {
        **{f"trial_{i:04d}": "completed" for i in BASES},
        "trial_0004": "diverged",
        "trial_0007": "error",
        "trial_0008": "pending",
        "trial_0010": "running",
    }


def test_trial_results_best_final_epochs_and_cost(experiment):
    lone = trial(experiment.trials, 3)
    assert (lone["best_test_acc"], lone["best_epoch"]) == (74.0, 2)
    assert (lone["final_test_acc"], lone["final_test_acc_top5"]) == (73.5, 93.5)
    assert lone["best_test_acc_top5"] == 94.0  # the best over the epochs, as top-1's
    assert (lone["epochs_done"], lone["epochs_planned"]) == (4, 4)
    assert lone["wall_seconds"] == 3600.0
    assert lone["gpu_hours"] == pytest.approx(0.5)
    assert lone["teacher_test_acc"] == 79.0
    assert (lone["loss"], lone["lr"], lone["seed"]) == ("l2", 0.05, 0)
    diverged = trial(experiment.trials, 4)
    assert (diverged["best_test_acc"], diverged["final_test_acc"]) == (40.0, 1.0)
    pending = trial(experiment.trials, 8)
    assert pending["epochs_done"] == 0 and math.isnan(pending["gpu_hours"])


def test_group_members_are_rows_like_separate_trials(experiment):
    first, second = trial(experiment.trials, 2), trial(experiment.trials, 5)
    assert (first["status"], second["status"]) == ("completed", "completed")
    assert (first["best_test_acc"], second["best_test_acc"]) == (72.0, 76.0)
    assert (first["lr"], second["lr"]) == (0.01, 0.05)
    assert first["wall_seconds"] == second["wall_seconds"] == 4 * GROUP_SECONDS_PER_EPOCH
    group_hours = 4 * GROUP_SECONDS_PER_EPOCH * GPU / 3600
    assert first["gpu_hours"] == pytest.approx(group_hours / 2)
    member_epochs = experiment.epochs[experiment.epochs["trial_id"] == "trial_0005"]
    lone_epochs = experiment.epochs[experiment.epochs["trial_id"] == "trial_0003"]
    assert list(member_epochs["test_acc"]) == curve(76)
    assert member_epochs.notna().sum().to_dict() == lone_epochs.notna().sum().to_dict()


def test_corrupt_result_line_is_reported_and_the_rest_read(experiment):
    assert any("group_0009/result.json" in p and "line 4" in p for p in experiment.problems)
    running = trial(experiment.trials, 10)
    assert running["epochs_done"] == 3 and running["best_test_acc"] == 66.0


def test_corrupt_line_prints_a_warning(experiment_dir, caplog):
    with caplog.at_level("WARNING", logger="tune_kd.analysis"):
        analysis.load_experiment(str(experiment_dir))
    assert "group_0009/result.json" in caplog.text


def test_parquet_schemas(cli_run, experiment_dir):
    results = experiment_dir / "results"
    trials = pd.read_parquet(results / "trials.parquet")
    assert list(trials.columns) == [
        "trial_id",
        "status",
        "teacher",
        "student",
        "method",
        "loss",
        "projector",
        "lr",
        "seed",
        "projector_design",
        "teacher_correct_only",
        *analysis.TRIAL_RESULTS,
    ]
    dtypes = trials.dtypes.astype(str).to_dict()
    assert {k: dtypes[k] for k in analysis.TRIAL_RESULTS} == analysis.TRIAL_RESULTS
    assert (dtypes["lr"], dtypes["seed"], dtypes["teacher_correct_only"]) == (
        "float64",
        "Int64",
        "boolean",
    )
    assert all(pd.api.types.is_string_dtype(trials[k]) for k in ("trial_id", "status", "loss"))
    epochs = pd.read_parquet(results / "epochs.parquet")
    assert set(engine_row(1, 0, 0)) | {"trial_id", "time_total_s"} == set(epochs.columns)
    assert (epochs["epoch"].dtype, epochs["diverged"].dtype) == ("int64", "bool")
    assert epochs["test_acc"].dtype == "float64"
    assert len(epochs) == 8 * EPOCHS + 2 + 2 + 3  # completed, diverged, errored, cut


# ----------------------------------------------------------------------------- summary


def test_summary_per_cell(experiment):
    summary = analysis.summarize(experiment.trials)
    assert len(summary) == 4
    full = cell(summary, "l2", 0.01)
    assert (full["mean"], full["std"], full["n"], full["n_planned"]) == (71.0, 1.0, 3, 3)
    assert not full["incomplete"]
    assert full["gpu_hours"] == pytest.approx((0.5 + 0.5 + 1 / 3) / 3)
    with_diverged = cell(summary, "l2", 0.05)
    assert with_diverged["mean"] == 75.0
    assert with_diverged["std"] == pytest.approx(math.sqrt(2))
    assert (with_diverged["n"], with_diverged["diverged"]) == (2, 1)
    assert with_diverged["incomplete"]
    single = cell(summary, "kl", 0.01)
    assert (single["n"], single["error"], single["pending"]) == (1, 1, 1)
    assert math.isnan(single["std"])
    assert cell(summary, "kl", 0.05)["running"] == 1
    assert list(summary["best"]) == [False, True, False, False]
    assert (summary["teacher_acc"] == 79.0).all()
    assert "seed" not in summary.columns


def test_last_metric_uses_the_final_epoch(experiment):
    best = cell(analysis.summarize(experiment.trials, "best"), "l2", 0.01)
    last = cell(analysis.summarize(experiment.trials, "last"), "l2", 0.01)
    assert (best["mean"], last["mean"]) == (71.0, 70.5)


def test_published_numbers_stand_in_the_matching_rows(experiment):
    summary = analysis.summarize(experiment.trials)
    multi_l2 = cell(summary, "l2", 0.01)
    assert (multi_l2["published_mean"], multi_l2["published_std"]) == (75.52, 0.18)
    assert multi_l2["published_source"] == "study multiple projectors"
    assert multi_l2["published_teacher"] == 79.42
    assert (multi_l2["baseline_mean"], multi_l2["baseline_std"]) == (75.43, 0.26)
    assert cell(summary, "kl", 0.01)["published_mean"] == 66.88
    assert pd.isna(cell(summary, "kl", 0.05)["published_mean"])


def test_published_match_prefers_the_most_specific_row():
    rows = analysis.published_numbers().to_dict("records")
    base = {"teacher": "resnet32x4", "student": "resnet8x4", "method": "simkd", "loss": "l2"}
    design = analysis.most_specific(base | {"projector": "single", "projector_design": "1x1"}, rows)
    assert (design["table"], design["mean"]) == ("Table 5", 75.15)
    plain = analysis.most_specific(base | {"projector": "single", "lr": 0.05}, rows)
    assert (plain["table"], plain["mean"]) == ("Table 1", 78.08)
    baseline = {"teacher": None, "student": "ShuffleV2", "method": "student", "loss": None}
    assert analysis.most_specific(baseline, rows)["mean"] == 72.60
    cosine = base | {"teacher": "resnet38x2", "loss": "cosine", "projector": "single", "lr": 0.1}
    assert analysis.most_specific(cosine, rows)["mean"] == 75.05


def test_published_table_holds_the_seed_numbers():
    published = analysis.published_numbers()
    labels = published[(published["table"] == "using labels") & (published["lr"] == 0.001)]
    assert labels.iloc[0]["mean"] == 18.36 and pd.isna(labels.iloc[0]["std"])
    assert labels.iloc[0]["teacher_correct_only"]
    simkd = published[(published["method"] == "simkd") & (published["student"] == STUDENT)]
    assert (simkd.iloc[0]["mean"], simkd.iloc[0]["std"], simkd.iloc[0]["n"]) == (75.43, 0.26, 4)
    designs = published.loc[published["table"] == "Table 5", "projector_design"]
    assert list(designs) == ["1x1", "1x1-1x1", "1x1-dw3x3-1x1", "1x1-3x3-1x1"]
    methods = {"student", "teacher", *PAPER_METHODS, "dkd", "reuse", "aveg", "aekd", "sequential"}
    assert set(published["method"]) == methods


PAPER_METHODS = ("kd", "fitnet", "at", "sp", "vid", "crd", "srrl", "semckd", "simkd")


def test_published_table_holds_every_method_of_tables_1_and_2_and_dkd():
    published = analysis.published_numbers()
    paper = published[published["table"].isin(["Table 1", "Table 2"])]
    for method in PAPER_METHODS:
        rows = paper[paper["method"] == method]
        assert len(rows) == 14 and (rows["n"] == 4).all() and rows["std"].notna().all(), method
        assert len(rows[["table", "teacher", "student"]].drop_duplicates()) == 14, method
    pairs = {
        m: set(zip(*(paper.loc[paper["method"] == m, k] for k in ("table", "teacher", "student"))))
        for m in PAPER_METHODS
    }
    assert all(p == pairs["kd"] for p in pairs.values())
    crd = paper[(paper["method"] == "crd") & (paper["student"] == "ShuffleV2")]
    assert list(zip(crd["table"], crd["mean"], crd["std"])) == [
        ("Table 1", 77.04, 0.61),
        ("Table 2", 76.67, 0.27),
    ]
    keys = ["source", "table", "teacher", "student", "method", "loss", "projector", "lr"]
    keys += ["projector_design", "teacher_correct_only", "reuse_stage", "reuse_factor"]
    assert not published.duplicated([*keys, "extra_teachers"]).any()
    dkd = published[published["method"] == "dkd"]
    assert len(dkd) == 11 and dkd["std"].isna().all() and dkd["note"].notna().all()
    assert dkd["source"].str.contains("DKD").all()
    # SimKD+ / SimKD++ and Sequential: configurations the paper does not give
    inferred = published["method"].isin(["reuse", "sequential"])
    assert published.loc[inferred, "note"].str.contains("configuration").all()
    assert published.loc[~inferred & (published["method"] != "dkd"), "note"].isna().all()
    shufflev2 = dkd[(dkd["teacher"] == "resnet32x4") & (dkd["student"] == "ShuffleV2")]
    assert shufflev2["mean"].item() == 77.07


def test_format_accuracy():
    assert analysis.format_accuracy(75.434, 0.256, 3) == "75.43 ± 0.26"
    assert analysis.format_accuracy(18.36, float("nan"), 1) == "18.36 ± n/a (n=1)"
    assert analysis.format_accuracy(float("nan"), float("nan"), 0) == "—"


def test_terminal_summary(cli_run):
    code, printed = cli_run
    assert code == 0
    assert (
        "failed trials:\n  trial_0007 (loss=kl, lr=0.01, seed=1): RuntimeError: CUDA out of memory"
        in printed
    )
    assert "60.00 ± n/a (n=1)" in printed and "nan" not in printed
    assert "75.00 ± 1.41 ★" in printed
    assert "2/3 †" in printed and "3/3 †" not in printed
    assert "1 diverged" in printed
    assert "trials: 12 planned: 8 completed, 1 diverged, 1 error, 1 running, 1 pending" in printed
    assert "75.52 ± 0.18 (study multiple projectors)" in printed
    assert "in every cell: projector_design=1x1-3x3-1x1, teacher_correct_only=False" in printed
    assert "summary.md" in printed.splitlines()[-1]


def test_cell_without_finished_trials_shows_a_dash(experiment):
    trials = experiment.trials.copy()
    trials.loc[trials["loss"] == "kl", "status"] = "pending"
    summary = analysis.summarize(trials)
    markdown = analysis.summary_markdown(summary, "best", "t", [])
    kl_rows = [line for line in markdown.splitlines() if "| kl |" in line]
    assert len(kl_rows) == 2 and all("| — |" in line and "0/3 †" in line for line in kl_rows)


def test_files_written_by_the_command_line(cli_run, experiment_dir):
    results = experiment_dir / "results"
    markdown = (results / "summary.md").read_text()
    assert "75.00 ± 1.41 ★" in markdown and "group_0009/result.json" in markdown
    assert "Failed trials:\n- trial_0007 (loss=kl, lr=0.01, seed=1): RuntimeError: CUDA" in markdown
    csv = pd.read_csv(results / "summary.csv")
    assert csv.loc[csv["best"], "mean"].item() == 75.0
    assert r"75.00 $\pm$ 1.41 $\star$" in (results / "summary.tex").read_text()
    for name in ("accuracy_vs_lr", "test_acc_curves", "test_loss_curves", "top5_vs_lr"):
        assert (results / f"{name}.png").read_bytes().startswith(b"\x89PNG")
        assert b"<svg" in (results / f"{name}.svg").read_bytes()
    assert (results / "accuracy_vs_gpu_hours.png").read_bytes().startswith(b"\x89PNG")


def test_out_option_and_metric(experiment_dir, tmp_path):
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = analysis.main([str(experiment_dir), "--out", str(tmp_path), "--metric", "last"])
    assert code == 0 and "final-epoch test top-1 (%)" in printed.getvalue()
    assert pd.read_csv(tmp_path / "summary.csv")["mean"].max() == (73.5 + 75.5) / 2


@pytest.mark.parametrize("make", ["missing", "no plan"])
def test_bad_folder_exits_2_with_one_line(tmp_path, capsys, make):
    folder = tmp_path / "experiment"
    if make == "no plan":
        (folder / "trial_0000").mkdir(parents=True)
    assert analysis.main([str(folder)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err


# ----------------------------------------------------------------------------- plots


def test_plots_return_figures_with_labels(experiment):
    fig = analysis.plot_accuracy_vs_lr(experiment.trials)
    ax = fig.axes[0]
    assert ax.get_xscale() == "log" and "learning rate" in ax.get_xlabel()
    labels = ax.get_legend_handles_labels()[1]
    assert "loss=l2" in labels and "loss=kl" in labels
    assert any("teacher resnet32x4 (measured): 79.00" in label for label in labels)
    assert any("paper SimKD" in label and "75.43" in label for label in labels)
    curves = analysis.plot_curves(experiment.epochs, experiment.trials, "test_loss")
    assert [a.get_title() for a in curves.axes] == ["loss=l2", "loss=kl"]
    assert curves.axes[0].get_legend_handles_labels()[1] == ["lr=0.01", "lr=0.05"]


def test_loss_curves_stay_readable_when_one_curve_spikes(experiment):
    """A loss of 250 in one trial's first epoch leaves the others' curves visible: a log axis."""
    epochs = experiment.epochs.copy()
    first = epochs.index[
        (epochs["trial_id"] == epochs["trial_id"].iloc[0]) & (epochs["epoch"] == 1)
    ]
    epochs.loc[first, "test_loss"] = 250.0
    curves = analysis.plot_curves(epochs, experiment.trials, "test_loss")
    assert {ax.get_yscale() for ax in curves.axes if ax.get_visible()} == {"log"}
    accuracy = analysis.plot_curves(epochs, experiment.trials, "test_acc")
    assert {ax.get_yscale() for ax in accuracy.axes if ax.get_visible()} == {"linear"}


def test_plots_without_their_data_are_skipped(experiment):
    one_lr = experiment.trials[experiment.trials["lr"] == 0.01]
    assert analysis.plot_accuracy_vs_lr(one_lr) is None
    assert analysis.plot_top5_vs_lr(one_lr) is None
    no_gpu = experiment.trials.assign(gpu_hours=0.0)
    assert analysis.plot_accuracy_vs_gpu_hours(no_gpu) is None
    assert analysis.plot_curves(experiment.epochs.iloc[:0], experiment.trials) is None


@pytest.mark.parametrize(
    ("metric", "name", "top1", "top5"),
    [("best", "best", 71.0, 91.0), ("last", "final-epoch", 70.5, 90.5)],
)
def test_top1_and_top5_plots_show_the_same_statistic(experiment, metric, name, top1, top5):
    """Each trial's best epoch is not its last (`curve`), and top-5 is top-1 + 20 in every epoch:
    both plots show the best values, or both the final ones, and say which."""
    figures = analysis.figures(experiment, metric)
    for figure, statistic, value in (
        (figures["accuracy_vs_lr"], "top-1", top1),
        (figures["top5_vs_lr"], "top-5", top5),
    ):
        ax = figure.axes[0]
        label = f"{name} test {statistic} (%)"
        assert ax.get_ylabel() == label and label.removesuffix(" (%)") in ax.get_title()
        handles, labels = ax.get_legend_handles_labels()
        l2 = handles[labels.index("loss=l2")].lines[0]  # an errorbar's line, by learning rate
        assert l2.get_ydata()[0] == pytest.approx(value)  # the cell loss=l2, lr=0.01


# ----------------------------------------------------------------------------- cost


def with_resources(experiment_dir: Path, tmp_path: Path, resources: dict | None) -> Path:
    """A copy of the experiment whose plan says the trials held `resources` (None: not said)."""
    root = shutil.copytree(
        experiment_dir, tmp_path / "copy", ignore=shutil.ignore_patterns("results")
    )
    plan = json.loads((root / PLAN_FILE).read_text())
    plan.pop("resources")
    if resources is not None:
        plan["resources"] = resources
    (root / PLAN_FILE).write_text(json.dumps(plan))
    return root


def test_trials_on_cpus_cost_cpu_hours_never_gpu_hours(experiment_dir, tmp_path):
    root = with_resources(experiment_dir, tmp_path, {"cpu": 2.0, "gpu": 0.0})
    trials = analysis.load_experiment(str(root)).trials
    lone, member = trial(trials, 3), trial(trials, 2)
    assert lone["cpu_hours"] == pytest.approx(2 * 4 * SECONDS_PER_EPOCH / 3600)
    assert member["cpu_hours"] == pytest.approx(2 * 4 * GROUP_SECONDS_PER_EPOCH / 3600 / 2)
    assert trials["gpu_hours"].isna().all()
    summary = analysis.summarize(trials)
    table = analysis.display_table(summary)
    assert "CPU-h" in table.columns and "GPU-h" not in table.columns
    assert cell(table.assign(loss=summary["loss"], lr=summary["lr"]), "l2", 0.01)["CPU-h"] == (
        f"{2 * (1 + 1 + 2 / 3) / 3:.2f}"  # the mean of 2 CPUs x (1 h, 1 h, 4800 s / 2)
    )
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert analysis.main([str(root)]) == 0
    assert "CPU-h" in printed.getvalue() and "GPU-h" not in printed.getvalue()
    assert "CPU-h" in (root / "results" / "summary.md").read_text()


def test_trials_on_gpus_cost_gpu_hours_only(experiment):
    table = analysis.display_table(analysis.summarize(experiment.trials))
    assert "GPU-h" in table.columns and "CPU-h" not in table.columns
    assert experiment.trials["cpu_hours"].isna().all()


def test_cost_of_a_plan_without_resources_is_unknown(experiment_dir, tmp_path):
    trials = analysis.load_experiment(str(with_resources(experiment_dir, tmp_path, None))).trials
    assert trials[["gpu_fraction", "gpu_hours", "cpu_hours"]].isna().all().all()
    table = analysis.display_table(analysis.summarize(trials))
    assert not {"GPU-h", "CPU-h"} & set(table.columns)


def test_short_trials_cost_is_not_rounded_to_zero(experiment):
    short = experiment.trials.assign(gpu_hours=experiment.trials["gpu_hours"] / 1000)
    table = analysis.display_table(analysis.summarize(short))
    assert set(table["GPU-h"]) - {"-"} and not table["GPU-h"].str.fullmatch(r"0\.0+").any()


# ----------------------------------------------------------------------------- other layouts


def test_runner_state_decides_statuses(tmp_path):
    """TERMINATED early (an ASHA stop) is completed; ERROR is an error even with results; a
    PENDING entry without a folder is pending."""
    root = tmp_path / "state"
    trials = [plan_trial(i, {"loss": "l2", "lr": 0.01, "seed": i}) for i in range(3)]
    write_plan(root, trials, [[0], [1], [2]])
    for position in (0, 1):
        rows = engine_rows(curve(70, epochs=2))
        write_lines(root / f"trial_{position:04d}", [tune_line(r, position, 60) for r in rows])
    states = {"trial_0000": "TERMINATED", "trial_0001": "ERROR", "trial_0002": "PENDING"}
    entries = [
        [json.dumps({"trial_id": f"x_{i}", "status": s, "relative_logdir": name}), "{}"]
        for i, (name, s) in enumerate(states.items())
    ]
    (root / "experiment_state-2026-01-01_00-00-00.json").write_text("{}")
    (root / "experiment_state-2026-01-02_00-00-00.json").write_text(
        json.dumps({"trial_data": entries})
    )
    trials = analysis.load_experiment(str(root)).trials
    assert list(trials["status"]) == ["completed", "error", "pending"]


def test_a_stopped_sweeps_queued_trials_are_pending_and_its_started_ones_running(tmp_path):
    """A stopped sweep's runner state: its queued trials have folders but are still PENDING."""
    root = tmp_path / "stopped"
    trials = [plan_trial(i, {"loss": "l2", "lr": 0.01, "seed": i}) for i in range(3)]
    write_plan(root, trials, [[0], [1], [2]])
    rows = engine_rows(curve(70, epochs=1))
    write_lines(root / "trial_0000", [tune_line(r, 0, 60) for r in rows])
    for position in (1, 2):
        (root / f"trial_{position:04d}").mkdir()
        (root / f"trial_{position:04d}" / "params.json").write_text("{}")
    states = {"trial_0000": "PENDING", "trial_0001": "PENDING", "trial_0002": "RUNNING"}
    entries = [
        [json.dumps({"trial_id": f"x_{i}", "status": s, "relative_logdir": name}), "{}"]
        for i, (name, s) in enumerate(states.items())
    ]
    (root / "experiment_state-2026-01-02_00-00-00.json").write_text(
        json.dumps({"trial_data": entries})
    )
    trials = analysis.load_experiment(str(root)).trials
    assert list(trials["status"]) == ["running", "pending", "running"]


def test_group_student_that_diverged_leaves_the_later_lines(tmp_path):
    root = tmp_path / "group"
    write_plan(
        root,
        [plan_trial(i, {"loss": "l2", "lr": lr, "seed": 0}) for i, lr in enumerate((0.01, 0.5))],
        [[0, 1]],
    )
    steady, diverging = engine_rows(curve(70)), engine_rows([30.0, 2.0], diverged_at=2)
    lines = [
        group_line({0: row, 1: diverging[e]} if e < 2 else {0: row}, 0, 60)
        for e, row in enumerate(steady)
    ]
    write_lines(root / "group_0000", lines)
    experiment = analysis.load_experiment(str(root))
    assert list(experiment.trials["status"]) == ["completed", "diverged"]
    assert list(experiment.trials["epochs_done"]) == [4, 2]
    assert list(experiment.trials["wall_seconds"]) == [240.0, 240.0]


def test_folder_outside_the_plan_is_reported(experiment_dir, tmp_path):
    root = shutil.copytree(
        experiment_dir, tmp_path / "copy", ignore=shutil.ignore_patterns("results")
    )
    (root / "trial_0099").mkdir()
    experiment = analysis.load_experiment(str(root))
    assert "trial_0099 matches no planned trial: ignored" in experiment.problems
    assert len(experiment.trials) == 12


def test_the_error_of_a_failed_trial_is_its_last_failures_message(experiment):
    errors = experiment.trials.set_index("trial_id")["error"]
    assert errors["trial_0007"] == "RuntimeError: CUDA out of memory"
    assert errors.drop("trial_0007").isna().all()  # only trials that ended in error have one


@pytest.mark.parametrize(
    "failures, message",
    [
        (
            [
                traceback("RuntimeError: injected fault at epoch 2"),
                traceback("ValueError: a, b: c"),
            ],
            "ValueError: a, b: c",
        ),
        ([traceback("RuntimeError: first"), ACTOR_DIED], ACTOR_DIED.splitlines()[0]),
        (
            [traceback("ray.exceptions.RayTaskError(RuntimeError): boom\nRuntimeError: boom")],
            "RuntimeError: boom",
        ),
        (["x" * 400], "x" * 299 + "…"),
    ],
)
def test_last_failure_of_an_error_file(failures, message):
    assert analysis.last_failure(tune_error(*failures)) == message


def test_a_trial_retried_after_a_failure_has_no_error(tmp_path):
    """error.txt stays after a retry that then finished: the trial is completed, without error."""
    root = tmp_path / "retried"
    write_plan(root, [plan_trial(0, {"loss": "l2", "lr": 0.01, "seed": 0})], [[0]])
    rows = engine_rows(curve(70))
    write_lines(root / "trial_0000", [tune_line(r, 0, 60) for r in rows])
    (root / "trial_0000" / "error.txt").write_text(tune_error(ACTOR_DIED))
    trials = analysis.load_experiment(str(root)).trials
    assert list(trials["status"]) == ["completed"] and trials["error"].isna().all()


def test_an_epoch_reported_twice_keeps_its_last_report():
    metrics = pa.table({"epoch": [1, 2, 3, 2, 3, 4], "test_acc": [1.0, 2, 3, 20, 30, 40]})
    kept = analysis.latest_per_epoch(metrics)
    assert kept.column("epoch").to_pylist() == [1, 2, 3, 4]
    assert kept.column("test_acc").to_pylist() == [1.0, 20, 30, 40]


def test_optuna_samples_are_found_in_the_folders(tmp_path):
    root = tmp_path / "optuna"
    base = {"teacher": "resnet38x2", "student": "resnet8x4", "method": "simkd", "epochs": 4}
    labels = {
        "teacher": "resnet38x2",
        "student": "resnet8x4",
        "method": "simkd",
        "loss": None,
        "projector": None,
        "lr": None,
        "seed": None,
    }
    write_plan(root, [], [], planned=3, base=base, base_labels=labels, axes=[])
    # Tune ids of 8 hex digits may be all decimal: such a sample is no planned trial either.
    for name, lr in (("trial_12345678", 0.02), ("trial_ab12_00001", 0.07)):
        write_params(root / name, {"lr": lr, "weight_decay": 5e-4})
        write_lines(root / name, [tune_line(r, 0, 60) for r in engine_rows(curve(70))])
    trials = analysis.load_experiment(str(root)).trials
    assert list(trials["status"]) == ["completed", "completed", "pending"]
    assert list(trials["lr"].iloc[:2]) == [0.02, 0.07]
    assert (trials["teacher"].iloc[0], trials["weight_decay"].iloc[0]) == ("resnet38x2", 5e-4)
    assert len(analysis.summarize(trials)) == 3


def test_reads_a_storage_uri(experiment_dir):
    uri = analysis.load_experiment(f"file://{experiment_dir}")
    assert uri.location.startswith("file://") and len(uri.trials) == 12


def test_the_analysis_imports_without_torch():
    """Reading results needs no torch: no module of the analysis imports it."""
    code = "import sys; sys.modules['torch'] = None; import tune_kd.analysis"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


# ----------------------------------------------------------------------------- notebook


def test_notebook_runs_against_an_experiment(experiment_dir, monkeypatch):
    """The suite's one run of the report notebook (a cell that raises fails `execute`), as
    `jupyter nbconvert --execute analysis/sweep_report.ipynb` runs it from the project's folder:
    the kernel in analysis/, the experiment's path given relative to the project."""
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    assert all(not c.get("outputs") for c in notebook.cells if c.cell_type == "code")
    monkeypatch.setenv("TUNE_KD_EXPERIMENT", os.path.relpath(experiment_dir, ROOT))
    in_analysis = {"metadata": {"path": str(NOTEBOOK.parent)}}
    NotebookClient(notebook, timeout=120, kernel_name="python3", resources=in_analysis).execute()
    outputs = [o for c in notebook.cells if c.cell_type == "code" for o in c.outputs]
    text = "".join(o.get("text", "") + o.get("data", {}).get("text/plain", "") for o in outputs)
    assert "75.00 ± 1.41 ★" in text
    assert "trials: 12 planned: 8 completed, 1 diverged, 1 error, 1 running, 1 pending" in text
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) == len(analysis.figures(analysis.load_experiment(str(experiment_dir))))


# ----------------------------------------------------------------------------- a repeated analysis


def assert_same_experiment(got: analysis.Experiment, expected: analysis.Experiment) -> None:
    pd.testing.assert_frame_equal(got.trials, expected.trials, check_exact=True)
    pd.testing.assert_frame_equal(got.epochs, expected.epochs, check_exact=True)
    assert got.problems == expected.problems


def test_a_repeated_analysis_parses_only_the_result_files_that_changed(
    experiment_dir, tmp_path, monkeypatch
):
    root = shutil.copytree(
        experiment_dir, tmp_path / "copy", ignore=shutil.ignore_patterns("results")
    )
    cache = str(tmp_path / "results")
    first = analysis.load_experiment(str(root), cache)
    assert_same_experiment(first, analysis.load_experiment(str(root)))

    parsed = []
    parse = read_module.parse_results
    monkeypatch.setattr(
        read_module, "parse_results", lambda data: parsed.append(data) or parse(data)
    )
    assert_same_experiment(analysis.load_experiment(str(root), cache), first)
    assert parsed == []  # every parse kept, and the corrupt line still reported

    result = root / "group_0000" / "result.json"  # a lone trial's
    line = json.loads(result.read_text().splitlines()[-1])
    with result.open("a") as file:
        file.write(json.dumps({**line, "epoch": EPOCHS + 1}) + "\n")
    grown = analysis.load_experiment(str(root), cache)
    assert parsed == [result.read_bytes()]
    assert_same_experiment(grown, analysis.load_experiment(str(root)))
    assert len(grown.epochs) == len(first.epochs) + 1


def test_an_unreadable_store_of_parses_means_parsing_again(experiment_dir, tmp_path):
    cache = tmp_path / "results"
    cache.mkdir()
    (cache / ".parsed_results.arrow").write_bytes(b"ARROW1 not really")
    experiment = analysis.load_experiment(str(experiment_dir), str(cache))
    assert_same_experiment(experiment, analysis.load_experiment(str(experiment_dir)))


def test_plots_are_drawn_again_only_when_what_they_show_changed(
    experiment_dir, tmp_path, monkeypatch
):
    root = shutil.copytree(
        experiment_dir, tmp_path / "copy", ignore=shutil.ignore_patterns("results")
    )
    drawn = []
    draw = report_module.figure_bytes
    monkeypatch.setattr(
        report_module, "figure_bytes", lambda fig, kind: drawn.append(kind) or draw(fig, kind)
    )
    first = analysis.write_report(str(root)).files
    images = {p.name: p.read_bytes() for p in (root / "results").glob("*.png")}
    assert len(drawn) == 10

    drawn.clear()
    assert analysis.write_report(str(root)).files == first
    assert drawn == []
    assert {p.name: p.read_bytes() for p in (root / "results").glob("*.png")} == images

    assert analysis.write_report(str(root), metric="last").files == first
    assert len(drawn) == 6  # another metric: top-1 and top-5 against lr, top-1 against GPU-hours
    (root / "results" / "test_acc_curves.svg").unlink()
    drawn.clear()
    analysis.write_report(str(root), metric="last")
    assert drawn == ["png", "svg"]  # an image missing: its plot drawn again
    assert (root / "results" / "test_acc_curves.svg").exists()


# ----------------------------------------------------------------------------- methods per pair

# Per cell (teacher, student, method): the best accuracy of seeds 0 and 1; the student trained
# alone has no teacher. resnet56 -> resnet20 has a published DKD number and no published KD.
METHOD_CELLS = {
    (None, "resnet8x4", "student"): (72.5, 73.5),
    ("resnet32x4", "resnet8x4", "kd"): (74.0, 75.0),
    ("resnet32x4", "resnet8x4", "simkd"): (77.5, 78.0),
    ("resnet32x4", "resnet8x4", "dkd"): (76.0, 76.4),
    ("resnet56", "resnet20", "dkd"): (71.0, 72.0),
    ("resnet56", "resnet20", "kd"): (70.0, 70.5),
}
MEASURED_TEACHER = 79.0


def method_trials() -> pd.DataFrame:
    """A trials frame as `load_experiment` gives one: one completed trial per cell and seed."""
    rows = [
        {
            "trial_id": f"trial_{position * 2 + seed:04d}",
            "teacher": teacher,
            "student": student,
            "method": method,
            "seed": seed,
            "status": "completed",
            "best_test_acc": best,
            "final_test_acc": best - 0.5,
            "final_test_acc_top5": best + 20,
            "best_test_acc_top5": best + 20,
            "gpu_hours": 0.5,
            "cpu_hours": None,
            "teacher_test_acc": None if teacher is None else MEASURED_TEACHER,
        }
        for position, ((teacher, student, method), bests) in enumerate(METHOD_CELLS.items())
        for seed, best in enumerate(bests)
    ]
    return pd.DataFrame(rows).astype({"teacher_test_acc": "float64", "cpu_hours": "float64"})


def test_method_tables_hold_each_pairs_methods_against_the_published():
    summary = analysis.summarize(method_trials())
    tables = analysis.method_tables(summary)
    assert list(tables) == ["resnet32x4 → resnet8x4", "resnet56 → resnet20"]
    first = tables["resnet32x4 → resnet8x4"].set_index("method")
    assert list(first.index) == ["student", "kd", "simkd", "dkd", "teacher"]
    columns = ["measured", "n", "published", "published in", "difference"]
    assert list(first.columns) == columns
    published = analysis.published_numbers()
    kd_row = published[(published["method"] == "kd") & (published["student"] == "resnet8x4")]
    kd_published = kd_row[kd_row["teacher"] == "resnet32x4"].iloc[0]
    kd = pd.Series(METHOD_CELLS[("resnet32x4", "resnet8x4", "kd")])
    assert first.loc["kd", "measured"] == analysis.format_accuracy(kd.mean(), kd.std(), 2)
    assert first.loc["kd", "published"] == analysis.format_accuracy(
        kd_published["mean"], kd_published["std"], 4
    )
    assert first.loc["kd", "published in"] == "paper Table 1"
    assert first.loc["kd", "difference"] == f"{kd.mean() - kd_published['mean']:+.2f}"
    assert first.loc["dkd", "published in"].startswith("DKD paper")
    assert first.loc["teacher", "measured"] == f"{MEASURED_TEACHER:.2f}"
    assert first.loc["teacher", "difference"] == f"{MEASURED_TEACHER - 79.42:+.2f}"
    second = tables["resnet56 → resnet20"].set_index("method")
    assert list(second.index) == ["kd", "dkd", "teacher"]
    assert (second.loc["kd", "published"], second.loc["kd", "difference"]) == ("-", "-")
    printed = analysis.format_method_tables(summary)
    assert "resnet56 → resnet20, dkd (DKD paper" in printed and "beta 2" in printed
    one_pair = method_trials().query("teacher == 'resnet56'")
    assert list(analysis.method_tables(analysis.summarize(one_pair))) == ["resnet56 → resnet20"]
    one_method = one_pair.query("method == 'kd'")
    assert analysis.method_tables(analysis.summarize(one_method)) == {}


def test_methods_plot_marks_the_published_number_of_each_method_that_has_one():
    fig = analysis.plot_methods(method_trials())
    panels = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in panels] == ["resnet32x4 → resnet8x4", "resnet56 → resnet20"]
    for ax, cells in zip(
        panels, analysis.pair_methods(analysis.summarize(method_trials())).values()
    ):
        assert [t.get_text() for t in ax.get_yticklabels()] == list(cells["row"])
        (marks,) = [c for c in ax.containers if c.get_label() == "published"]
        known = cells["published_mean"].notna()
        below = cells.index[known] + PUBLISHED_OFFSET
        assert list(marks.lines[0].get_ydata()) == list(below)
        assert list(marks.lines[0].get_xdata()) == list(cells.loc[known, "published_mean"])
    assert len(marks.lines[0].get_ydata()) == 1  # resnet56 -> resnet20: DKD's only
    one_method = method_trials().query("method == 'kd' and teacher == 'resnet56'")
    assert analysis.plot_methods(one_method) is None


def test_methods_per_pair_are_written_with_the_report(tmp_path):
    trials = method_trials()
    epochs = pd.DataFrame({"trial_id": pd.Series(dtype="string"), "epoch": pd.Series(dtype=int)})
    experiment = analysis.Experiment("methods", {"name": "methods"}, trials, epochs, [])
    summary = analysis.summarize(trials)
    files = analysis.write_files(experiment, summary, "best", str(tmp_path))
    assert str(tmp_path / "methods.md") in files
    markdown = (tmp_path / "methods.md").read_text()
    assert "## resnet32x4 → resnet8x4" in markdown and "| teacher | 79.00 |" in markdown
    assert "mdistiller" in markdown
    assert (tmp_path / "methods_per_pair.png").read_bytes().startswith(b"\x89PNG")
