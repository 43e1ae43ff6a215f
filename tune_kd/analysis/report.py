"""A sweep's results: every trial to parquet, mean ± std per grid cell, plots, published numbers.

    python -m tune_kd.analysis EXPERIMENT_DIR [--out DIR] [--metric best|last] [--features]

reads a Tune experiment (finished, still running or interrupted; a local folder or a storage URI)
and writes into EXPERIMENT_DIR/results/: `trials.parquet` (one row per planned trial),
`epochs.parquet` (one row per trial and epoch), `summary.md`/`.csv`/`.tex` (one row per grid
cell), `methods.md` (where the experiment compares methods or teacher/student pairs: a table per
pair of its methods against their published numbers) and the plots as PNG and SVG. The sweep calls
`write_report` when it ends. Another analysis of the same experiment parses only the
`result.json` files that changed since (see `parsed`) and draws the plots again only when what
they are drawn from changed. `--features` adds the teacher's and students' features of the
finished trials, their t-SNE figures and how close they are (see `features`).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import pickle
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import pandas as pd

from tune_kd import cli
from tune_kd.analysis import cells, plots, published, tables
from tune_kd.analysis.cells import METRIC_COLUMNS, summarize
from tune_kd.analysis.frames import Experiment, load_experiment
from tune_kd.analysis.plots import drawings, figure_bytes
from tune_kd.analysis.read import ExperimentError
from tune_kd.analysis.tables import (
    failures,
    format_method_tables,
    format_summary,
    methods_markdown,
    summary_markdown,
    summary_tex,
)
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
    target = results_location(location, out)
    experiment = load_experiment(location, cache=target)
    summary = summarize(experiment.trials, metric)
    files = write_files(experiment, summary, metric, target)
    return SweepReport(experiment, summary, metric, files)


def results_location(location: str, out: str | None = None) -> str:
    """Where the results of the experiment at `location` go: `out`, else its results folder."""
    return out if out is not None else Storage(str(location)).uri_of(RESULTS_FOLDER)


def write_files(experiment: Experiment, summary: pd.DataFrame, metric: str, out: str) -> list[str]:
    """Both frames as parquet, the summary as markdown, CSV and LaTeX, the methods per pair as
    markdown (where the experiment compares methods or pairs), every plot as PNG and SVG;
    returns where each file went. The plots are drawn again only where what they are drawn from
    changed since they were written (see `figure_key`)."""
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
    methods = methods_markdown(summary, metric, experiment.name)
    if methods:
        contents["methods.md"] = methods
    kept = figure_keys(target)
    images, drawn, keys = [], {}, {}
    for name, (draw, data) in drawings(experiment, metric).items():
        keys[name] = figure_key(data)
        files = [f"{name}.png", f"{name}.svg"]
        if kept.get(name) == keys[name] and all(target.exists(file) for file in files):
            images += files
            continue
        fig = draw(*data)
        if fig is not None:
            drawn.update({file: figure_bytes(fig, file[-3:]) for file in files})
            images += files
    for name, content in contents.items():  # each file whole: an interruption keeps the old one
        target.write(content.encode() if isinstance(content, str) else content, name)
    if drawn:  # until its images are replaced, a figure's earlier key is no more
        unchanged = {
            n: k for n, k in kept.items() if f"{n}.png" in images and f"{n}.png" not in drawn
        }
        target.write(json.dumps(unchanged).encode(), FIGURE_KEYS)
        for name, content in drawn.items():
            target.write(content, name)
        shown = {n: k for n, k in keys.items() if f"{n}.png" in images}
        target.write(json.dumps(shown).encode(), FIGURE_KEYS)
    return [target.uri_of(name) for name in [*contents, *images]]


FIGURE_KEYS = ".figures.json"  # the key of each plot whose images are written, by name
FIGURE_SOURCES = (cells, plots, published, tables)


def figure_key(data: tuple) -> str:
    """What a plot is drawn from: its data (as pickled: pickling, never unpickling), matplotlib's
    version and settings, and the code of the modules that draw it."""
    digest = hashlib.sha256(pickle.dumps(data, protocol=5))
    digest.update(matplotlib.__version__.encode())
    digest.update(repr(sorted(matplotlib.rcParams.items())).encode())
    for module in FIGURE_SOURCES:
        digest.update(Path(module.__file__).read_bytes())
    return digest.hexdigest()


def figure_keys(target: Storage) -> dict[str, str]:
    """The key of each plot whose images `target` holds, by name; none when unknown."""
    try:
        if not target.exists(FIGURE_KEYS):
            return {}
        keys = json.loads(target.read(FIGURE_KEYS))
    except (OSError, ValueError):
        return {}
    if not isinstance(keys, dict) or not all(isinstance(k, str) for k in keys.values()):
        return {}
    return keys


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
        help="best: best test accuracy over the epochs (the paper's); last: the final epoch's;"
        " the tables and the top-1 and top-5 plots show the same one",
    )
    parser.add_argument(
        "--features",
        action="store_true",
        help="also each finished trial's teacher and student features on the evaluation split:"
        " parquet, a t-SNE figure per grid cell, and their cosine similarity, L2 distance and"
        " top-1 agreement (needs the features extra)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    if args.features:
        from tune_kd.analysis import features  # needs torch, which the rest does not

        missing = features.missing_extra()
        if missing:
            return cli.fail(missing)
    try:
        report = write_report(args.experiment, args.out, args.metric)
        if args.features:
            out = results_location(args.experiment, args.out)
            extracted = features.write_features(report.experiment, out)
    except ExperimentError as error:
        return cli.fail(error)
    methods = format_method_tables(report.summary, args.metric)
    if methods:
        print(methods + "\n")
    print(format_summary(report.summary, args.metric, report.files, report.failures))
    if args.features:
        print("\n" + features.format_features(extracted))
    return 0
