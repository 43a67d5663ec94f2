"""Multi-fidelity sweeps (`search.scheduler: halving`): successive halving whose rungs are evaluation samples.

Every trial first scores its configuration on the first `min_samples` samples of every task, then on
`reduction_factor` times as many, and so on up to every sample (`trial.rung_sizes`); it reports its running score at
the end of each rung. At each report the scheduler keeps a trial only if, at every rung it has passed, its score
reaches the best 1/reduction_factor of the scores recorded at that rung so far (asynchronously, like ASHA; judging
the passed rungs again means that a trial that went on early, when few scores were in, is stopped at its next report
once better ones have come). Two guards against dropping the best configuration on a lucky small sample:

- every trial sees the same samples at a rung (each task's first N, in dataset order), so configurations are compared
  on paired data and the sampling noise common to all of them cancels;
- a trial is stopped only when its score is below the cutoff by more than `noise_margin` of its own standard error
  (`score_stderr`, the binomial standard error of the mean of the tasks' scores at the samples seen); a tie goes on.
"""
from __future__ import annotations

import math
from collections.abc import Mapping

from ray.tune.schedulers import FIFOScheduler, TrialScheduler

NOISE_MARGIN = 1.0          # standard errors below the cutoff before a trial is stopped


def score_stderr(results: Mapping[str, Mapping[str, float]], primary: Mapping[str, str],
                 samples: Mapping[str, int]) -> float:
    """The standard error of the mean of the tasks' primary scores, each a proportion p over n samples:
    √(Σ p(1 − p)/n) / T (scores outside [0, 1] are clamped into it)."""
    variance = 0.0
    for task, metric in primary.items():
        if task in results and samples.get(task):
            p = min(max(float(results[task][metric]), 0.0), 1.0)
            variance += p * (1 - p) / samples[task]
    return math.sqrt(variance) / max(1, len(primary))


class SampleHalving(FIFOScheduler):
    """Stops trials at the rungs they report (`rung` in a result), per the module's rule; FIFO otherwise."""

    def __init__(self, reduction_factor: int, noise_margin: float = NOISE_MARGIN, *, metric: str | None = None,
                 mode: str | None = None):
        super().__init__()
        self._metric, self._mode = metric, mode        # None: the Tuner's (TrialScheduler.set_search_properties)
        self.reduction_factor, self.noise_margin = reduction_factor, noise_margin
        self.recorded: dict[int, dict[str, float]] = {}          # rung → trial id → score (higher is better)
        self.stderr: dict[int, dict[str, float]] = {}            # rung → trial id → the score's standard error
        self.stopped: dict[str, int] = {}                        # trial id → the rung it was stopped at

    def set_search_properties(self, metric: str | None, mode: str | None, **spec) -> bool:
        """The Tuner's metric and mode (TrialScheduler's sets the metric only)."""
        if self._mode and mode:
            return False
        self._mode = self._mode or mode
        return super().set_search_properties(metric, mode, **spec)

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        rung, score = result.get("rung"), result.get(self._metric)
        if rung is None or score is None or "report" in result:  # not a rung (the final report repeats the last)
            return TrialScheduler.CONTINUE
        sign = 1.0 if self._mode == "max" else -1.0
        self.recorded.setdefault(int(rung), {})[trial.trial_id] = sign * float(score)
        self.stderr.setdefault(int(rung), {})[trial.trial_id] = float(result.get("score_stderr", 0.0))
        for passed, scores in self.recorded.items():
            if trial.trial_id in scores and not self.keeps(scores, scores[trial.trial_id],
                                                           self.stderr[passed][trial.trial_id]):
                self.stopped[trial.trial_id] = int(rung)
                return TrialScheduler.STOP
        return TrialScheduler.CONTINUE

    def keeps(self, scores: Mapping[str, float], score: float, stderr: float) -> bool:
        """Whether a score reaches the rung's cutoff (the best 1/reduction_factor of `scores`, this one's included),
        less the margin."""
        ranked = sorted(scores.values(), reverse=True)
        cutoff = ranked[max(0, math.ceil(len(ranked) / self.reduction_factor) - 1)]
        return score >= cutoff - self.noise_margin * stderr

    def debug_string(self) -> str:
        return f"SampleHalving: {len(self.stopped)} trial(s) stopped early"
