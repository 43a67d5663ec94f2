"""Tune's live status table for a sweep, as the driver prints it.

Tune's `CLIReporter` is kept, with three corrections for a sweep whose trials report a running average after
every task: the "Current best trial" line names the best *finished* trial (a trial two tasks in would otherwise
lead with an average over two tasks), the results are said to be in `--output` (Tune names its staging
directory under /tmp/ray), and the columns are the method's parameters.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ray.tune import CLIReporter

FINAL_KEY = "report"          # only a trial's last result carries the whole report


class SweepReporter(CLIReporter):
    """CLIReporter for a sweep: method columns, the best finished trial, results in `output`."""

    def __init__(self, metric: str, parameters: Sequence[str], output: Path) -> None:
        columns = {f"config/method/{p}": p for p in parameters}     # a trial of a method without p shows a blank
        columns.update({metric: metric, "tasks_done": "tasks", "model_info/extra_params": "extra params"})
        super().__init__(parameter_columns={"method/name": "method"}, metric_columns=columns,
                         max_report_frequency=15, sort_by_metric=True)
        self.output = output

    def _current_best_trial(self, trials: list):
        return super()._current_best_trial([t for t in trials if FINAL_KEY in (t.last_result or {})])

    def _progress_str(self, trials: list, done: bool, *sys_info: str, fmt: str = "psql", delim: str = "\n") -> str:
        text = super()._progress_str(trials, done, *sys_info, fmt=fmt, delim=delim)
        lines = [f"Results: {self.output}" if line.startswith("Result logdir: ") else line
                 for line in text.split(delim)]
        return delim.join(lines)
