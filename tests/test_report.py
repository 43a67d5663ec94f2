"""The FusionBench-style report: parameter accounting, JSON layout, atomic write, text table, flat metric names."""
from __future__ import annotations

import json
import os
import stat

import pytest
import torch
from torch import nn

from smile_ray.report import (average_metrics, build_report, count_parameters, current_umask, flatten_metrics,
                              format_task_table, write_report)

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
    with pytest.raises(ValueError, match="model_info lacks trainable_params, all_params, trainable_percentage"):
        build_report(RESULTS)
    with pytest.raises(ValueError, match="results hold no task"):
        build_report({}, model_info=info)


def test_write_report_is_atomic_and_replaces(tmp_path):
    report = build_report(RESULTS, model_info={"trainable_params": 1, "all_params": 2, "trainable_percentage": 0.5})
    path = tmp_path / "runs" / "trial_0" / "report.json"
    assert write_report(report, path) == path
    assert json.loads(path.read_text()) == report
    write_report({**report, "timings": {"eval_seconds": 2.0}}, path)
    assert json.loads(path.read_text())["timings"] == {"eval_seconds": 2.0}
    with pytest.raises(TypeError):
        write_report({**report, "model_info": {"weights": torch.zeros(1)}}, path)  # not JSON: fails mid-write
    assert json.loads(path.read_text())["timings"] == {"eval_seconds": 2.0}  # the old file is intact
    assert sorted(p.name for p in path.parent.iterdir()) == ["report.json"]  # no temp file left behind


@pytest.mark.parametrize("umask", [0o022, 0o027], ids=["022", "027"])
def test_write_report_gives_a_plain_files_permissions(tmp_path, umask):
    # mkstemp's 0o600 must not survive the rename: shared storage needs what open(path, "w") would give
    old = os.umask(umask)
    try:
        assert current_umask() == umask
        path = write_report({"a": 1}, tmp_path / "reports" / "r.json")
        plain = tmp_path / "plain.json"
        plain.write_text("{}")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == stat.S_IMODE(plain.stat().st_mode) == 0o666 & ~umask
    assert json.loads(path.read_text()) == {"a": 1}


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
