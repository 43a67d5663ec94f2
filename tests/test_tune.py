"""`python -m smile_ray.tune` end to end on the tiny embedded benchmark: MLflow layout, SVD once per sweep,
resume after a killed driver, failing trials, and bad input."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from smile_ray.sweep.record import experiment_path
from smile_ray.tune import main

TASKS = ["digit", "word", "parity"]


def write_space(path: Path, tiny_cache, method, **sections) -> Path:
    space = {"name": "tiny",
             "model_pool": {"kind": "embedded", "scale": "tiny", "cache_dir": str(tiny_cache)},
             "task_pool": {"kind": "embedded", "max_samples": 20, "tasks": TASKS},
             "method": method,
             "search": {"max_concurrent": 2},
             "resources": {"cpu": 1},
             "tracking": {"experiment": "tiny-sweep"}}
    space.update(sections)
    path.write_text(yaml.safe_dump(space))
    return path


def children(client, experiment_id, parent_id):
    return client.search_runs([experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent_id}'",
                              max_results=1000)


@pytest.fixture(scope="module")
def sweep(ray_session, tiny_cache, tmp_path_factory):
    """One finished sweep: 2 individual models + a 2 × 2 SMILE grid."""
    tmp = tmp_path_factory.mktemp("sweep")
    space = write_space(tmp / "space.yaml", tiny_cache, [
        {"name": "individual", "model": ["pretrained", "digit"]},
        {"name": "smile", "gate_k": [2, 4], "k": [4, -1]},
    ])
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    code = main(["--space", str(space), "--output", str(tmp / "out"), "--tracking-uri", uri])
    summary = json.loads((tmp / "out" / "summary.json").read_text())
    return code, summary, uri, tmp


def test_sweep_finishes_and_mlflow_holds_one_parent_and_a_child_per_trial(sweep):
    code, summary, uri, _ = sweep
    assert code == 0 and len(summary["trials"]) == 6
    assert all(t["status"] == "finished" for t in summary["trials"])
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("tiny-sweep")
    assert experiment.experiment_id == summary["mlflow"]["experiment_id"]
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert [p.info.run_id for p in parents] == [summary["mlflow"]["parent_run_id"]]
    kids = children(client, experiment.experiment_id, parents[0].info.run_id)
    assert sorted(r.info.run_id for r in kids) == sorted(t["mlflow_run_id"] for t in summary["trials"])
    by_id = {r.info.run_id: r for r in kids}
    for trial in summary["trials"]:
        run = by_id[trial["mlflow_run_id"]]
        assert run.info.status == "FINISHED"
        assert run.data.params["method.name"] == trial["config"]["name"]
        assert run.data.metrics["average/accuracy"] == pytest.approx(trial["metrics"]["average/accuracy"])
        for task in TASKS:
            assert f"{task}/accuracy" in run.data.metrics and f"{task}/loss" in run.data.metrics
        for key in ("model_info/all_params", "model_info/ratio", "timings/eval_seconds", "timings/svd_seconds"):
            assert key in run.data.metrics
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"report.json", "per_task.json"} <= artifacts
    best = summary["best"]
    assert best["metrics"]["average/accuracy"] == max(t["metrics"]["average/accuracy"] for t in summary["trials"])


def test_svds_are_computed_once_for_the_whole_sweep(sweep):
    _, summary, _, _ = sweep
    prefill = summary["svd_prefill"]
    assert len(prefill) == 8 and all(p["svd_computed"] > 0 for p in prefill)      # one Ray task per expert
    smile = [t for t in summary["trials"] if t["config"]["name"] == "smile"]
    assert len(smile) == 4
    for trial in smile:
        assert trial["metrics"]["model_info/svd_calls"] == 0
        assert trial["metrics"]["model_info/svd_cache_hits"] > 0
        assert trial["metrics"]["timings/svd_seconds"] == 0


def test_trial_reports_after_every_task(sweep):
    _, summary, _, tmp = sweep
    trial = summary["trials"][0]
    lines = (experiment_path(tmp / "out") / f"trial_{trial['trial_id']}" / "result.json").read_text().splitlines()
    done = [json.loads(line)["tasks_done"] for line in lines]
    assert done == [1, 2, 3, 3]


def test_failing_trial_is_retried_then_marked_failed_and_the_sweep_completes(ray_session, tiny_bench, tmp_path):
    space = {"name": "fails",
             "model_pool": {"kind": "clip_vision", "base": str(tiny_bench.clip_dir),
                            "experts": {"digit": str(tiny_bench.experts["digit"])}},
             "task_pool": {"kind": "clip_zero_shot", "max_samples": 10,
                           "tasks": [{"name": t.name, "dataset": t.dataset, "classnames": t.classnames,
                                      "templates": t.templates} for t in tiny_bench.tasks[:2]]},
             "method": {"name": "individual", "model": "digit"},
             "search": {"max_failures": 1}, "tracking": {"save_model": True}}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(space))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "models").write_text("")      # where the trial saves its model: it fails there, in its worker
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert main(["--space", str(tmp_path / "s.yaml"), "--output", str(tmp_path / "out"), "--tracking-uri", uri]) == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    [trial] = summary["trials"]
    assert trial["status"] == "error" and "models" in trial["error"] and "\n" not in trial["error"]
    error_file = experiment_path(tmp_path / "out") / f"trial_{trial['trial_id']}" / "error.txt"
    assert error_file.read_text().count("Failure #") == 2            # the first try and one retry
    assert MlflowClient(uri).get_run(trial["mlflow_run_id"]).info.status == "FAILED"


def test_resume_after_ctrl_c_or_a_killed_driver_reruns_no_finished_trial(ray_session, tiny_cache, tmp_path, capsys):
    space = write_space(tmp_path / "space.yaml", tiny_cache, {"name": "smile", "gate_k": [1, 2, 3, 4], "k": [2, 4]},
                        search={"max_concurrent": 1})
    out, uri = tmp_path / "out", f"sqlite:///{tmp_path / 'mlflow.db'}"
    common = ["--output", str(out), "--tracking-uri", uri, "--address", ray_session.get_runtime_context().gcs_address]
    command = [sys.executable, "-m", "smile_ray.tune", "--space", str(space), *common]
    resume = [sys.executable, "-m", "smile_ray.tune", *common, "--resume"]      # the space stored with the sweep

    def finished_trials() -> dict[str, int]:
        """trial id → modification time of its saved report (written once, when the trial finishes)."""
        return {p.stem: p.stat().st_mtime_ns for p in (out / "reports").glob("*.json")}

    def stop_after(command: list[str], trials: int, sig: int) -> subprocess.Popen:
        driver = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                  start_new_session=True)
        deadline = time.time() + 240
        while len(finished_trials()) < trials and time.time() < deadline and driver.poll() is None:
            time.sleep(0.1)
        os.killpg(driver.pid, sig)
        driver.wait(timeout=120)
        return driver

    interrupted = stop_after(command, 2, signal.SIGINT)               # Ctrl-C: Tune saves its state and stops
    said = interrupted.stderr.read()
    assert interrupted.returncode == 1 and f"python -m smile_ray.tune --resume --output {out}" in said
    assert "Tuner.restore(" not in said                     # Tune's advice for Python callers is left out
    assert 2 <= len(finished_trials()) < 8 and not (out / "summary.json").exists()
    client = MlflowClient(uri)
    parent, = [r for r in client.search_runs([client.get_experiment_by_name("tiny-sweep").experiment_id])
               if "mlflow.parentRunId" not in r.data.tags]
    assert parent.info.status == "KILLED"

    capsys.readouterr()                                     # refusals (in-process: they happen before Ray)
    assert main([*command[3:], "--resume", "--set", "method.k=[2,8]"]) == 2
    assert "--resume: the space differs at method.k" in capsys.readouterr().err
    shutil.copytree(out, tmp_path / "copy")                  # its Tune state and MLflow records point at `out`
    assert main(["--output", str(tmp_path / "copy"), "--resume"]) == 2
    assert f"was started in {out} and copied or moved since" in capsys.readouterr().err

    stop_after(resume, len(finished_trials()) + 1, signal.SIGKILL)        # a killed driver
    before = finished_trials()
    assert len(before) < 8 and not (out / "summary.json").exists()

    resumed = subprocess.run(resume, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    summary = json.loads((out / "summary.json").read_text())
    prefill = json.loads((out / "sweep.json").read_text())["svd_prefill"]       # the first run's prefill finished:
    assert "SVD cache:" not in resumed.stdout and summary["svd_prefill"] == prefill     # no second prefill
    assert len(summary["trials"]) == 8 and all(t["status"] == "finished" for t in summary["trials"])
    after = finished_trials()
    assert all(after[trial] == mtime for trial, mtime in before.items())      # finished trials were not rerun
    kids = children(client, summary["mlflow"]["experiment_id"], summary["mlflow"]["parent_run_id"])
    trial_ids = sorted(r.data.tags.get("trial_id") for r in kids)
    assert trial_ids == sorted(t["trial_id"] for t in summary["trials"])       # one child per trial, no duplicates
    runs = client.search_runs([summary["mlflow"]["experiment_id"]], max_results=1000)
    assert sum("mlflow.parentRunId" not in r.data.tags for r in runs) == 1       # the same parent run
    assert client.get_run(summary["mlflow"]["parent_run_id"]).info.status == "FINISHED"


BAD_INPUTS = [
    ("yaml", "method: [\n", [], "invalid YAML"),
    ("unknown_key", None, ["--set", "search.colour=red"], "search.colour: unknown key"),
    ("wrong_type", None, ["--set", "task_pool.batch_size=big"], "task_pool.batch_size: expected an integer"),
    ("gate_k", None, ["--set", "method.gate_k=[4,0]"], "method.gate_k.grid[1]: must be positive"),
    ("empty_grid", None, ["--set", "method.k={grid: []}"], "method.k.grid: empty grid"),
    ("unknown_method", None, ["--set", "method.name=ties"], "method.name: unknown method 'ties'"),
    ("unknown_task", None, ["--set", "task_pool.tasks=[digit,nope]"], "task_pool.tasks[1]: unknown task 'nope'"),
    ("missing_model", "clip_vision_missing", [], "is not a save_pretrained directory (no config.json) "
                                                 "(also: model_pool.experts.a, task_pool.tasks[0] (mnist))"),
    ("hub_id", "clip_vision_hub", [], "model_pool.base: 'openai/clip-vit-base-patch32' cannot be fetched"),
    ("bad_set", None, ["--set", "method.gate_k"], "--set 'method.gate_k': expected KEY.PATH=VALUE"),
    ("missing_space", "none", [], "--space"),
    ("nothing_to_resume", None, ["--resume"], "--resume: no sweep to resume in"),
    ("unknown_metric", None, ["--set", "search.metric=avg/acc"], "search.metric: unknown metric 'avg/acc'"),
    ("unknown_model", None, ["--set", "method={name: individual, model: [digits]}"],
     "method.model: unknown model 'digits'"),
    ("output_under_a_file", "output_under_a_file", [], "a_file is not a directory)"),
    ("output_holds_a_sweep", "output_holds_a_sweep", [], "holds a sweep already (started "),
    ("resume_and_overwrite", None, ["--resume", "--overwrite"], "not allowed with argument"),
    ("no_gpu_in_the_cluster", None, ["--set", "resources.gpu=1"],
     "resources.gpu: a trial asks for 1 GPU, but no node of this Ray cluster has one (its largest node has 2 CPUs "
     "and 0 GPUs); set resources.gpu=0 to run on CPUs"),
    ("more_cpus_than_a_node", None, ["--set", "resources.cpu=3"],
     "resources.cpu: a trial asks for 3 CPUs, but no node of this Ray cluster has that"),
    ("tracking_server_down", None, ["--tracking-uri", "http://127.0.0.1:9"], "no server answers"),
    ("unknown_svd_solver", None, ["--set", "method.svd_solver=lanczos"],
     "method.svd_solver: must be one of exact, randomized"),
    ("halving_reduction_factor", None, ["--set", "search={scheduler: halving, reduction_factor: 1}"],
     "search.reduction_factor: must be ≥ 2, got 1"),
    ("halving_without_sample_slices", None, ["--set", "task_pool={kind: dummy}", "--set", "search.scheduler=halving"],
     "search.scheduler: halving evaluates samples in rungs, which task pool kind 'dummy' cannot (kinds that can: "),
]


@pytest.mark.parametrize("kind, document, args, message", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(kind, document, args, message, ray_session, tiny_cache,
                                                         tmp_path, capsys):
    space = write_space(tmp_path / "space.yaml", tiny_cache, {"name": "smile", "gate_k": [2, 4], "k": 4})
    out = tmp_path / "out"
    if document == "none":
        space = tmp_path / "missing.yaml"
    elif document == "clip_vision_missing":
        args = ["--set", f"model_pool={{kind: clip_vision, base: {tmp_path}, experts: {{a: {tmp_path / 'nope'}}}}}",
                "--set", "task_pool={kind: clip_zero_shot, tasks: [mnist]}"]
    elif document == "clip_vision_hub":
        space = Path(__file__).parent.parent / "search_spaces" / "clip_b32.yaml"
    elif document == "output_under_a_file":
        (tmp_path / "a_file").write_text("")
        out = tmp_path / "a_file" / "out"
    elif document == "output_holds_a_sweep":           # the same command run twice
        out.mkdir()
        (out / "sweep.json").write_text("{}")
    elif document is not None:
        space.write_text(document)
    before = sorted(out.rglob("*")) if out.exists() else None
    try:
        code = main(["--space", str(space), "--output", str(out),
                     "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", *args])
    except SystemExit as exit:                          # argparse refuses a combination of flags
        code = exit.code
    err = capsys.readouterr().err.strip()
    if kind == "resume_and_overwrite":                  # argparse: its usage line, then the error
        err = err.splitlines()[-1].split(": ", 1)[1]
    assert code == 2 and err.startswith("error: ") and "\n" not in err and message in err
    assert (sorted(out.rglob("*")) if out.exists() else None) == before and not (tmp_path / "mlflow.db").exists()


@pytest.mark.parametrize("space", sorted(p.stem for p in (Path(__file__).parent.parent / "search_spaces").glob("*.yaml")))
def test_shipped_spaces_validate(space, capsys):
    assert main(["--space", space, "--validate"]) == 0
    assert "valid" in capsys.readouterr().out


def test_validate_prints_every_trial(capsys):
    assert main(["--validate", "--set", "method[3].gate_k=[4,8]"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("embedded: valid; 17 trials (grid search); SVD prefill: smile gk8 k32;")
    assert lines[0].endswith("; 1 CPU, 0 GPUs per trial (checked against the cluster when the sweep starts)")
    assert len(lines) == 18 and lines[1].split() == ["individual", "model=pretrained"]
    assert lines[-1].split() == ["smile", "gate_k=8", "k=-1"]


def test_the_space_is_stored_with_the_sweep_and_read_back_on_resume(tmp_path):
    import datetime

    from smile_ray.spec import parse_space
    from smile_ray.sweep.record import SweepOptions, resume_space, space_text, sweep_record

    document = {"name": "dated", "description": datetime.date(2025, 1, 2), "model_pool": {"kind": "embedded"},
                "task_pool": {"kind": "embedded"}, "method": {"name": "smile", "gate_k": [4, 8], "k": 4}}
    spec = parse_space(document, "dated")
    options = SweepOptions(output=tmp_path, tracking_uri="sqlite:///x.db", experiment="e")
    sweep_record(options, spec)                                          # any YAML value survives (a date here)
    stored = resume_space(tmp_path, [])
    assert space_text(stored) == space_text(spec) and stored.grid_points() == spec.grid_points()
    assert space_text(resume_space(tmp_path, ["method.k=8"])) != space_text(spec)


def test_two_sweeps_starting_in_the_same_second_stage_their_tune_files_apart(ray_session, tmp_path):
    """Tune stages an experiment's driver files in the Ray session under <start second>/<experiment name>: each
    sweep names its experiment for itself, so two sweeps on one cluster never share (and delete) those files."""
    from ray.train._internal.storage import StorageContext

    from smile_ray.spec import parse_space
    from smile_ray.sweep.record import SweepOptions, sweep_record

    spec = parse_space({"model_pool": {"kind": "embedded"}, "task_pool": {"kind": "embedded"},
                        "method": {"name": "smile", "gate_k": 4, "k": 4}}, "same")
    staging = set()
    for name in ("first", "second"):
        options = SweepOptions(output=tmp_path / name, tracking_uri="sqlite:///x.db", experiment="e")
        options.output.mkdir()
        sweep_record(options, spec)
        experiment = experiment_path(options.output)
        assert experiment.parent == options.output / "tune"
        storage = StorageContext(str(experiment.parent), experiment.name)       # as Tune builds it
        storage._timestamp = "2026-12-02_09-47-46"                               # both started in this second
        staging.add(storage.experiment_driver_staging_path)
    assert len(staging) == 2


def test_ranked_table_orders_by_the_metric_and_says_what_each_row_is():
    from smile_ray.sweep.summary import ranked_table

    trials = [{"status": "stopped", "config": {"name": "smile", "gate_k": 2, "k": 4},
               "metrics": {"average/accuracy": 0.9, "tasks_done": 3}},
              {"status": "finished", "config": {"name": "task_arithmetic", "scaling": 0.3},
               "metrics": {"average/accuracy": 0.5, "model_info/extra_params": 0}},
              {"status": "finished", "config": {"name": "smile", "gate_k": 16, "k": -1, "top_k": 1},
               "metrics": {"average/accuracy": 0.75, "model_info/extra_params": 1234567}},
              {"status": "error", "config": {"name": "individual", "model": "digit"}, "metrics": {}}]
    rows = ranked_table({"metric": "average/accuracy", "mode": "max", "trials": trials}).splitlines()[1:]
    assert rows[0].split() == ["1", "smile", "gk16", "dense", "75.00%", "1,234,567", "finished"]
    assert rows[1].split() == ["2", "task_arithmetic", "λ0.3", "50.00%", "0", "finished"]
    assert rows[2].split()[-5:] == ["90.00%", "stopped", "after", "3", "task(s)"]    # a partial running average
    assert rows[3].split() == ["4", "individual", "digit", "error"]


def test_clip_b32_grid_is_the_papers_77_points():
    from smile_ray.spec import load_space

    points = load_space("clip_b32").grid_points()
    assert len(points) == 77 and {(p["gate_k"], p["k"]) for p in points} >= {(16, 32), (768, -1), (1, 4)}


def test_overwrite_starts_the_sweep_over_and_replaces_its_mlflow_runs(ray_session, tiny_cache, tmp_path):
    space = write_space(tmp_path / "space.yaml", tiny_cache, {"name": "individual", "model": "pretrained"})
    out, uri = tmp_path / "out", f"sqlite:///{tmp_path / 'mlflow.db'}"
    command = ["--space", str(space), "--output", str(out), "--tracking-uri", uri]
    assert main(command) == 0
    first = json.loads((out / "summary.json").read_text())
    cached = sorted((out / "svd_cache").rglob("*")) if (out / "svd_cache").exists() else []
    assert main(command) == 2                                  # the same command again is refused…
    assert main([*command, "--overwrite"]) == 0                # …unless asked to start over
    second = json.loads((out / "summary.json").read_text())
    assert second["mlflow"]["parent_run_id"] != first["mlflow"]["parent_run_id"]
    client = MlflowClient(uri)
    old = client.get_run(first["mlflow"]["parent_run_id"])
    assert old.info.lifecycle_stage == "deleted"
    assert client.get_run(first["trials"][0]["mlflow_run_id"]).info.lifecycle_stage == "deleted"
    live = client.search_runs([second["mlflow"]["experiment_id"]])
    assert sorted(r.info.run_id for r in live) == sorted([second["mlflow"]["parent_run_id"],
                                                          second["trials"][0]["mlflow_run_id"]])
    assert all(p in sorted((out / "svd_cache").rglob("*")) for p in cached)     # the SVD cache is kept


def test_a_trial_worker_does_not_report_the_exit_tune_asked_for():
    from types import SimpleNamespace

    from smile_ray.sweep.workers import _quiet_exit_during_gc

    reported = []
    _quiet_exit_during_gc(SimpleNamespace(exc_type=SystemExit), report=reported.append)
    assert reported == []
    other = SimpleNamespace(exc_type=ValueError)
    _quiet_exit_during_gc(other, report=reported.append)
    assert reported == [other]


def test_a_driver_killed_during_the_svd_prefill_is_resumed(ray_session, tiny_cache, tmp_path):
    """SIGKILL the driver while its prefill tasks compute SVDs (sweep.json written, no Tune state yet): --resume
    starts the trials, with the SVDs already cached, and the sweep completes with one MLflow child per trial."""
    space = write_space(tmp_path / "space.yaml", tiny_cache, {"name": "smile", "gate_k": 2, "k": [4, -1]})
    out, uri = tmp_path / "out", f"sqlite:///{tmp_path / 'mlflow.db'}"
    common = ["--output", str(out), "--tracking-uri", uri, "--address", ray_session.get_runtime_context().gcs_address]
    driver = subprocess.Popen([sys.executable, "-m", "smile_ray.tune", "--space", str(space), *common],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)

    def in_prefill() -> bool:
        try:
            return "svd_prefill" not in json.loads((out / "sweep.json").read_text())
        except (OSError, ValueError):
            return False

    deadline = time.time() + 120
    while not in_prefill():
        assert driver.poll() is None and time.time() < deadline, "the sweep never reached its SVD prefill"
        time.sleep(0.02)
    os.killpg(driver.pid, signal.SIGKILL)
    driver.wait(timeout=30)
    assert not (out / "tune").exists() and not (out / "summary.json").exists()

    assert main(["--resume", *common]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary["trials"]) == 2 and all(t["status"] == "finished" for t in summary["trials"])
    assert "svd_prefill" in json.loads((out / "sweep.json").read_text())
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("tiny-sweep").experiment_id
    parents = [r for r in client.search_runs([experiment]) if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1 and len(children(client, experiment, parents[0].info.run_id)) == 2


@pytest.fixture
def small_disk(tmp_path):
    """A 64 MiB tmpfs: a file system that can fill up (needs the right to mount, as root in CI's container)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def test_a_sweep_stops_resumable_before_its_output_disk_is_full(ray_session, tiny_cache, small_disk, tmp_path):
    """--output's disk fills up mid-sweep: the sweep stops while its writes still succeed (free space under
    --min-free-mib), with one line saying so; nothing it wrote is corrupt; once space is freed, --resume completes
    it, with one MLflow child per trial in the sqlite store on that disk."""
    space = write_space(tmp_path / "space.yaml", tiny_cache, {"name": "smile", "gate_k": [1, 2], "k": [2, 4, -1]},
                        search={"max_concurrent": 1})
    out = small_disk / "out"
    common = ["--output", str(out), "--address", ray_session.get_runtime_context().gcs_address,
              "--min-free-mib", "16"]
    driver = subprocess.Popen([sys.executable, "-m", "smile_ray.tune", "--space", str(space), *common],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while len(list((out / "reports").glob("*.json"))) < 2:
        assert driver.poll() is None and time.time() < deadline, driver.stderr.read()[-2000:]
        time.sleep(0.2)
    stats = os.statvfs(small_disk)
    filler = small_disk / "filler"
    filler.write_bytes(b"\0" * (stats.f_bavail * stats.f_frsize - (8 << 20)))     # 8 MiB left: under the 16 kept
    stderr = driver.communicate(timeout=300)[1]
    lines = stderr.strip().splitlines()
    assert driver.returncode == 1, stderr[-3000:]
    assert lines[-1].startswith(f"error: --output {out}: only ") and "--resume --output" in lines[-1]
    assert not (out / "summary.json").exists() and len(list((out / "reports").glob("*.json"))) < 6
    for path in [out / "sweep.json", *(out / "reports").glob("*.json")]:
        json.loads(path.read_text())                               # nothing half-written

    filler.unlink()
    assert main(["--resume", *common]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary["trials"]) == 6 and all(t["status"] == "finished" for t in summary["trials"])
    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("tiny-sweep").experiment_id
    parents = [r for r in client.search_runs([experiment]) if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1 and len(children(client, experiment, parents[0].info.run_id)) == 6


def test_a_sweep_does_not_start_without_its_free_space_reserve(tiny_cache, tmp_path, capsys):
    space = write_space(tmp_path / "space.yaml", tiny_cache, {"name": "smile", "gate_k": 2, "k": 4})
    assert main(["--space", str(space), "--output", str(tmp_path / "out"), "--min-free-mib", "1e12"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: --output {tmp_path / 'out'}: only ") and "--min-free-mib" in err and "\n" not in err
    assert not (tmp_path / "out").exists()


def keep_writing(directory: str, name: str, stop_file: str) -> None:
    """A stand-in for a prefill task: writes files into `directory` until `stop_file` exists."""
    for i in range(100_000):
        if Path(stop_file).exists():
            return
        Path(directory, f"{name}-{i}").write_bytes(b"x")
        time.sleep(0.005)


def test_a_refusal_stops_the_prefill_tasks_before_output_is_removed(ray_session, tmp_path):
    """When one prefill task refuses a model (or the task pool is unreadable) the others are still writing the SVD
    cache inside --output; the driver asks them to stop (a stop file: a ray.cancel crossing a task's completion
    ended the driver in CI) and waits until they have before it removes --output (CI once saw "Directory not empty:
    'svd_cache'"). Of four tasks on two CPUs, two run and two stop before they write anything."""
    import ray

    from smile_ray.errors import SmileError
    from smile_ray.sweep.driver import TASK_STOP_WAIT_S, stopped_on_error

    cache = tmp_path / "svd_cache"
    cache.mkdir()
    writer = ray.remote(keep_writing).options(num_cpus=1)
    stop_file = cache / ".stop-prefill-test"
    tasks = [writer.remote(str(cache), f"task{i}", str(stop_file)) for i in range(4)]
    while len({p.name.split("-")[0] for p in cache.iterdir()}) < 2:
        time.sleep(0.01)
    started = time.monotonic()
    with pytest.raises(SmileError, match="NaN"), stopped_on_error(tasks, stop_file):
        raise SmileError("expert 'bad': NaN in model.norm.weight")
    assert not ray.wait(tasks, num_returns=4, timeout=0)[1]          # every task has stopped
    assert ray.get(tasks) == [None] * 4                               # by itself: none was killed
    assert time.monotonic() - started < TASK_STOP_WAIT_S and not stop_file.exists()
    written = set(cache.iterdir())
    time.sleep(0.2)
    assert set(cache.iterdir()) == written                            # and nothing writes any more
    assert len({p.name.split("-")[0] for p in written}) == 2          # the queued two never started
    shutil.rmtree(cache)
