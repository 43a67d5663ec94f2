"""What the sweep service buys over a serial loop, on the embedded benchmark (ratios from one run).

1. Sweep ratio: a 12-configuration SMILE sweep (`python -m smile_ray.tune`, fresh output: SVD cache filled
   once, trials in parallel) against the status quo it replaces, 12 single runs in a serial loop that each
   compute their own SVDs (`python -m smile_ray.run --no-svd-cache`). Target ≤ 1/3.
2. Ray + MLflow overhead per trial: the same 12 configurations through `run_sweep` with one trial at a time
   (Ray already started, SVD cache warm) against `run_trial` called 12 times in-process on the same pools.
   Target ≤ 2 s per trial.

    python bench/sweep_ratio.py [--workdir DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

GRID = {"gate_k": [4, 8, 16, 32], "k": [8, 32, -1]}
SPACE = {"name": "bench12", "model_pool": {"kind": "embedded"}, "task_pool": {"kind": "embedded"},
         "method": {"name": "smile", **GRID}, "search": {"max_concurrent": 2}, "resources": {"cpu": 1},
         "tracking": {"experiment": "smile-bench12"}}


def timed_command(command: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    return time.perf_counter() - start


def sweep_ratio(work: Path, env: dict[str, str]) -> None:
    space = work / "bench12.yaml"
    space.write_text(yaml.safe_dump(SPACE))
    singles, single_timings = 0.0, []
    for gate_k in GRID["gate_k"]:
        for k in GRID["k"]:
            report = work / f"single_{gate_k}_{k}.json"
            singles += timed_command([sys.executable, "-m", "smile_ray.run", "--no-svd-cache",      # all CPUs
                                      "--set", f"method.gate_k={gate_k}", "--set", f"method.k={k}",
                                      "--report", str(report)], env)
            single_timings.append(json.loads(report.read_text())["timings"])
    sweep = timed_command([sys.executable, "-m", "smile_ray.tune", "--space", str(space),
                           "--output", str(work / "sweep")], env)
    trials = json.loads((work / "sweep" / "summary.json").read_text())["trials"]
    imports = timed_command([sys.executable, "-c", "import smile_ray.trial"], env)
    print("1. 12 SMILE configurations on the embedded benchmark (wall time, whole commands):")
    print(f"   12 × python -m smile_ray.run --no-svd-cache (serial)  {singles:7.1f} s")
    print(f"   python -m smile_ray.tune (one sweep)                 {sweep:7.1f} s   "
          f"ratio {sweep / singles:.2f} (target ≤ 0.33)")
    print("   where the time goes:")
    for name, timings in (("serial runs", single_timings),
                          ("sweep trials", [{k.removeprefix("timings/"): v for k, v in t["metrics"].items()
                                             if k.startswith("timings/")} for t in trials])):
        totals = {key: sum(t[key] for t in timings) for key in ("load_seconds", "svd_seconds", "eval_seconds")}
        print(f"     {name:<13} " + ", ".join(f"{key.removesuffix('_seconds')} {value:5.1f} s"
                                            for key, value in totals.items()) + " (summed over 12)")
    print(f"     one process importing torch + transformers (python -c 'import smile_ray.trial'): {imports:.1f} s")


def overhead(work: Path) -> None:
    import ray
    import torch

    from smile_ray.hub import quiet_transformers
    from smile_ray.spec import parse_space
    from smile_ray.trial import build_pools, run_trial
    from smile_ray.tune import SVD_CACHE_DIR, SweepOptions, run_sweep

    quiet_transformers()
    torch.set_num_threads(1)
    spec = parse_space({**SPACE, "search": {"max_concurrent": 1}}, "bench12")
    svd_cache = work / "overhead" / SVD_CACHE_DIR
    pools = build_pools(spec.pools())
    points = spec.grid_points()
    for largest in spec.svd_plan():          # warm the SVD cache at the ranks every point slices, as the sweep's prefill
        run_trial({"method": {**points[0], **largest}}, pools=pools, svd_cache=svd_cache)
    start = time.perf_counter()
    for point in points:
        run_trial({"method": point}, pools=pools, svd_cache=svd_cache)
    direct = time.perf_counter() - start

    ray.init(num_cpus=2, include_dashboard=False)
    options = SweepOptions(output=work / "overhead", tracking_uri=f"sqlite:///{work / 'overhead' / 'mlflow.db'}",
                           experiment="smile-bench12-overhead", verbose=0)
    start = time.perf_counter()
    run_sweep(spec, options)
    tuned = time.perf_counter() - start
    ray.shutdown()
    print("\n2. the same 12 configurations one at a time, SVD cache warm:")
    print(f"   run_trial in-process              {direct:7.1f} s")
    print(f"   run_sweep (Ray Tune + MLflow)     {tuned:7.1f} s   overhead per trial "
          f"{(tuned - direct) / len(points):.2f} s (target ≤ 2 s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", help="where sweeps write (default: a temporary directory)")
    args = parser.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="smile_bench_"))
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "HF_HUB_OFFLINE": "1",
           "SMILE_RAY_CACHE": os.environ.get("SMILE_RAY_CACHE", str(Path.home() / ".cache" / "smile_ray"))}
    os.environ.update({k: env[k] for k in ("RAY_AUTH_MODE", "RAY_USAGE_STATS_ENABLED", "HF_HUB_OFFLINE",
                                            "SMILE_RAY_CACHE")})
    from smile_ray.embedded import build_embedded

    build_embedded()          # built (or found) before anything is timed: a first build would land in one run
    print(f"{os.cpu_count()} CPUs; output in {work}\n")
    sweep_ratio(work, env)
    overhead(work)


if __name__ == "__main__":
    main()
