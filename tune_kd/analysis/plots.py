"""The plots of an experiment, as matplotlib figures (no pyplot: no display needed)."""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Sequence

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from tune_kd.analysis.cells import (
    METRIC_COLUMNS,
    TOP5_COLUMNS,
    cell_keys,
    cell_stats,
    summarize,
    summary_keys,
)
from tune_kd.analysis.frames import Experiment
from tune_kd.analysis.published import missing
from tune_kd.analysis.tables import (
    METRIC_NAMES,
    TOP5_NAMES,
    format_accuracy,
    format_value,
    pair_methods,
)


def groups_of(
    frame: pd.DataFrame, keys: Sequence[str], default: str
) -> list[tuple[str, pd.DataFrame]]:
    """`frame` split by the `keys` that vary in it, each part labelled `key=value, ...`."""
    varying = [k for k in keys if frame[k].nunique(dropna=False) > 1]
    if not varying:
        return [(default, frame)]
    parts = frame.groupby(varying, dropna=False, sort=False)
    return [
        (", ".join(f"{k}={format_value(v)}" for k, v in zip(varying, values)), part)
        for values, part in parts
    ]


def pair_name(frame: pd.DataFrame) -> str:
    """`teacher → student, method` of a frame holding one such combination."""
    first_row = frame.iloc[0]
    teacher = "" if missing(first_row["teacher"]) else f"{first_row['teacher']} → "
    return f"{teacher}{first_row['student']}, {first_row['method']}"


def plot_accuracy_vs_lr(
    trials: pd.DataFrame, metric: str = "best", published: pd.DataFrame | None = None
) -> Figure | None:
    """Accuracy against learning rate per cell (mean ± std), one line per other distinguishing
    key, the teacher and the paper's SimKD as horizontal lines; None without an lr axis."""
    return accuracy_vs_lr_figure(summarize(trials, metric, published), metric)


def accuracy_vs_lr_figure(cells: pd.DataFrame, metric: str) -> Figure | None:
    """`plot_accuracy_vs_lr` of its cells (`summarize`)."""
    fig = lr_figure(cells, METRIC_NAMES[metric])
    if fig is not None:
        reference_lines(fig.axes[0], cells)
        fig.axes[0].legend(fontsize="small")
    return fig


def plot_top5_vs_lr(trials: pd.DataFrame, metric: str = "best") -> Figure | None:
    """Top-5 accuracy against learning rate per cell, of the same `metric` as the top-1 plot and
    the tables (`best`: the best over the epochs; `last`: the final epoch's); None without an lr
    axis."""
    return top5_vs_lr_figure(cell_stats(trials, TOP5_COLUMNS[metric]), metric)


def top5_vs_lr_figure(cells: pd.DataFrame, metric: str) -> Figure | None:
    """`plot_top5_vs_lr` of its cells (`cell_stats` of the metric's top-5 column)."""
    fig = lr_figure(cells, TOP5_NAMES[metric])
    if fig is not None:
        fig.axes[0].legend(fontsize="small")
    return fig


def lr_figure(cells: pd.DataFrame, ylabel: str) -> Figure | None:
    """`ylabel` (`... (%)`) of each cell against its learning rate, titled by it; None without
    two learning rates."""
    cells = cells[cells["n"] > 0]
    if "lr" not in cells or cells["lr"].nunique() < 2:
        return None
    fig = Figure(figsize=(7.5, 4.8), layout="constrained")
    ax = fig.subplots()
    keys = [k for k in summary_keys(cells) if k != "lr"]
    for label, line in groups_of(cells, keys, default=pair_name(cells)):
        line = line.sort_values("lr")
        yerr = line["std"].fillna(0)
        ax.errorbar(line["lr"], line["mean"], yerr=yerr, marker="o", capsize=3, label=label)
    ax.set_xscale("log")
    rates = sorted(cells["lr"].dropna().unique())
    ax.set_xticks(rates, [f"{lr:g}" for lr in rates])
    ax.minorticks_off()
    ax.set_xlabel("initial learning rate (log scale)")
    ax.set_ylabel(ylabel)
    title = f"Student {ylabel.removesuffix(' (%)')} against learning rate"
    ax.set_title(title + "\n(mean ± std over seeds; a point without a bar had one finished trial)")
    ax.grid(alpha=0.3)
    return fig


def reference_lines(ax: Axes, cells: pd.DataFrame) -> None:
    """The teacher (measured, else published) and the paper's SimKD of each teacher/student pair."""
    for (teacher, student), pair in cells.groupby(["teacher", "student"], sort=False):
        measured = pair["teacher_acc"].mean()
        source = "paper" if missing(measured) else "measured"
        value = pair["published_teacher"].iloc[0] if missing(measured) else measured
        if not missing(value):
            label = f"teacher {teacher} ({source}): {value:.2f}"
            ax.axhline(value, color="black", linestyle=":", label=label)
        baseline, std = pair["baseline_mean"].iloc[0], pair["baseline_std"].iloc[0]
        if not missing(baseline):
            label = f"paper SimKD {teacher} → {student}: {format_accuracy(baseline, std, None)}"
            ax.axhline(baseline, color="gray", linestyle="--", label=label)


