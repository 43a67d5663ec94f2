"""The FusionBench-style report: parameter accounting, JSON layout, text table, flat metric names."""
from __future__ import annotations

import json

import pytest
from torch import nn

from smile_ray.report import average_metrics, build_report, count_parameters, flatten_metrics, format_task_table

RESULTS = {"sun397": {"accuracy": 0.75, "loss": 1.0}, "stanford-cars": {"accuracy": 0.5, "loss": 2.0}}


def _tied_model() -> nn.Module:
    model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 10, bias=True), nn.LayerNorm(4))
    model[1].weight = model[0].weight  # shared: counted once, as named_parameters yields it once
    model[2].weight.requires_grad_(False)
    return model


def test_count_parameters_deduplicates_shared_and_splits_trainable():
    info = count_parameters(_tied_model())
    assert info == {"trainable_params": 40 + 10 + 4, "all_params": 40 + 10 + 8,
                    "trainable_percentage": pytest.approx(54 / 58)}


def test_report_layout_is_fusionbench_compatible():
    report = build_report(RESULTS, model=_tied_model(), name="smile_k16_gate4",
                          model_info={"base_params": 100, "expert_params": 12},
                          timings={"svd_seconds": 1.5, "upscale_seconds": 0.25, "eval_seconds": 3})
    assert list(report) == ["model_info", "sun397", "stanford-cars", "average", "timings"]
    assert report["model_info"] == {"trainable_params": 54, "all_params": 58,
                                    "trainable_percentage": pytest.approx(54 / 58), "base_params": 100,
                                    "expert_params": 12, "name": "smile_k16_gate4"}
    assert report["sun397"] == {"accuracy": 0.75, "loss": 1.0}
    assert report["average"] == {"accuracy": 0.625, "loss": 1.5}
    assert report["timings"] == {"svd_seconds": 1.5, "upscale_seconds": 0.25, "eval_seconds": 3.0}
    json.dumps(report)


def test_report_keeps_a_given_average_and_needs_model_info():
    given = {**RESULTS, "average": {"accuracy": 0.6, "loss": 1.4}}
    info = {"trainable_params": 1, "all_params": 2, "trainable_percentage": 0.5}
    assert build_report(given, model_info=info)["average"] == {"accuracy": 0.6, "loss": 1.4}
    assert average_metrics(RESULTS) == {"accuracy": 0.625, "loss": 1.5}
    mixed = {"sst2": {"accuracy": 0.9, "unparsable": 0.0}, "stsb": {"spearman": 0.5, "unparsable": 0.1}}
    assert average_metrics(mixed, {"sst2": "accuracy", "stsb": "spearman"}) == {"unparsable": 0.05, "score": 0.7}
    with pytest.raises(ValueError, match="model_info lacks trainable_params, all_params, trainable_percentage"):
        build_report(RESULTS)
    with pytest.raises(ValueError, match="results hold no task"):
        build_report({}, model_info=info)


def test_task_table_lists_tasks_then_average():
    report = build_report(RESULTS, model_info={"trainable_params": 1, "all_params": 2, "trainable_percentage": 0.5})
    lines = format_task_table(report).splitlines()
    assert lines[0].split() == ["task", "accuracy", "%", "loss"]
    assert lines[2].split() == ["sun397", "75.00", "1.0000"]
    assert lines[3].split() == ["stanford-cars", "50.00", "2.0000"]
    assert set(lines[4]) == {"-"}
    assert lines[5].split() == ["average", "62.50", "1.5000"]
    assert len(lines) == 6


def test_flatten_metrics_uses_fusionbench_names():
    report = build_report(RESULTS, model=_tied_model(), name="base", timings={"svd_seconds": 1.5})
    flat = flatten_metrics(report)
    assert flat == {"model_info/trainable_params": 54.0, "model_info/all_params": 58.0,
                    "model_info/trainable_percentage": pytest.approx(54 / 58),
                    "sun397/accuracy": 0.75, "sun397/loss": 1.0,
                    "stanford-cars/accuracy": 0.5, "stanford-cars/loss": 2.0,
                    "average/accuracy": 0.625, "average/loss": 1.5, "timings/svd_seconds": 1.5}
    assert all(isinstance(v, int) == (k.startswith("model_info/") and not k.endswith("percentage"))
               for k, v in flat.items())                                      # counts stay integers
