"""Multi-fidelity sweeps: rungs of samples, their evaluation, the scheduler's rule, and a halving sweep end to end."""
import json
from types import SimpleNamespace

import pytest
from mlflow.tracking import MlflowClient
from ray.tune.schedulers import TrialScheduler

from smile_ray.sweep.halving import SampleHalving, score_stderr
from smile_ray.sweep.record import experiment_path
from smile_ray.tasks.evaluation import merge_sample_means
from smile_ray.trial import rung_sizes, run_trial
from smile_ray.tune import main
from tests.test_tune import write_space


def test_rungs_grow_by_the_reduction_factor_and_end_with_every_sample():
    assert rung_sizes(16, 3, 540) == [16, 48, 144, 432, 540]
    assert rung_sizes(16, 3, 48) == [16, 48] and rung_sizes(16, 3, 10) == [10]


def test_slices_merge_into_the_mean_over_all_their_samples():
    merged = merge_sample_means(merge_sample_means(None, {"accuracy": 1.0, "samples": 1, "seconds": 0.5}),
                                {"accuracy": 0.25, "samples": 3, "seconds": 1.0})
    assert merged == {"accuracy": pytest.approx(0.4375), "samples": 4, "seconds": 1.5}


def test_the_standard_error_is_binomial_over_the_samples_seen():
    results = {"a": {"accuracy": 0.5}, "b": {"accuracy": 1.0}}
    assert score_stderr(results, {"a": "accuracy", "b": "accuracy"}, {"a": 25, "b": 25}) == pytest.approx(0.05)


def result(rung, score, stderr=0.0, **extra):
    return {"rung": rung, "average/accuracy": score, "score_stderr": stderr, **extra}


def test_scheduler_keeps_the_best_third_at_every_rung_passed_less_a_margin_of_noise():
    scheduler = SampleHalving(3, metric="average/accuracy", mode="max")
    decide = lambda trial, res: scheduler.on_trial_result(None, SimpleNamespace(trial_id=trial), res)
    assert decide("a", result(1, 0.4)) == TrialScheduler.CONTINUE           # alone: it is the best third
    assert decide("b", result(1, 0.9)) == TrialScheduler.CONTINUE
    assert decide("a", result(2, 0.45)) == TrialScheduler.STOP              # rung 1 judged again: below b's 0.9
    assert decide("c", result(1, 0.85, stderr=0.06)) == TrialScheduler.CONTINUE  # within a standard error of it
    assert decide("d", result(1, 0.9)) == TrialScheduler.CONTINUE           # a tie goes on
    assert decide("e", result(1, 0.5)) == TrialScheduler.STOP
    assert decide("b", result(2, 0.1, report={})) == TrialScheduler.CONTINUE  # the final report is no rung
    assert scheduler.stopped == {"a": 2, "e": 1}
    from_tuner = SampleHalving(3)                     # as the sweep makes it: metric and mode come from the Tuner
    assert from_tuner.set_search_properties("average/accuracy", "max")
    assert (from_tuner._metric, from_tuner._mode) == ("average/accuracy", "max")
    lower = SampleHalving(2, metric="average/loss", mode="min")
    lower.on_trial_result(None, SimpleNamespace(trial_id="a"), {"rung": 1, "average/loss": 0.2})
    assert lower.on_trial_result(None, SimpleNamespace(trial_id="b"), {"rung": 1, "average/loss": 0.9}) == "STOP"


def test_a_trial_in_rungs_scores_exactly_what_a_full_evaluation_does(tiny_config):
    config = {**tiny_config, "method": {"name": "smile", "gate_k": 2, "k": 4}}
    full = run_trial(config)
    rungs = []
    halved = run_trial(config, halving=(4, 2), on_rung=lambda rung, samples, running, evaluated: rungs.append(
        (rung, samples, running["average"]["accuracy"])))
    counts = [samples for _, samples, _ in rungs]
    assert [rung for rung, _, _ in rungs] == list(range(1, len(rungs) + 1))
    assert counts[:2] == [4, 8] and counts == sorted(counts)          # the last rung's results are the report
    for task in ("digit", "word"):
        assert halved[task]["accuracy"] == full[task]["accuracy"]
        assert halved[task]["loss"] == pytest.approx(full[task]["loss"], rel=0.05)   # batch means, weighted
    assert halved["timings"]["eval_samples"] == full["timings"]["eval_samples"] > 0


def test_a_halving_sweep_stops_weak_trials_early_and_keeps_every_trial_in_mlflow(ray_session, tiny_cache, tmp_path):
    # one trial at a time: the first always finishes (nothing to compare with); a later one whose loss is worse than
    # the best earlier one's at some rung (no noise margin) stops there. (Losses, unlike this tiny benchmark's
    # accuracies, do not tie.)
    methods = [{"name": "individual", "model": ["word", "pretrained", "digit", "parity"]},
               {"name": "simple_average"}, {"name": "task_arithmetic", "scaling": 3.0}]
    space = write_space(tmp_path / "space.yaml", tiny_cache, methods,
                        search={"max_concurrent": 1, "scheduler": "halving", "min_samples": 2, "reduction_factor": 2,
                                "noise_margin": 0, "metric": "average/loss"})
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert main(["--space", str(space), "--output", str(tmp_path / "out"), "--tracking-uri", uri]) == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    trials = summary["trials"]
    stopped = [t for t in trials if t["status"] == "stopped"]
    finished = [t for t in trials if t["status"] == "finished"]
    assert len(trials) == 6 and stopped and finished and len(stopped) + len(finished) == 6
    for trial in stopped:                    # scored on fewer samples than a finished trial
        assert trial["metrics"]["samples_per_task"] < 20
        assert trial["metrics"]["timings/eval_samples"] < finished[0]["metrics"]["timings/eval_samples"]
    assert summary["best"]["trial_id"] in {t["trial_id"] for t in finished}
    experiment = experiment_path(tmp_path / "out")
    rungs = {t["trial_id"]: [json.loads(line) for line in (experiment / f"trial_{t['trial_id']}" / "result.json")
                             .read_text().splitlines()] for t in trials}
    assert [r.get("samples_per_task") for r in rungs[finished[0]["trial_id"]]] == [2, 4, 8, 16, None]  # then report
    def earlier_best(trial_id, rung):        # one trial at a time: the others' losses seen when it ran
        return min([r["average/loss"] for other, results in rungs.items() if other < trial_id
                    for r in results if r.get("rung") == rung], default=float("inf"))

    for trial in stopped:                    # each was worse than the best earlier loss at some rung it passed
        assert any(r["average/loss"] > earlier_best(trial["trial_id"], r["rung"]) for r in rungs[trial["trial_id"]])
    client = MlflowClient(uri)
    kids = client.search_runs([summary["mlflow"]["experiment_id"]],
                              filter_string=f"tags.mlflow.parentRunId = '{summary['mlflow']['parent_run_id']}'")
    assert len(kids) == 6
    assert {r.data.tags["smile_ray.stopped_early"] for r in kids} == {"true", "false"}
