"""A sweep's results: every trial to parquet, mean ± std per grid cell, plots, published numbers.

`python -m tune_kd.analysis EXPERIMENT_DIR` writes them (see `report`); the notebook
`analysis/sweep_report.ipynb` shows them. The data path, one module per step:

- `read`: the sweep's plan (`tune_kd_plan.json`: every planned trial and its labels), Tune's runner
  state and trial folders (`result.json`: one JSON line per epoch);
- `parsed`: each result.json's parse, kept beside the results for the next analysis;
- `runs`: which planned trial each folder holds;
- `frames`: `load_experiment` -> `trials_frame` (one row per planned trial, with its status) and
  `epochs_frame` (one row per trial and epoch);
- `cells`: `summarize`, mean ± std per grid cell over its completed trials;
- `published`: the published number of each cell's setting;
- `tables` and `plots`: the summary as text, markdown and LaTeX, the methods of each
  teacher/student pair against their published numbers; the figures;
- `report`: `write_report`, every file of the above, and the command line;
- `features` (its `--features`, and the one module here that needs torch, so not imported by
  this package): each finished trial's teacher and student features, their t-SNE figures and
  how close they are.
"""

from tune_kd.analysis.cells import summarize
from tune_kd.analysis.frames import TRIAL_RESULTS, Experiment, load_experiment
from tune_kd.analysis.plots import (
    figures,
    plot_accuracy_vs_gpu_hours,
    plot_accuracy_vs_lr,
    plot_curves,
    plot_methods,
    plot_top5_vs_lr,
)
from tune_kd.analysis.published import most_specific, published_numbers
from tune_kd.analysis.read import last_failure, latest_per_epoch
from tune_kd.analysis.report import RESULTS_FOLDER, SweepReport, main, write_files, write_report
from tune_kd.analysis.tables import (
    display_table,
    format_accuracy,
    format_method_tables,
    format_summary,
    method_notes,
    method_tables,
    pair_methods,
    summary_markdown,
)

__all__ = [
    "RESULTS_FOLDER",
    "TRIAL_RESULTS",
    "Experiment",
    "SweepReport",
    "display_table",
    "figures",
    "format_accuracy",
    "format_method_tables",
    "format_summary",
    "last_failure",
    "latest_per_epoch",
    "load_experiment",
    "main",
    "method_notes",
    "method_tables",
    "most_specific",
    "pair_methods",
    "plot_accuracy_vs_gpu_hours",
    "plot_accuracy_vs_lr",
    "plot_curves",
    "plot_methods",
    "plot_top5_vs_lr",
    "published_numbers",
    "summarize",
    "summary_markdown",
    "write_files",
    "write_report",
]