CURVE_LABELS = {
    "test_acc": ("test accuracy (%)", "Test accuracy per epoch"),
    "test_loss": ("test loss (cross-entropy)", "Test loss per epoch"),
}
# Curves drawn on a log axis: a loss spans orders of magnitude (a KL loss of ~250 in the first
# epoch would flatten every other curve to a line at 0 on a linear one).
LOG_CURVES = frozenset({"test_loss", "train_loss"})


Line = tuple[str, pd.DataFrame]  # a curve's label, and its mean and std per epoch


def plot_curves(
    epochs: pd.DataFrame, trials: pd.DataFrame, column: str = "test_acc"
) -> Figure | None:
    """`column` per epoch, mean line with a ± std band over the completed and running trials of a
    cell: one line per learning rate, one panel per other distinguishing key; None without data."""
    return curves_figure(curve_panels(epochs, trials, column), column)


def curves_figure(panels: list[tuple[str, list[Line]]], column: str) -> Figure | None:
    """`plot_curves` of its panels (`curve_panels`); None without any."""
    if not panels:
        return None
    columns = min(3, len(panels))
    rows = math.ceil(len(panels) / columns)
    fig = Figure(figsize=(5 * columns, 3.8 * rows + 0.6), layout="constrained")
    axes = fig.subplots(rows, columns, sharex=True, sharey=True, squeeze=False).ravel()
    ylabel, title = CURVE_LABELS.get(column, (column, column))
    shared_legend = len({tuple(label for label, _ in lines) for _, lines in panels}) == 1
    for ax, (name, lines) in zip(axes, panels):
        curve_panel(ax, lines, name, legend=not shared_legend)
        ax.set_ylabel(ylabel)
        if column in LOG_CURVES:
            ax.set_yscale("log")
    for ax in axes[len(panels) :]:
        ax.set_visible(False)
    if shared_legend:  # every panel's lines are the same learning rates, in the same colours
        handles, labels = axes[0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="outside right upper", fontsize="small")
    fig.suptitle(f"{title} (mean line, ± std band over seeds)")
    return fig


def curve_panels(
    epochs: pd.DataFrame, trials: pd.DataFrame, column: str
) -> list[tuple[str, list[Line]]]:
    """The panels of `plot_curves`, named, each with one line per learning rate: the mean and
    std of `column` per epoch over the rows of the line's completed and running trials; none
    without such rows."""
    if column not in epochs:
        return []
    keys = cell_keys(trials)
    ran = trials.loc[trials["status"].isin(["completed", "running"]), ["trial_id", *keys]]
    ran = ran.reset_index(drop=True)
    position = pd.Index(ran["trial_id"]).get_indexer(epochs["trial_id"])  # -1: not shown
    rows = position >= 0
    if not rows.any():
        return []
    shown, first_rows = np.unique(position[rows], return_index=True)
    shown = ran.iloc[shown[np.argsort(first_rows)]]  # in the order of their first epoch row
    panels = groups_of(shown, [k for k in keys if k != "lr"], default=pair_name(shown))
    labels: list[list[str]] = []  # per panel, its lines' labels
    line_of = np.full(len(ran), -1)  # each shown trial's line, numbered across the panels
    count = 0
    for _, panel in panels:
        labels.append([])
        by_lr = panel.groupby("lr", dropna=False, sort=True) if "lr" in panel else [(None, panel)]
        for lr, part in by_lr:
            line_of[part.index] = count
            count += 1
            labels[-1].append("default lr" if missing(lr) else f"lr={lr:g}")
    values = epochs.loc[rows, ["epoch", column]]
    stats = iter(line_stats(values, line_of[position[rows]], column, count))
    return [
        (name, [(label, next(stats)) for label in names])
        for (name, _), names in zip(panels, labels)
    ]


def line_stats(
    values: pd.DataFrame, line_of_row: np.ndarray, column: str, count: int
) -> list[pd.DataFrame]:
    """Per line (`line_of_row` numbers each row's), the mean and std of `column` at each epoch,
    over its rows in their order: one pass over the rows of every line."""
    stats = values.groupby([line_of_row, "epoch"])[column].agg(["mean", "std"])
    parts = {line: part.droplevel(0) for line, part in stats.groupby(level=0)}
    return [parts.get(line, stats.iloc[:0].droplevel(0)) for line in range(count)]


