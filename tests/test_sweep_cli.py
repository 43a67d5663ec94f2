"""`python -m smile_ray.tune` as a user runs it: a fresh shell (no RAY_AUTH_MODE, a new home), a local Ray started
by the driver. What it prints, what it listens on, what it leaves behind, and whether the commands it prints work."""
import os
import re
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import requests
import yaml

LOOPBACK = ("127.0.0.1", "::1", "::ffff:127.0.0.1")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def listening(processes: list[psutil.Process]) -> set[tuple[str, int, str]]:
    """(address, port, process name) of every socket these processes listen on: one read of the system's socket
    table (asking each process for its own read the whole table once per process: 0.26 s a pass, against 0.03 s,
    a third of a core taken from the sweep being watched)."""
    names = {}
    for process in processes:
        try:
            names[process.pid] = process.name()
        except psutil.Error:
            continue
    return {(conn.laddr.ip, conn.laddr.port, names[conn.pid]) for conn in psutil.net_connections(kind="inet")
            if conn.status == psutil.CONN_LISTEN and conn.pid in names}


@pytest.fixture(scope="module")
def user_sweep(tiny_cache, tmp_path_factory):
    """One local sweep run from the command line, watched while it runs."""
    tmp = tmp_path_factory.mktemp("cli")
    space = {"name": "cli", "model_pool": {"kind": "embedded", "scale": "tiny", "cache_dir": str(tiny_cache)},
             "task_pool": {"kind": "embedded", "max_samples": 20, "tasks": ["digit", "word", "parity"]},
             "method": [{"name": "individual", "model": "pretrained"}, {"name": "smile", "gate_k": 2, "k": [4, -1]}],
             "search": {"max_concurrent": 2}, "tracking": {"experiment": "cli-sweep"}}
    (tmp / "space.yaml").write_text(yaml.safe_dump(space))
    env = {key: value for key, value in os.environ.items() if key not in ("RAY_AUTH_MODE", "RAY_ADDRESS",
                                                                           "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")}
    env["HOME"] = str(tmp / "home")                  # a fresh machine: Ray creates the cluster's token there
    log = tmp / "driver.log"
    with log.open("w") as out:
        driver = subprocess.Popen([sys.executable, "-m", "smile_ray.tune", "--space", str(tmp / "space.yaml"),
                                   "--output", str(tmp / "out")], stdout=out, stderr=subprocess.STDOUT, env=env,
                                  cwd=tmp, start_new_session=True)
    started, sockets, dashboard = set(), set(), {}
    deadline = time.time() + 300
    while driver.poll() is None and time.time() < deadline:
        try:
            family = psutil.Process(driver.pid).children(recursive=True)
        except psutil.Error:
            family = []
        started |= {p.pid for p in family}
        sockets |= listening([psutil.Process(driver.pid), *family] if family else [])
        url = re.search(r"Ray dashboard: (http://\S+)", log.read_text())
        if url and not dashboard:
            token = (tmp / "home" / ".ray" / "auth_token").read_text().strip()
            jobs = f"{url.group(1)}/api/jobs/"
            dashboard = {"url": url.group(1), "without token": requests.get(jobs, timeout=10).status_code,
                         "with token": requests.get(jobs, headers={"Authorization": f"Bearer {token}"},
                                                    timeout=10).status_code}
        time.sleep(0.5)
    code = driver.wait(timeout=60)
    return {"code": code, "output": log.read_text(), "sockets": sockets, "started": started,
            "dashboard": dashboard, "tmp": tmp, "env": env}


def test_a_local_sweep_listens_on_loopback_only(user_sweep):
    assert user_sweep["code"] == 0, user_sweep["output"][-3000:]
    assert user_sweep["sockets"], "no listening socket was seen"
    exposed = sorted(s for s in user_sweep["sockets"] if s[0] not in LOOPBACK)
    assert not exposed, exposed


def test_the_dashboard_is_printed_with_how_to_get_in(user_sweep):
    output, dashboard = user_sweep["output"], user_sweep["dashboard"]
    assert dashboard["url"].startswith("http://127.0.0.1:")
    assert dashboard["without token"] == 401 and dashboard["with token"] == 200
    assert "get-auth-token` prints it" in output
    assert "Token authentication is enabled" not in output        # Ray's warning, on every run, is left out


def test_the_output_says_what_is_final_and_where_the_results_are(user_sweep):
    output = user_sweep["output"]
    assert "Result logdir" not in output and "/tmp/ray" not in output
    assert f"Results: {user_sweep['tmp'] / 'out'}" in output
    assert not re.search(r"\d\.\d+e\+0\d", output)                       # parameter counts are integers
    summary = yaml.safe_load((user_sweep["tmp"] / "out" / "summary.json").read_text())
    final = {t["trial_id"]: t["metrics"]["average/accuracy"] for t in summary["trials"]}
    best = re.findall(r"Current best trial: (\S+) with average/accuracy=(\S+)", output)
    assert best and all(float(value) == final[trial] for trial, value in best)   # finished trials' final scores only


def test_no_process_of_the_local_ray_outlives_the_driver(user_sweep):
    assert user_sweep["started"]
    _, alive = psutil.wait_procs([psutil.Process(pid) for pid in user_sweep["started"] if psutil.pid_exists(pid)],
                                 timeout=10)
    assert not alive, [p.cmdline()[:3] for p in alive]


def test_stopping_the_local_ray_leaves_the_callers_own_processes_alone():
    """`python -m smile_ray.tune` ends every process its local Ray started; called from a user's Python, it must not
    end the processes the caller had started before (its own servers, a notebook's children)."""
    script = """
import subprocess, psutil
from smile_ray.cluster import stop_local_ray
mine = subprocess.Popen(["sleep", "120"])
before = {p.pid for p in psutil.Process().children(recursive=True)}
started = subprocess.Popen(["sleep", "120"])                   # as if the local Ray had started it
stop_local_ray(keep=before, grace_s=1)
print(mine.poll() is None, started.wait(timeout=30) is not None)
mine.kill()
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.stdout.split() == ["True", "True"], done.stdout + done.stderr


def test_the_printed_mlflow_command_works_as_printed(user_sweep):
    line = next(line for line in user_sweep["output"].splitlines() if line.startswith("MLflow: "))
    command = shlex.split(line.removeprefix("MLflow: ").split("  (")[0])
    assert Path(command[0]).is_absolute() and command[1] == "ui"     # this environment's mlflow, on PATH or not
    port = free_port()
    command[command.index("--port") + 1] = str(port)
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=user_sweep["env"],
                              start_new_session=True)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 180                        # a loaded CI machine starts it slowly
        while time.monotonic() < deadline:
            try:
                if requests.get(f"{base}/health", timeout=10).ok:
                    break
            except requests.RequestException:                     # not listening yet, or too busy to answer
                time.sleep(0.5)
        experiment = requests.get(f"{base}/ajax-api/2.0/mlflow/experiments/get-by-name",
                                  params={"experiment_name": "cli-sweep"}, timeout=10).json()["experiment"]
        runs = requests.post(f"{base}/ajax-api/2.0/mlflow/runs/search", timeout=10,
                             json={"experiment_ids": [experiment["experiment_id"]]}).json()["runs"]
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)
    assert {"key": "mlflow.experimentKind", "value": "custom_model_development"} in experiment["tags"]
    assert sorted(r["info"]["run_name"] for r in runs) == ["individual pretrained", "smile gk2 dense", "smile gk2 k4",
                                                           "sweep cli"]
