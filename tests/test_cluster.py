"""The cluster a sweep runs on: a trial that no node can ever hold is refused up front (a local Ray at once, an
existing cluster after a bounded wait), node types an autoscaler can launch count, and the dashboard line says how
to get in."""
import time

import pytest

from smile_ray import cluster
from smile_ray.errors import SmileError


def test_a_trial_that_fits_a_node_passes(ray_session):
    cluster.check_trial_resources({"cpu": 2, "gpu": 0})


def test_a_gpu_trial_on_a_cluster_without_gpus_is_refused_naming_the_field(ray_session):
    with pytest.raises(SmileError, match=r"^resources.gpu: a trial asks for 0.25 GPUs, but no node .* has one"):
        cluster.check_trial_resources({"cpu": 1, "gpu": 0.25})


def test_an_existing_cluster_is_given_time_for_nodes_to_join(ray_session):
    start = time.monotonic()
    with pytest.raises(SmileError, match=r"after waiting 3 s\); set resources.gpu=0"):
        cluster.check_trial_resources({"cpu": 1, "gpu": 1}, wait_s=3)
    assert time.monotonic() - start >= 3


def test_a_node_type_the_autoscaler_can_launch_counts(ray_session, monkeypatch):
    monkeypatch.setattr(cluster, "autoscaler_node_types", lambda: [{"CPU": 8.0, "GPU": 1.0}])
    cluster.check_trial_resources({"cpu": 4, "gpu": 1})
    with pytest.raises(SmileError, match="resources.gpu: a trial asks for 2 GPUs, but no node .* has that many"):
        cluster.check_trial_resources({"cpu": 4, "gpu": 2})


def test_the_dashboard_line_says_how_to_get_in(monkeypatch):
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    line = cluster.dashboard_line("127.0.0.1:8265")
    assert line.startswith("Ray dashboard: http://127.0.0.1:8265 (it asks for this cluster's token: ")
    assert "get-auth-token` prints it" in line
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    assert cluster.dashboard_line("127.0.0.1:8265") == "Ray dashboard: http://127.0.0.1:8265"