def curve_panel(ax: Axes, lines: Sequence[Line], name: str, legend: bool = True) -> None:
    """One panel: each line's mean per epoch with its ± std band (and their legend)."""
    for label, stats in lines:
        (line,) = ax.plot(stats.index, stats["mean"], label=label)
        low, high = stats["mean"] - stats["std"], stats["mean"] + stats["std"]
        ax.fill_between(stats.index, low, high, color=line.get_color(), alpha=0.2)
    ax.set_title(name, fontsize="medium")
    ax.set_xlabel("epoch")
    ax.tick_params(labelbottom=True)  # also above an empty slot of the grid
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    if legend:
        ax.legend(fontsize="small")


def plot_accuracy_vs_gpu_hours(trials: pd.DataFrame, metric: str = "best") -> Figure | None:
    """Each cell's accuracy (mean ± std) against its mean GPU-hours per trial: what a variant
    costs. None when no trial used a GPU."""
    return accuracy_vs_gpu_hours_figure(cell_stats(trials, METRIC_COLUMNS[metric]), metric)


def accuracy_vs_gpu_hours_figure(cells: pd.DataFrame, metric: str) -> Figure | None:
    """`plot_accuracy_vs_gpu_hours` of its cells (`cell_stats` of the metric's column)."""
    cells = cells[(cells["n"] > 0) & (cells["gpu_hours"] > 0)]
    if cells.empty:
        return None
    fig = Figure(figsize=(7.5, 4.8), layout="constrained")
    ax = fig.subplots()
    keys = [k for k in summary_keys(cells) if k != "lr"]
    for label, part in groups_of(cells, keys, default=pair_name(cells)):
        ax.errorbar(
            part["gpu_hours"],
            part["mean"],
            yerr=part["std"].fillna(0),
            fmt="o",
            capsize=3,
            label=label,
        )
        if "lr" in part and part["lr"].notna().any():
            for x, y, lr in zip(part["gpu_hours"], part["mean"], part["lr"]):
                ax.annotate(
                    f"lr={format_value(lr)}",
                    (x, y),
                    textcoords="offset points",
                    xytext=(4, 4),
                    fontsize="x-small",
                )
    ax.set_xlabel("GPU-hours per trial (mean over the cell's completed trials)")
    ax.set_ylabel(METRIC_NAMES[metric])
    ax.set_title("Accuracy against cost per grid cell (mean ± std over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return fig


Drawing = tuple[Callable[..., Figure | None], tuple]  # a figure's function, and its arguments


def drawings(experiment: Experiment, metric: str = "best") -> dict[str, Drawing]:
    """Every plot as the function that draws it and what it is drawn from, by file name: the
    figure is `function(*arguments)`, None where its data is lacking."""
    trials, epochs = experiment.trials, experiment.epochs
    metric_cells = cell_stats(trials, METRIC_COLUMNS[metric])
    drawn: dict[str, Drawing] = {
        "accuracy_vs_lr": (accuracy_vs_lr_figure, (summarize(trials, metric), metric)),
        "test_acc_curves": (curves_figure, (curve_panels(epochs, trials, "test_acc"), "test_acc")),
        "test_loss_curves": (
            curves_figure,
            (curve_panels(epochs, trials, "test_loss"), "test_loss"),
        ),
        "top5_vs_lr": (top5_vs_lr_figure, (cell_stats(trials, TOP5_COLUMNS[metric]), metric)),
        "accuracy_vs_gpu_hours": (accuracy_vs_gpu_hours_figure, (metric_cells, metric)),
        "methods_per_pair": (methods_figure, (pair_methods(summarize(trials, metric)), metric)),
    }
    if "pruning_ratio" in trials:  # the labels of experiments with `reuse` trials only
        drawn["accuracy_vs_pruning_ratio"] = (accuracy_vs_pruning_figure, (metric_cells, metric))
    return drawn


def figures(experiment: Experiment, metric: str = "best") -> dict[str, Figure]:
    """Every plot the experiment has data for, by file name."""
    made = {name: draw(*data) for name, (draw, data) in drawings(experiment, metric).items()}
    return {name: fig for name, fig in made.items() if fig is not None}


def figure_bytes(fig: Figure, kind: str) -> bytes:
    """The figure as a `kind` (png, svg) file. Its first file fixes its layout: the next ones
    are drawn at the same positions, without solving the layout again (a third of the time)."""
    buffer = io.BytesIO()
    metadata = {"Date": None} if kind == "svg" else None  # the same plot gives the same file
    fig.savefig(buffer, format=kind, dpi=120, metadata=metadata)
    fig.set_layout_engine("none")
    return buffer.getvalue()


PUBLISHED_MARKER = "published"  # the label of each panel's published points
PUBLISHED_OFFSET = 0.35  # a published point sits this far below its method's bar's centre


def plot_methods(
    trials: pd.DataFrame, metric: str = "best", published: pd.DataFrame | None = None
) -> Figure | None:
    """Per teacher/student pair of an experiment that compares methods or pairs (`pair_methods`),
    each method's accuracy as a bar with its std, the published number as a marker beside it, the
    teacher as a vertical line; None for one method on one pair."""
    return methods_figure(pair_methods(summarize(trials, metric, published)), metric)


def methods_figure(pairs: dict[str, pd.DataFrame], metric: str) -> Figure | None:
    """`plot_methods` of its pairs (`pair_methods`): one panel per pair."""
    if not pairs:
        return None
    columns = min(2, len(pairs))
    rows = math.ceil(len(pairs) / columns)
    height = max(len(cells) for cells in pairs.values()) * 0.35 + 1.2
    fig = Figure(figsize=(6.5 * columns, height * rows + 0.6), layout="constrained")
    axes = fig.subplots(rows, columns, squeeze=False).ravel()
    for ax, (name, cells) in zip(axes, pairs.items()):
        methods_panel(ax, cells, name)
        ax.set_xlabel(METRIC_NAMES[metric])
    for ax in axes[len(pairs) :]:
        ax.set_visible(False)
    fig.suptitle("Methods per teacher → student pair (bar: mean ± std over seeds)")
    return fig


def methods_panel(ax: Axes, cells: pd.DataFrame, name: str) -> None:
    """One pair: a horizontal bar per method row, its published number as a marker just below
    it, the teacher as a vertical line."""
    y = np.arange(len(cells))
    ax.barh(y, cells["mean"], height=0.55, xerr=cells["std"].fillna(0), color="tab:blue", capsize=3)
    known = cells["published_mean"].notna().to_numpy()
    ax.errorbar(
        cells["published_mean"][known],
        y[known] + PUBLISHED_OFFSET,
        xerr=cells["published_std"][known].fillna(0),
        fmt="D",
        color="black",
        capsize=2,
        label=PUBLISHED_MARKER,
    )
    measured = cells["teacher_acc"].mean()
    teacher = cells["published_teacher"].dropna()
    value = teacher.iloc[0] if missing(measured) and len(teacher) else measured
    if not missing(value):
        source = "published" if missing(measured) else "measured"
        ax.axvline(value, color="gray", linestyle=":", label=f"teacher ({source}): {value:.2f}")
    values = pd.concat([cells["mean"], cells["published_mean"], pd.Series([value])]).dropna()
    if len(values):
        ax.set_xlim(values.min() - 3, values.max() + 1.5)
    ax.set_yticks(y, cells["row"])
    ax.invert_yaxis()
    ax.set_title(name, fontsize="medium")
    ax.grid(axis="x", alpha=0.3)
    ax.legend(fontsize="small", loc="lower right")


REUSE_MARKS = {"reuse_stage": "k", "reuse_factor": "r"}  # how a reuse cell is annotated


def accuracy_vs_pruning_figure(cells: pd.DataFrame, metric: str) -> Figure | None:
    """The paper's Figure 6: accuracy (mean ± std over seeds) against the pruning ratio of what
    each cell deploys (`tune_kd.params`), one series per method, the reuse cells annotated with
    their stage and factor where swept, vanilla KD's ratio as a gray dashed line; None without
    ratios."""
    if "pruning_ratio" not in cells:
        return None
    cells = cells[(cells["n"] > 0) & cells["pruning_ratio"].notna()]
    if cells.empty:
        return None
    fig = Figure(figsize=(7.5, 4.8), layout="constrained")
    ax = fig.subplots()
    for method, part in cells.groupby("method", sort=False):
        ax.errorbar(
            part["pruning_ratio"],
            part["mean"],
            yerr=part["std"].fillna(0),
            fmt="o",
            capsize=3,
            label=method,
        )
        if method == "reuse":
            for _, cell in part.iterrows():
                swept = [(k, name) for k, name in REUSE_MARKS.items() if not missing(cell.get(k))]
                ax.annotate(
                    ", ".join(f"{name}={format_value(cell[k])}" for k, name in swept),
                    (cell["pruning_ratio"], cell["mean"]),
                    textcoords="offset points",
                    xytext=(4, 4),
                    fontsize="x-small",
                )
    kd = cells.loc[cells["method"].eq("kd"), "pruning_ratio"]
    if not kd.empty:
        ax.axvline(kd.iloc[0], color="gray", linestyle="--", label="KD's pruning ratio")
    ax.set_xlabel("pruning ratio (%) of the deployed network against the teacher")
    ax.set_ylabel(METRIC_NAMES[metric])
    ax.set_title("Accuracy against pruning ratio per grid cell (mean ± std over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return fig
