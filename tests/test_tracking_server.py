"""A sweep's MLflow records when the tracking server is a real `mlflow server` that goes away and comes back: the
callback holds what the server could not take on disk and delivers it, in order and once (smile_ray.outbox)."""
import json
import os
import shutil
import subprocess
import sys
import threading
import time

import pytest
import yaml
from mlflow import MlflowClient

from smile_ray import outbox, sync, tune
from smile_ray.outbox import TrackingWriter
from smile_ray.sweep.record import HELD_EXIT, OUTBOX_DIR
from smile_ray.tune import MLFLOW_HTTP_DEFAULTS
from tests.mlflow_server import MlflowServer
from tests.test_tracking import FakeTrial, artifacts, fail_fake, fake_results, make_callback, run_fake, runs, smile


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    server = MlflowServer(tmp_path_factory.mktemp("mlflow_server"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def running(server, monkeypatch):
    """The server, up at the start of the test and again at its end (a test may stop it); the driver's MLflow
    client settings of `python -m smile_ray.tune` (a few seconds of retries)."""
    for name, value in MLFLOW_HTTP_DEFAULTS.items():
        monkeypatch.setenv(name, value)
    yield server
    if server.process is None:
        server.start()


def history(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def test_writes_made_while_the_server_is_away_are_delivered_once_when_it_answers(running, tmp_path, monkeypatch):
    monkeypatch.setattr(outbox, "RETRY_SECONDS", 0.0)
    held = tmp_path / "outbox"
    cb = make_callback(running.uri, "server-away", outbox=held, sweep_id="away")
    cb.setup(total_num_samples=3)
    online, offline, failing = (FakeTrial("t1", smile(2, 4)), FakeTrial("t2", smile(4, 8)),
                                FakeTrial("t3", smile(8, -1)))
    run_fake(cb, online)
    running.stop()
    run_fake(cb, offline)                          # created, logged and completed while the server is away
    fail_fake(cb, failing, tmp_path)
    cb.on_step_end(iteration=0, trials=[])         # the server does not answer: nothing raises, the records wait
    assert cb.writer.held > 0 and (held / outbox.JOURNAL).is_file()
    assert cb.run_ids["t2"].startswith(outbox.PLACEHOLDER)
    running.start()
    cb.on_step_end(iteration=0, trials=[])
    assert cb.writer.held == 0 and not (held / outbox.JOURNAL).exists()
    cb.on_experiment_end(trials=[online, offline, failing])

    client = MlflowClient(running.uri)
    parents, children = runs(client, cb.experiment_id)
    assert len(parents) == 1 and sorted(c.data.tags["trial_id"] for c in children) == ["t1", "t2", "t3"]
    by_trial = {c.data.tags["trial_id"]: c for c in children}
    assert cb.sweep.run_ids == {t: c.info.run_id for t, c in by_trial.items()}     # placeholders resolved
    for trial in (online, offline):
        run = by_trial[trial.trial_id]
        assert run.info.status == "FINISHED"
        expected = sorted((r["training_iteration"], r["a/accuracy"]) for r in fake_results(trial.config, trial.trial_id)
                          if "a/accuracy" in r)
        assert history(client, run.info.run_id, "a/accuracy") == expected          # every result, once
        assert {"config.yaml", "report.json", "per_task.json"} <= artifacts(client, run.info.run_id)
        table = json.loads((client.download_artifacts(run.info.run_id, "per_task.json", str(tmp_path / trial.trial_id))
                            and (tmp_path / trial.trial_id / "per_task.json").read_text()))
        assert len(table["data"]) == 2                                              # tasks a and b, once
    assert by_trial["t3"].info.status == "FAILED" and "out of memory" in by_trial["t3"].data.tags["smile_ray.error"]
    assert parents[0].info.status == "FINISHED" and parents[0].data.tags["best.run_id"] in cb.sweep.run_ids.values()


def test_a_delivery_cut_short_and_done_again_creates_no_second_run(running, tmp_path, monkeypatch):
    """A crash between the server taking records and the delivered count being written replays them: the child
    run is found again, metrics and tables are not doubled."""
    monkeypatch.setattr(outbox, "RETRY_SECONDS", 0.0)
    held = tmp_path / "outbox"
    cb = make_callback(running.uri, "server-replay", outbox=held, sweep_id="replay")
    cb.setup(total_num_samples=1)
    running.stop()
    trial = FakeTrial("r1", smile(2, 4))
    run_fake(cb, trial)
    copy = tmp_path / "copy"
    shutil.copytree(held, copy)
    running.start()
    assert cb.writer.deliver()
    shutil.rmtree(held)
    shutil.copytree(copy, held)                    # as if none of the deliveries had been counted
    assert TrackingWriter(running.uri, held).deliver()

    client = MlflowClient(running.uri)
    _, children = runs(client, cb.experiment_id)
    assert len(children) == 1
    run_id = children[0].info.run_id
    assert len(history(client, run_id, "average/accuracy")) == 2          # one per result
    client.download_artifacts(run_id, "per_task.json", str(tmp_path))
    assert len(json.loads((tmp_path / "per_task.json").read_text())["data"]) == 2


def test_a_write_the_server_refuses_while_it_answers_is_an_error_not_held(running, tmp_path):
    writer = TrackingWriter(running.uri, tmp_path / "outbox")
    with pytest.raises(Exception):
        writer.set_terminated("0" * 32, "FINISHED")              # no such run
    assert writer.held == 0


def test_credentials_in_a_tracking_uri_move_to_mlflows_environment_variables_meanwhile(monkeypatch):
    from smile_ray.hub import credentials_in_environment

    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "someone")
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD", raising=False)
    with credentials_in_environment("https://smile:s%40cret@mlflow.example:5000/path") as uri:
        assert uri == "https://mlflow.example:5000/path"
        assert (os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"]) == ("smile", "s@cret")
    assert os.environ["MLFLOW_TRACKING_USERNAME"] == "someone" and "MLFLOW_TRACKING_PASSWORD" not in os.environ
    with credentials_in_environment("sqlite:///runs/mlflow.db") as uri:
        assert uri == "sqlite:///runs/mlflow.db" and os.environ["MLFLOW_TRACKING_USERNAME"] == "someone"


def test_a_local_store_is_never_held(tmp_path):
    writer = TrackingWriter(f"sqlite:///{tmp_path}/mlflow.db", tmp_path / "outbox")
    assert writer.directory is None


# -- a real sweep: its server goes away and comes back, then goes away for good ----------------------------------------

def children_by_trial(client: MlflowClient, experiment: str) -> tuple[list, dict]:
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return [], {}
    parents, children = runs(client, found.experiment_id)
    return parents, {c.data.tags["trial_id"]: c for c in children}


def wait_until(condition, timeout: float = 240.0) -> bool:
    deadline = time.time() + timeout
    while not condition():
        if time.time() > deadline:
            return False
        time.sleep(0.3)
    return True


def sweep_space(path, cache, **method) -> str:
    space = {"name": "away", "model_pool": {"kind": "embedded", "scale": "tiny", "cache_dir": str(cache)},
             "task_pool": {"kind": "embedded", "max_samples": 100, "tasks": ["digit", "word", "parity"]},
             "method": {"name": "smile", **method}, "search": {"max_concurrent": 1}}
    path.write_text(yaml.safe_dump(space))
    return str(path)


def sweep(space: str, output, server, experiment: str, ray_session, uri: str | None = None) -> int:
    return tune.main(["--space", space, "--output", str(output), "--tracking-uri", uri or server.uri, "--experiment",
                      experiment, "--address", ray_session.get_runtime_context().gcs_address])


def check_mlflow(client: MlflowClient, experiment: str, summary: dict) -> None:
    """Every trial once in MLflow, with its metrics (one per result, none twice) and artifacts; the parent's plots
    and best trial; summary.json's run ids are MLflow's."""
    parents, children = children_by_trial(client, experiment)
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert sorted(children) == sorted(t["trial_id"] for t in summary["trials"])
    assert {t["trial_id"]: t["mlflow_run_id"] for t in summary["trials"]} == {
        trial: run.info.run_id for trial, run in children.items()}
    assert parents[0].data.tags["best.run_id"] == children[summary["best"]["trial_id"]].info.run_id
    for trial, run in children.items():
        assert run.info.status == "FINISHED", trial
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "average/accuracy")]
        assert sorted(steps) == [1, 2, 3, 4], (trial, steps)     # one per task and the final report, none twice
        assert {"config.yaml", "report.json", "per_task.json", "routing.json", "routing.png"} <= artifacts(
            client, run.info.run_id), trial
    assert "plots" in artifacts(client, parents[0].info.run_id)


def test_a_sweep_goes_on_while_its_tracking_server_is_away_and_delivers_when_it_is_back(
        server, tiny_cache, tmp_path, ray_session, capsys, monkeypatch):
    """The server stops mid-sweep and answers again ~20 s later: the trials go on, what the callback could not send
    is delivered while the sweep still runs, and MLflow ends up with every trial once."""
    for name, value in MLFLOW_HTTP_DEFAULTS.items():
        monkeypatch.setenv(name, value)
    # 40 trials, one at a time (about a minute): long enough that the server is back and the held records delivered
    # with trials still to run, on a machine twice as fast as CI's (24 trials were not, once)
    space = sweep_space(tmp_path / "space.yaml", tiny_cache, gate_k=[1, 2, 3, 4], k=[1, 2, 4, 8, -1], top_k=[1, 2])
    output, client = tmp_path / "out", MlflowClient(server.uri)
    journal = output / OUTBOX_DIR / outbox.JOURNAL
    seen: dict[str, bool] = {}

    def outage() -> None:
        finished = lambda: any(c.info.status == "FINISHED" for c in children_by_trial(client, "back")[1].values())  # noqa: E731
        if not wait_until(finished):
            return
        server.stop()
        seen["held"] = wait_until(journal.is_file, 60)
        time.sleep(12)                                       # with the restart, about 20 s without a server
        server.start()
        seen["delivered"] = wait_until(lambda: not journal.exists(), 120)
        seen["trials left"] = len(list((output / "reports").glob("*.json"))) < 40

    watcher = threading.Thread(target=outage)
    watcher.start()
    code = sweep(space, output, server, "back", ray_session)
    watcher.join()
    assert code == 0, capsys.readouterr().err[-2000:]
    assert seen == {"held": True, "delivered": True, "trials left": True}
    summary = json.loads((output / "summary.json").read_text())
    assert len(summary["trials"]) == 40 and summary["mlflow"]["held_records"] == 0
    check_mlflow(client, "back", summary)


def test_a_sweep_whose_server_never_comes_back_ends_with_status_3_and_sync_delivers_later(
        server, tiny_cache, tmp_path, ray_session, capsys, caplog, monkeypatch):
    """... and the credentials in its tracking URI are never printed, logged or written to sweep.json or
    summary.json (the server takes any: it has no authentication)."""
    for name, value in MLFLOW_HTTP_DEFAULTS.items():
        monkeypatch.setenv(name, value)
    space = sweep_space(tmp_path / "space.yaml", tiny_cache, gate_k=[1, 2], k=[4, -1])
    output, client = tmp_path / "out", MlflowClient(server.uri)
    watcher = threading.Thread(target=lambda: wait_until(lambda: children_by_trial(client, "gone")[1]) and server.stop())
    watcher.start()
    try:
        code = sweep(space, output, server, "gone", ray_session, server.uri.replace("://", "://smile:s3cret@"))
        watcher.join()
        said = capsys.readouterr()
        lines = said.err.strip().splitlines()
        assert "s3cret" not in said.out + said.err + caplog.text, said.err[-2000:]
        assert (output / "sweep.json").exists(), said.err[-2000:]
        assert not [p for p in output.rglob("*") if p.is_file() and b"s3cret" in p.read_bytes()]  # Tune's state too
        assert code == HELD_EXIT
        assert lines[-1].startswith("error: the MLflow tracking server") and "smile_ray.sync --output" in lines[-1]
        assert lines[-1].endswith("--tracking-uri <the tracking URI with its credentials>")     # a fresh shell needs them
        summary = json.loads((output / "summary.json").read_text())
        assert len(summary["trials"]) == 4 and all(t["status"] == "finished" for t in summary["trials"])
        assert summary["mlflow"]["held_records"] > 0 and summary["best"] is not None

        assert sync.main(["--output", str(output)]) == HELD_EXIT                 # still away
        assert capsys.readouterr().err.count("\n") == 1
    finally:
        server.start()
    assert sync.main(["--output", str(output)]) == 0
    summary = json.loads((output / "summary.json").read_text())
    assert summary["mlflow"]["held_records"] == 0 and not (output / OUTBOX_DIR / outbox.JOURNAL).exists()
    check_mlflow(client, "gone", summary)


def test_two_sweeps_at_once_share_a_server_and_an_svd_cache(server, tiny_cache, tmp_path, ray_session):
    """Two people sweep the same models at the same time into one tracking server and one SVD cache: both finish,
    each parent run holds its own trials only, and every SVD is computed once across both."""
    cache = tmp_path / "shared_svd_cache"
    drivers = {}
    for name, top_k in (("first", 1), ("second", 2)):         # the same SVDs (top_k needs none of its own)
        space = sweep_space(tmp_path / f"{name}.yaml", tiny_cache, gate_k=2, k=-1, top_k=top_k)
        command = [sys.executable, "-m", "smile_ray.tune", "--space", space, "--output", str(tmp_path / name),
                   "--tracking-uri", server.uri, "--experiment", "shared", "--svd-cache", str(cache),
                   "--address", ray_session.get_runtime_context().gcs_address]
        drivers[name] = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    errors = {name: driver.communicate(timeout=600)[1] for name, driver in drivers.items()}
    for name, driver in drivers.items():
        assert driver.returncode == 0, errors[name][-3000:]
        assert "Traceback" not in errors[name] and "locked" not in errors[name], errors[name][-3000:]

    client = MlflowClient(server.uri)
    experiment = client.get_experiment_by_name("shared").experiment_id
    parents, children = runs(client, experiment)
    assert len(parents) == 2
    for name in drivers:
        summary = json.loads((tmp_path / name / "summary.json").read_text())
        mine = {c.data.tags["trial_id"] for c in children
                if c.data.tags["mlflow.parentRunId"] == summary["mlflow"]["parent_run_id"]}
        assert mine == {t["trial_id"] for t in summary["trials"]} and len(mine) == 1
    computed = sum(task["svd_computed"] for name in drivers
                   for task in json.loads((tmp_path / name / "sweep.json").read_text())["svd_prefill"])
    entries = list(cache.glob("*/*.safetensors"))
    assert computed == len(entries) > 0                        # each SVD once, whichever sweep came first


def test_a_journal_line_cut_by_a_crash_is_skipped_and_later_records_kept(tmp_path):
    writer = TrackingWriter("http://127.0.0.1:9", tmp_path)           # port 9: nothing answers
    writer._hold({"op": "set_terminated", "run_id": "a", "status": "FINISHED"})
    with open(tmp_path / outbox.JOURNAL, "a") as journal:
        journal.write('{"op": "log_ba')                                # the driver died mid-append
    writer._hold({"op": "update_run", "run_id": "b", "status": "RUNNING"})
    assert [record["op"] for record in writer._records()] == ["set_terminated", "update_run"]
    assert not writer.deliver() and writer.held == 2
