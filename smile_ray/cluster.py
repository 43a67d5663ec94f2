"""The Ray cluster a sweep runs on: a local one the driver starts (on loopback only), or an existing one
(`--address`); whether it can ever run a trial; how to reach its dashboard.

A local Ray binds every socket to 127.0.0.1: Ray chooses the addresses it listens on from the node's IP, which
is the machine's network address unless `RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0` (read when ray is imported; Ray
ignores `ray.init(_node_ip_address=…)` for a new local cluster). Exposing Ray to a network is a cluster's
explicit choice (`ray start --head`, cluster/README.md).
"""
from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Collection, Iterator, Mapping
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from smile_ray.errors import SmileError

LOOPBACK_ONLY = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"      # "0": a local Ray's node IP is 127.0.0.1
AUTH_MODE = "RAY_AUTH_MODE"
DEFAULT_RESOURCE_WAIT_S = 300.0


def keep_local_ray_on_loopback() -> None:
    """Make a Ray started by this process listen on 127.0.0.1 only (its child processes inherit the setting)."""
    os.environ[LOOPBACK_ONLY] = "0"
    if "ray" in sys.modules:                 # read at import: a caller that imported ray first needs it set there too
        from ray._private import ray_constants

        ray_constants.ENABLE_RAY_CLUSTER = False


@contextmanager
def ray_cluster(address: str | None) -> Iterator[str | None]:
    """Connected to the cluster at `address`, or to a local Ray started on loopback (with Ray's default token
    authentication, which Ray then switches on in this process's environment); yields the dashboard line to print
    (None when this process was connected already, by a caller's own `ray.init`). A local Ray started here is shut
    down on the way out, with every process it started (`stop_local_ray`)."""
    import psutil
    import ray

    if ray.is_initialized():
        yield None
        return
    before: set[int] = set()
    if address is None:
        keep_local_ray_on_loopback()
        before = {process.pid for process in psutil.Process().children(recursive=True)}
    logs = [logging.getLogger(name) for name in ("ray._private.authentication.authentication_token_setup",
                                                 "ray._private.worker")]
    for log in logs:
        log.addFilter(said_by_the_dashboard_line)
    try:
        context = ray.init(address=address, dashboard_host="127.0.0.1",
                           runtime_env={"env_vars": {"RAY_AIR_NEW_OUTPUT": "0"}})
    finally:
        for log in logs:
            log.removeFilter(said_by_the_dashboard_line)
    try:
        yield dashboard_line(context.dashboard_url)
    finally:
        if address is None:
            stop_local_ray(keep=before)
        else:
            ray.shutdown()


def stop_local_ray(keep: Collection[int] = (), grace_s: float = 5.0) -> None:
    """`ray.shutdown()` of a Ray this process started, then the end of every process it started since (its
    children but those in `keep`, the ones it had before Ray started) that is still alive `grace_s` later: the
    dashboard's module subprocesses have outlived a driver by minutes. A caller's own children are left alone."""
    import psutil
    import ray

    started = [process for process in psutil.Process().children(recursive=True) if process.pid not in keep]
    ray.shutdown()
    _, alive = psutil.wait_procs(started, timeout=grace_s)
    for process in alive:
        with suppress(psutil.Error):
            process.terminate()
    _, alive = psutil.wait_procs(alive, timeout=grace_s)
    for process in alive:
        with suppress(psutil.Error):
            process.kill()


def said_by_the_dashboard_line(record: logging.LogRecord) -> bool:
    """Ray's log filter: leave out its "Token authentication is enabled …" warning and its "Started a local Ray
    instance. View the dashboard at …" line, printed on every start of a local Ray; `dashboard_line` says where the
    dashboard is and how to get in instead."""
    return not record.getMessage().startswith(("Token authentication is enabled", "Started a local Ray instance",
                                               "Connected to Ray cluster"))


def ray_command() -> str:
    """The `ray` command of this Python's environment (a venv's bin/ need not be on PATH)."""
    beside = Path(sys.executable).parent / "ray"
    return str(beside) if beside.is_file() else "ray"


