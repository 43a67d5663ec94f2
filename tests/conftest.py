"""Shared fixtures: the embedded benchmark at its tiny scale, built once per test session."""
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")   # read when ray is imported: keeps Ray on 127.0.0.1
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory):
    """A cache directory holding the tiny embedded benchmark."""
    from smile_ray.embedded import build_embedded

    cache = tmp_path_factory.mktemp("embedded")
    build_embedded(cache, scale="tiny")
    return cache


@pytest.fixture(scope="session")
def tiny_bench(tiny_cache):
    from smile_ray.embedded import build_embedded

    return build_embedded(tiny_cache, scale="tiny")


@pytest.fixture(scope="session")
def tiny_text_bench(tiny_cache):
    """The embedded text benchmark at its tiny scale (a T5 of 1 + 1 layers; about 10 s to build), in the same cache."""
    from smile_ray.embedded.text_build import build_text_benchmark

    return build_text_benchmark(tiny_cache, scale="tiny")


@pytest.fixture
def tiny_config(tiny_cache):
    """A run configuration on the tiny embedded benchmark."""
    return {"model_pool": {"kind": "embedded", "scale": "tiny", "cache_dir": str(tiny_cache)},
            "task_pool": {"kind": "embedded", "max_samples": 20},
            "method": {"name": "smile", "gate_k": 4, "k": 8}}


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray instance for the whole test session: 2 CPUs, no dashboard, on loopback."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False)
    yield ray
    ray.shutdown()


def pytest_runtest_logstart(nodeid, location):
    """CI's post-mortem names the test that was running when a pytest process ended without its summary."""
    if os.environ.get("SMILE_RAY_TESTS_STARTED"):
        with open(os.environ["SMILE_RAY_TESTS_STARTED"], "a") as log:
            log.write(f"{nodeid}\n")
