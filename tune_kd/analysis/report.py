"""A sweep's results: every trial to parquet, mean ± std per grid cell, plots, published numbers.

    python -m tune_kd.analysis EXPERIMENT_DIR [--out DIR] [--metric best|last]

reads a Tune experiment (finished, still running or interrupted; a local folder or a storage URI)
and writes into EXPERIMENT_DIR/results/: `trials.parquet` (one row per planned trial),
`epochs.parquet` (one row per trial and epoch), `summary.md`/`.csv`/`.tex` (one row per grid
cell) and the plots as PNG and SVG. The sweep calls `write_report` when it ends. Another analysis
of the same experiment parses only the `result.json` files that changed since (see `parsed`) and
draws the plots again only when what they are drawn from changed.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import pandas as pd

from tune_kd import cli
from tune_kd.analysis import cells, plots, published, tables
from tune_kd.analysis.cells import METRIC_COLUMNS, summarize
from tune_kd.analysis.frames import Experiment, load_experiment
from tune_kd.analysis.plots import figure_bytes, figures
from tune_kd.analysis.read import ExperimentError
from tune_kd.analysis.tables import failures, format_summary, summary_markdown, summary_tex
from tune_kd.storage import Storage

RESULTS_FOLDER = "results"


@dataclass
class SweepReport:
    """What `write_report` read and wrote: the experiment, its summary, the metric summarised and
    the files."""

    experiment: Experiment
    summary: pd.DataFrame
    metric: str
    files: list[str]  # what was written, as paths or URIs

    @property
    def failures(self) -> list[str]:
        return failures(self.experiment.trials)


def write_report(location: str, out: str | None = None, metric: str = "best") -> SweepReport:
    """Read the experiment at `location` and write every table and plot into `out` (default
    `location/results`): the sweep calls this at its end."""
    target = out if out is not None else Storage(str(location)).uri_of(RESULTS_FOLDER)
    experiment = load_experiment(location, cache=target)
    summary = summarize(experiment.trials, metric)
    files = write_files(experiment, summary, metric, target)
    return SweepReport(experiment, summary, metric, files)


def write_files(experiment: Experiment, summary: pd.DataFrame, metric: str, out: str) -> list[str]:
    """Both frames as parquet, the summary as markdown, CSV and LaTeX, every plot as PNG and SVG;
    returns where each file went. The plots are drawn again only where what they are drawn from
    changed since they were written (see `figures_key`)."""
    target = Storage(str(out))
    unwritable = target.unwritable()
    if unwritable:
        raise ExperimentError(unwritable)
    contents = {
        "trials.parquet": parquet_bytes(experiment.trials),
        "epochs.parquet": parquet_bytes(experiment.epochs),
        "summary.md": summary_markdown(
            summary, metric, experiment.name, experiment.problems, failures(experiment.trials)
        ),
        "summary.csv": summary.to_csv(index=False),
        "summary.tex": summary_tex(summary, metric),
    }
    key = figures_key(contents["trials.parquet"], contents["epochs.parquet"], metric)
    images = images_drawn(target, key)
    drawn = {}
    if images is None:
        for name, fig in figures(experiment, metric).items():
            drawn[f"{name}.png"] = figure_bytes(fig, "png")
            drawn[f"{name}.svg"] = figure_bytes(fig, "svg")
        images = list(drawn)
    for name, content in contents.items():  # each file whole: an interruption keeps the old one
        target.write(content.encode() if isinstance(content, str) else content, name)
    if drawn:
        target.write(b"", FIGURES_KEY)  # until every image is replaced, none is known to be new
        for name, content in drawn.items():
            target.write(content, name)
        target.write("\n".join([key, *images]).encode(), FIGURES_KEY)
    return [target.uri_of(name) for name in [*contents, *images]]


FIGURES_KEY = ".figures.sha256"  # the key of the plots' images, then their file names
FIGURE_SOURCES = (cells, plots, published, tables)
IMAGE_NAME = re.compile(r"\w+\.(png|svg)")


def figures_key(trials: bytes, epochs: bytes, metric: str) -> str:
    """What the plots are drawn from: both frames (as parquet), the metric, matplotlib's version
    and settings, and the code of the modules that draw them."""
    digest = hashlib.sha256()
    for part in (trials, epochs, metric.encode(), matplotlib.__version__.encode()):
        digest.update(hashlib.sha256(part).digest())
    digest.update(repr(sorted(matplotlib.rcParams.items())).encode())
    for module in FIGURE_SOURCES:
        digest.update(Path(module.__file__).read_bytes())
    return digest.hexdigest()


def images_drawn(target: Storage, key: str) -> list[str] | None:
    """The plots' image files in `target` when they were drawn from what `key` stands for and
    are all there; None when they are to be drawn."""
    try:
        if not target.exists(FIGURES_KEY):
            return None
        written, *images = target.read(FIGURES_KEY).decode().split("\n")
    except (OSError, UnicodeDecodeError):
        return None
    if written != key or not all(IMAGE_NAME.fullmatch(name) for name in images):
        return None
    return images if all(target.exists(name) for name in images) else None


def parquet_bytes(frame: pd.DataFrame) -> bytes:
    buffer = io.BytesIO()
    frame.to_parquet(buffer, index=False)
    return buffer.getvalue()


def get_args_parser() -> argparse.ArgumentParser:
    parser = cli.ArgumentParser(
        prog="python -m tune_kd.analysis", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "experiment", help="Tune experiment folder or URI (holds tune_kd_plan.json)"
    )
    parser.add_argument("--out", help="where the files go (default EXPERIMENT/results)")
    parser.add_argument(
        "--metric",
        choices=list(METRIC_COLUMNS),
        default="best",
        help="best: best test accuracy over the epochs (the paper's); last: the final epoch's",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    try:
        report = write_report(args.experiment, args.out, args.metric)
    except ExperimentError as error:
        return cli.fail(error)
    print(format_summary(report.summary, args.metric, report.files, report.failures))
    return 0
