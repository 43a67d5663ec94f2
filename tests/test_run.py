"""One configuration end to end: run_trial and `python -m smile_ray.run` on the tiny embedded benchmark."""
import json
import os
import stat
import subprocess
import sys

import pytest
import yaml

from smile_ray import SmileError
from smile_ray.report import MODEL_INFO_NUMBERS, TIMINGS, task_names
from smile_ray.run import main
from smile_ray.smile.checkpoint import load_model
from smile_ray.trial import build_pools, run_trial


def test_smile_report_has_tasks_average_params_and_timings(tiny_config, tmp_path):
    seen = []
    report = run_trial(tiny_config, svd_cache=tmp_path / "svd",
                       on_task_done=lambda task, metrics, running: seen.append((task, running["average"])))
    tasks = task_names(report)
    assert len(tasks) == 8 and [t for t, _ in seen] == tasks
    assert report["average"]["accuracy"] == pytest.approx(sum(report[t]["accuracy"] for t in tasks) / 8)
    assert seen[-1][1]["accuracy"] == pytest.approx(report["average"]["accuracy"])
    info = report["model_info"]
    assert info["all_params"] > info["base_params"] and info["ratio"] > 1 and info["name"] == "smile"
    assert info["active_params"] < info["all_params"]
    assert info["svd_calls"] > 0 and info["svd_cache_hits"] == 0
    assert set(report["timings"]) >= {"svd_seconds", "upscale_seconds", "eval_seconds"}
    again = run_trial(tiny_config, svd_cache=tmp_path / "svd")
    assert again["model_info"]["svd_calls"] == 0 and again["model_info"]["svd_cache_hits"] == info["svd_calls"]
    assert again["average"] == report["average"]


@pytest.mark.parametrize("method", [
    {"name": "simple_average"},
    {"name": "task_arithmetic", "scaling": 0.5},
    {"name": "individual", "model": "digit"},
    {"name": "individual"},
    {"name": "projection", "model": "parity", "space": "II"},
])
def test_every_method_runs(tiny_config, method):
    report = run_trial({**tiny_config, "method": method})
    assert 0 <= report["average"]["accuracy"] <= 1
    assert report["model_info"]["extra_params"] == 0


def test_individual_expert_equals_its_model_evaluated_directly(tiny_config, tiny_bench):
    pools = build_pools(tiny_config)
    report = run_trial({**tiny_config, "method": {"name": "individual", "model": "digit"}}, pools=pools)
    direct = pools.tasks.evaluate(pools.models.load_expert("digit"))
    assert report["digit"]["accuracy"] == direct["digit"]["accuracy"]


def test_saved_model_loads_back_to_the_same_results(tiny_config, tmp_path):
    pools = build_pools(tiny_config)
    report = run_trial(tiny_config, pools=pools, save_model_dir=tmp_path / "model")
    reloaded = load_model(tmp_path / "model")
    results = pools.tasks.evaluate(reloaded)
    assert {t: results[t] for t in task_names(report)} == {t: report[t] for t in task_names(report)}
    assert results["average"]["accuracy"] == report["average"]["accuracy"] == report["average"]["score"]


def test_generic_clip_pool_config_on_local_directories(tiny_bench, tiny_config):
    config = {
        "model_pool": {"kind": "clip_vision", "base": str(tiny_bench.clip_dir),
                       "experts": {name: str(path) for name, path in list(tiny_bench.experts.items())[:3]}},
        "task_pool": {"kind": "clip_zero_shot", "max_samples": 10,
                      "tasks": [{"name": t.name, "dataset": t.dataset, "classnames": t.classnames,
                                 "templates": t.templates} for t in tiny_bench.tasks[:3]]},
        "method": {"name": "smile", "gate_k": 2, "k": 4, "top_k": 2},
    }
    report = run_trial(config)
    assert task_names(report) == [t.name for t in tiny_bench.tasks[:3]]