def dashboard_line(url: str | None) -> str:
    """Where the Ray dashboard is and how to get in (with token authentication it asks for the cluster's token)."""
    if not url:
        return "Ray dashboard: not running (it needs ray[default])"
    url = url if url.startswith("http") else f"http://{url}"
    if os.environ.get(AUTH_MODE, "").lower() != "token":
        return f"Ray dashboard: {url}"
    return (f"Ray dashboard: {url} (it asks for this cluster's token: `{ray_command()} get-auth-token` prints it; "
            f"the ray CLI and `ray job submit` read it themselves)")


def _fits(resources: Mapping[str, float], need: Mapping[str, float]) -> bool:
    return all(resources.get(key, 0) >= value for key, value in need.items() if value)


def autoscaler_node_types() -> list[dict[str, float]]:
    """Resources of each node type an autoscaler may still launch (from the cluster config it reports to the GCS);
    [] for a cluster without one, or where it cannot be read."""
    try:
        from ray._private.state import state

        config = state.get_cluster_config()
    except Exception:  # noqa: BLE001 - a private API: no answer means "no autoscaler we can read"
        return []
    if config is None:
        return []
    return [dict(group.resources) for group in config.node_group_configs if group.max_count != 0]


def _amount(value: float, unit: str) -> str:
    return f"{value:g} {unit}{'s' * (value != 1)}"


def usable_cpus() -> int:
    """The CPUs this process may run on: its affinity where the OS keeps one (Linux, a container's cpuset), else
    every CPU of the machine (macOS has no affinity call)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def check_trial_resources(resources: Mapping[str, float], *, wait_s: float = 0.0) -> None:
    """A node of the cluster (or a node type its autoscaler can launch) has what one trial asks for; else a
    SmileError naming `resources.gpu` or `resources.cpu`, before any trial is scheduled (Tune would keep it
    PENDING forever). With `wait_s` > 0 (an existing cluster whose nodes may still be joining, or an autoscaler
    whose config cannot be read) it asks the autoscaler for such a node and waits that long for one to join."""
    import ray

    need = {"CPU": float(resources["cpu"]), "GPU": float(resources["gpu"])}
    deadline, asked = time.monotonic() + wait_s, False
    try:
        while True:
            types = autoscaler_node_types()
            nodes = [node["Resources"] for node in ray.nodes() if node.get("Alive")] + types
            if any(_fits(node, need) for node in nodes):
                return
            if time.monotonic() >= deadline:
                break
            if not asked:
                from ray.autoscaler.sdk import request_resources

                print(f"waiting up to {wait_s:g} s for a node with {_amount(need['CPU'], 'CPU')} and "
                      f"{_amount(need['GPU'], 'GPU')} to join the cluster…", flush=True)
                request_resources(bundles=[{k: v for k, v in need.items() if v}])
                asked = True
            time.sleep(2.0)
    finally:
        if asked:
            from ray.autoscaler.sdk import request_resources

            request_resources(bundles=[])                # the trials' own demand takes over
    largest = {key: max((node.get(key, 0) for node in nodes), default=0) for key in need}
    nodes_say = (f"its largest node{' or node type' if types else ''} has {_amount(largest['CPU'], 'CPU')} and "
                 f"{_amount(largest['GPU'], 'GPU')}"
                 + (f", after waiting {wait_s:g} s" if wait_s else ""))
    if need["GPU"] and largest["GPU"] < need["GPU"]:
        hint = ("set resources.gpu=0 to run on CPUs, or run on a cluster with GPUs (--address)" if not largest["GPU"]
                else "ask for at most what one node has")
        raise SmileError(f"resources.gpu: a trial asks for {_amount(need['GPU'], 'GPU')}, but no node of this Ray "
                         f"cluster has {'one' if not largest['GPU'] else 'that many'} ({nodes_say}); {hint}")
    raise SmileError(f"resources.cpu: a trial asks for {_amount(need['CPU'], 'CPU')}"
                     f"{' and ' + _amount(need['GPU'], 'GPU') if need['GPU'] else ''}, but no node of this Ray "
                     f"cluster has that ({nodes_say}); lower resources.cpu")


def describe_resources(resources: Mapping[str, Any]) -> str:
    """"1 CPU, 0.25 GPU per trial"."""
    return f"{_amount(resources['cpu'], 'CPU')}, {_amount(resources['gpu'], 'GPU')} per trial"
