"""Grid cells: the trials that share every label but the seed, and per cell the mean ± std of a
metric over its completed trials, its trials in each status and the published numbers. The summary
aggregates completed trials only; the others are counted per cell."""

from __future__ import annotations

import pandas as pd

from tune_kd.analysis.frames import STATUSES, label_keys
from tune_kd.analysis.published import published_numbers, with_published
from tune_kd.analysis.runs import CONTEXT_KEYS

# The trials frame's column that each `metric` choice summarises per cell (`--metric`), and
# the top-5 column of the same choice (the top-5 plot's).
METRIC_COLUMNS = {"best": "best_test_acc", "last": "final_test_acc"}
TOP5_COLUMNS = {"best": "best_test_acc_top5", "last": "final_test_acc_top5"}


def cell_keys(trials: pd.DataFrame) -> list[str]:
    """The columns that name a grid cell: every label but the seed (context keys only where set)."""
    return [
        c
        for c in label_keys(trials)
        if c != "seed" and not (c in CONTEXT_KEYS and trials[c].isna().all())
    ]


def cell_stats(trials: pd.DataFrame, column: str) -> pd.DataFrame:
    """Per cell: mean, sample std and n of `column` over completed trials; trials planned and in
    each status; mean GPU-hours and CPU-hours of the completed trials (see `trial_cost`); the
    measured teacher accuracy."""
    keys = cell_keys(trials)
    completed = trials["status"].eq("completed")
    frame = trials[keys].assign(  # helper columns start with _: no clash with a label
        _value=trials[column].where(completed),
        _gpu_hours=trials["gpu_hours"].where(completed),
        _cpu_hours=trials["cpu_hours"].where(completed),
        _teacher=trials["teacher_test_acc"],
        **{f"_{status}": trials["status"].eq(status) for status in STATUSES},
    )
    cells = frame.groupby(keys, dropna=False, sort=False).agg(
        mean=("_value", "mean"),
        std=("_value", "std"),
        n=("_value", "count"),
        n_planned=("_value", "size"),
        **{status: (f"_{status}", "sum") for status in STATUSES},
        gpu_hours=("_gpu_hours", "mean"),
        cpu_hours=("_cpu_hours", "mean"),
        teacher_acc=("_teacher", "mean"),
    )
    cells = cells.reset_index()
    cells.insert(cells.columns.get_loc("n_planned") + 1, "incomplete", cells.n < cells.n_planned)
    return cells


def summarize(
    trials: pd.DataFrame, metric: str = "best", published: pd.DataFrame | None = None
) -> pd.DataFrame:
    """One row per grid cell: its keys, mean ± std (ddof=1) and n of the metric (`best`: best test
    accuracy over the epochs, the paper's convention; `last`: the final epoch's) over completed
    trials, n planned, trials in each status, an `incomplete` flag, mean GPU-hours and CPU-hours,
    the `best` cell, the measured teacher, and the published numbers of the same setting where
    known."""
    cells = cell_stats(trials, METRIC_COLUMNS[metric])
    cells["best"] = False
    if cells["mean"].notna().any():
        cells.loc[cells["mean"].idxmax(), "best"] = True
    return with_published(cells, published_numbers() if published is None else published)


def summary_keys(summary: pd.DataFrame) -> list[str]:
    return list(summary.columns[: summary.columns.get_loc("mean")])