def test_cli_writes_report_and_model(tiny_config, tmp_path, capsys):
    config_file = tmp_path / "run.yaml"
    config_file.write_text(yaml.safe_dump(tiny_config))
    umask = os.umask(0o027)            # the written files get the modes of a plain open()/mkdir under the umask
    try:
        code = main(["--config", str(config_file), "--set", "method.gate_k=2", "--report", str(tmp_path / "r.json"),
                     "--save-model", str(tmp_path / "m"), "--svd-cache", str(tmp_path / "svd"), "--threads", "1"])
    finally:
        os.umask(umask)
    out = capsys.readouterr().out
    assert code == 0 and "average" in out and "parameters:" in out
    report = json.loads((tmp_path / "r.json").read_text())
    assert set(report) >= {"model_info", "average", "digit"} and set(report["digit"]) == {"accuracy", "loss"}
    numbers = {key for key, value in report["model_info"].items() if isinstance(value, (int, float))}
    assert numbers == set(MODEL_INFO_NUMBERS) and set(report["timings"]) == set(TIMINGS)   # what a metric may name
    saved = {p.name for p in (tmp_path / "m").iterdir()}
    assert {"model.safetensors", "config.json", "modeling_smile.py", "layer.py"} <= saved
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in [tmp_path / "r.json", tmp_path / "m",
                                                              *(tmp_path / "m").iterdir()]}
    assert modes == {"r.json": 0o640, "m": 0o750, **{p.name: 0o640 for p in (tmp_path / "m").iterdir()}}


@pytest.mark.parametrize("args, message", [
    (["--set", "method.name=nope"], "method.name: unknown method 'nope'"),
    (["--set", "method.gate_k=0"], "method.gate_k: must be positive"),
    (["--set", "method.k=[1"], "--set 'method.k=[1': the value is not valid YAML"),
    (["--set", "novalue"], "--set 'novalue': expected KEY.PATH=VALUE"),
    (["--set", "method.top_k=9"], "top_k"),
    (["--set", "method.colour=red"], "method.colour: unknown key"),
    (["--set", "method.svd_solver=lanczos"], "method.svd_solver: must be one of exact, randomized"),
    (["--set", "task_pool.tasks=[digit, nope]"], "task_pool.tasks[1]: unknown task 'nope'"),
    (["--set", "task_pool.batch_size=0"], "task_pool.batch_size: must be at least 1"),
    (["--set", "method.gate_k=[4, 8]"], "method.gate_k: a grid of values, but one configuration is run here"),
    (["--set", "method=[{name: simple_average}, {name: simple_average}]"], "method: a list of 2 methods"),
    (["--set", "model_pool.kind=zoo"], "model_pool.kind: unknown kind 'zoo'"),
    (["--config", "/nonexistent/run.yaml"], "/nonexistent/run.yaml: no such file"),
])
def test_cli_bad_input_is_one_line_and_exit_2(tiny_config, tmp_path, capsys, args, message):
    config_file = tmp_path / "run.yaml"
    config_file.write_text(yaml.safe_dump(tiny_config))
    report = tmp_path / "r.json"
    argv = ["--config", str(config_file), *args, "--report", str(report), "--no-svd-cache", "--threads", "1"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err
    assert not report.exists()


def test_cli_bad_yaml_names_the_file_and_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("method:\n  name: smile\n  gate_k: [1,\n")
    assert main(["--config", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {bad}:") and "invalid YAML" in err


def test_missing_model_directory_is_named(tiny_config, tmp_path):
    config = {**tiny_config, "model_pool": {"kind": "clip_vision", "base": str(tmp_path / "nothing"),
                                            "experts": {"a": str(tmp_path / "a")}},
              "task_pool": {**tiny_config["task_pool"], "scale": "tiny",
                            "cache_dir": tiny_config["model_pool"]["cache_dir"]},
              "method": {"name": "simple_average"}}
    with pytest.raises(SmileError, match=f"^model_pool.base: cannot load '{tmp_path}/nothing'"):
        run_trial(config)


def test_cli_refuses_bad_input_before_loading_transformers():
    """A typo is refused in about a second: the checks run before torch's model stack is imported."""
    code = ("import sys\nfrom smile_ray.run import main\n"
            "assert main(['--set', 'method.gate_k=0']) == 2\n"
            "assert 'transformers' not in sys.modules and 'datasets' not in sys.modules, 'imported too early'\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stderr.strip() == "error: method.gate_k: must be positive, got 0"
