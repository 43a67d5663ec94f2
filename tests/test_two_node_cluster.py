"""A real three-node Ray cluster on 127.0.0.1 (`ray start --head` + two more `ray start`, one CPU and a logical GPU
each) runs a small sweep whose trials land on several nodes, and loses a worker node under a running trial, which
Tune runs again on a surviving node."""
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest
import yaml

RAY = str(Path(sys.executable).parent / "ray")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_cluster(temp_dir: str) -> None:
    """Stop only this cluster's processes (`ray stop` would also stop the test session's own Ray)."""
    procs = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if any(temp_dir in part for part in proc.info["cmdline"] or []):
                procs.append(proc)
        except psutil.Error:
            continue
    for proc in procs:
        try:
            proc.send_signal(signal.SIGTERM)
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(procs, timeout=10)
    for proc in alive:
        try:
            proc.kill()
        except psutil.Error:
            pass


@pytest.fixture(scope="module")
def cluster():
    temp_dir = tempfile.mkdtemp(prefix="rt", dir="/tmp")     # short: Ray's socket paths must stay < 108 bytes
    port = free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    env.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)   # its "0" (loopback for one node) refuses a second node
    common = ["--node-ip-address=127.0.0.1", "--num-cpus=1", "--num-gpus=1", "--disable-usage-stats"]
    try:
        subprocess.run([RAY, "start", "--head", f"--port={port}", f"--temp-dir={temp_dir}",
                        "--include-dashboard=false", *common], env=env, check=True, capture_output=True, timeout=120)
        victim = free_port()                              # the node the last test kills, found by this port
        for node in ([], [f"--node-manager-port={victim}"]):
            subprocess.run([RAY, "start", f"--address=127.0.0.1:{port}", *common, *node], env=env, check=True,
                           capture_output=True, timeout=120)
        yield {"address": f"127.0.0.1:{port}", "env": env, "victim": victim}
    finally:
        stop_cluster(temp_dir)


def sweep(cluster, space: dict, tmp_path) -> subprocess.Popen:
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(space))
    return subprocess.Popen([sys.executable, "-m", "smile_ray.tune", "--space", str(tmp_path / "space.yaml"),
                             "--output", str(tmp_path / "out"), "--address", cluster["address"],
                             "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"],
                            env=cluster["env"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def trial_processes(raylet: psutil.Process) -> list[psutil.Process]:
    """The Ray workers under `raylet` running a Tune trial (its actor's process title names the trainable)."""
    found = []
    for proc in raylet.children(recursive=True):
        try:
            if "ImplicitFunc" in " ".join(proc.cmdline()):
                found.append(proc)
        except psutil.Error:
            continue
    return found


def test_trials_spread_over_nodes_and_one_on_a_lost_node_runs_again_on_another(cluster, tiny_cache, tmp_path):
    """Trials land on several nodes. Kill a worker node (its raylet and every process under it) while a trial runs
    there: Tune runs the trial again on a surviving node (search.max_failures), the sweep finishes, summary.json
    counts the failed attempt, and MLflow holds one child run per trial, the retried one reused (tagged
    smile_ray.recoveries) rather than doubled."""
    from mlflow import MlflowClient

    space = {"name": "node-loss",
             "model_pool": {"kind": "embedded", "scale": "tiny", "cache_dir": str(tiny_cache)},
             "task_pool": {"kind": "embedded", "max_samples": 100, "tasks": ["digit", "word", "parity"]},
             "method": {"name": "smile", "gate_k": [1, 2, 4], "k": [4, -1]},
             "search": {"max_concurrent": 3, "max_failures": 2},
             "resources": {"cpu": 1, "gpu": 0.5}}
    raylet = next(p for p in psutil.process_iter(["cmdline"])
                  if f"--node_manager_port={cluster['victim']}" in " ".join(p.info["cmdline"] or []))
    driver = sweep(cluster, space, tmp_path)
    deadline = time.time() + 300
    while not trial_processes(raylet):
        assert driver.poll() is None and time.time() < deadline, "no trial ran on the node to kill"
        time.sleep(0.2)
    for proc in [*raylet.children(recursive=True), raylet]:
        try:
            proc.kill()
        except psutil.Error:
            pass
    stderr = driver.communicate(timeout=600)[1]
    assert driver.returncode == 0, stderr[-3000:]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert len(summary["trials"]) == 6 and all(t["status"] == "finished" for t in summary["trials"])
    assert len({t["metrics"]["node_id"] for t in summary["trials"]}) >= 2     # one CPU per node
    assert {t["metrics"]["device"] for t in summary["trials"]} == {"cpu"}      # logical GPUs: torch falls back
    assert all(t["metrics"]["model_info/svd_calls"] == 0 for t in summary["trials"])    # the prefill computed them
    retried = [t for t in summary["trials"] if t["failed_attempts"]]
    assert len(retried) == 1 and retried[0]["failed_attempts"] == 1
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = {t["trial_id"]: client.get_run(t["mlflow_run_id"]) for t in summary["trials"]}
    experiment = next(iter(runs.values())).info.experiment_id
    children = [r for r in client.search_runs([experiment]) if "mlflow.parentRunId" in r.data.tags]
    assert len(children) == 6 and {r.info.run_id for r in children} == {r.info.run_id for r in runs.values()}
    assert runs[retried[0]["trial_id"]].data.tags["smile_ray.recoveries"] == "1"
    assert all(r.info.status == "FINISHED" for r in runs.values())
