"""The progress table a sweep prints as it runs (`tuner.progress_reporter` configures it).

A module of its own because it subclasses Ray Tune's reporter, so importing it imports Ray, and
because Tune saves the reporter with the experiment, which needs a class of a module to load."""

from __future__ import annotations

from typing import Any

from ray import tune


class ProgressTable(tune.CLIReporter):
    """Tune's table of trials, whose folder line is the experiment's `location` in the storage
    (not Tune's copy of it in Ray's temporary folder) and whose best trial is named as in the
    table (`trial_0003`, not Tune's id)."""

    def __init__(self, location: str, **options: Any):
        super().__init__(**options)
        self.location = location

    def _progress_str(self, trials: list[Any], done: bool, *sys_info: str, **options: Any) -> str:
        text = super()._progress_str(trials, done, *sys_info, **options)
        lines = [
            f"Result logdir: {self.location}" if line.startswith("Result logdir: ") else line
            for line in text.split("\n")
        ]
        best, _ = self._current_best_trial(trials)
        if best is not None:
            tune_id = f"Current best trial: {best.trial_id} "
            lines = [line.replace(tune_id, f"Current best trial: {best} ") for line in lines]
        return "\n".join(lines)
