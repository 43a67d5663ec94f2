"""A real two-node Ray cluster on 127.0.0.1 (`ray start --head` + a second `ray start`, logical GPUs) runs a
small sweep whose trials land on both nodes."""
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
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


@pytest.fixture
def two_node_cluster():
    temp_dir = tempfile.mkdtemp(prefix="rt", dir="/tmp")     # short: Ray's socket paths must stay < 108 bytes
    port = free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    env.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)   # its "0" (loopback for one node) refuses a second node
    common = ["--node-ip-address=127.0.0.1", "--num-cpus=1", "--num-gpus=1", "--disable-usage-stats"]
    try:
        subprocess.run([RAY, "start", "--head", f"--port={port}", f"--temp-dir={temp_dir}",
                        "--include-dashboard=false", *common], env=env, check=True, capture_output=True, timeout=120)
        subprocess.run([RAY, "start", f"--address=127.0.0.1:{port}", *common], env=env, check=True,
                       capture_output=True, timeout=120)
        yield f"127.0.0.1:{port}", env
    finally:
        stop_cluster(temp_dir)


def test_sweep_uses_both_nodes(two_node_cluster, tiny_cache, tmp_path):
    address, env = two_node_cluster
    space = {"name": "two-nodes",
             "model_pool": {"kind": "embedded", "scale": "tiny", "cache_dir": str(tiny_cache)},
             "task_pool": {"kind": "embedded", "max_samples": 40, "tasks": ["digit", "parity"]},
             "method": {"name": "smile", "gate_k": [2, 4], "k": [4, 8]},
             "search": {"max_concurrent": 2},
             "resources": {"cpu": 1, "gpu": 0.5}}
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(space))
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "-m", "smile_ray.tune", "--space", str(tmp_path / "space.yaml"),
                           "--output", str(out), "--address", address,
                           "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary["trials"]) == 4 and all(t["status"] == "finished" for t in summary["trials"])
    nodes = {t["metrics"]["node_id"] for t in summary["trials"]}
    assert len(nodes) == 2                                   # one CPU per node: two concurrent trials use both
    assert {t["metrics"]["device"] for t in summary["trials"]} == {"cpu"}     # logical GPUs: torch falls back
    assert all(t["metrics"]["model_info/svd_calls"] == 0 for t in summary["trials"])
