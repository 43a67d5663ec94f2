"""A sweep of many trials against one of few, side by side: is a trial's cost and the driver's memory flat in the
number of trials? (issue 13 §5: at 200 trials within 1.5× of those at 20.)

    python bench/load.py                       # 20 and 200 tiny trials on the embedded benchmark (about 10 min)
    python bench/load.py --trials 20 400

Each sweep runs `python -m smile_ray.tune` as a user would (its own local Ray, a sqlite MLflow store in --output):
the same 20-point SMILE grid on the tiny embedded benchmark, repeated (`search.num_samples`). Prints, per sweep,
Tune's tuning-loop seconds per trial, the driver's peak and final resident memory (its own process, sampled every
0.2 s), the MLflow children its parent run holds, and the ratios of the largest sweep to the smallest.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import yaml

GRID = {"name": "smile", "gate_k": [1, 2], "k": [1, 2, 4, 8, -1], "top_k": [1, 2]}     # 20 points


def sweep(trials: int, work: Path) -> dict:
    from mlflow import MlflowClient

    from smile_ray.mlflow_runs import find_sweep

    space = {"name": f"load{trials}", "model_pool": {"kind": "embedded", "scale": "tiny"},
             "task_pool": {"kind": "embedded", "max_samples": 8, "tasks": ["digit", "word"]},
             "method": GRID, "search": {"num_samples": trials // 20, "max_concurrent": 2},
             "tracking": {"experiment": f"load{trials}"}}
    (work / "space.yaml").write_text(yaml.safe_dump(space))
    output = work / "out"
    command = [sys.executable, "-m", "smile_ray.tune", "--space", str(work / "space.yaml"), "--output", str(output)]
    log = (work / "driver.log").open("w")
    driver = psutil.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    peak = last = 0
    while driver.poll() is None:
        try:
            rss = driver.memory_info().rss
            if rss:                                        # 0 once the process has exited
                last, peak = rss, max(peak, rss)
        except psutil.Error:
            pass
        time.sleep(0.2)
    text = (work / "driver.log").read_text()
    if driver.returncode:
        sys.exit(f"{' '.join(command)} failed:\n{text[-3000:]}")
    loop = float(re.findall(r"\(([\d.]+) seconds for the tuning loop\)", text)[-1])
    runs = find_sweep(f"sqlite:///{output / 'mlflow.db'}", f"load{trials}", str(output))
    children = len(MlflowClient(f"sqlite:///{output / 'mlflow.db'}").search_runs(
        [runs.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{runs.parent_run_id}'", max_results=5000))
    return {"trials": trials, "per_trial": loop / trials, "peak_mib": peak / 2 ** 20, "final_mib": last / 2 ** 20,
            "children": children}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, nargs="+", default=[20, 200], help="sweep sizes, multiples of 20")
    args = parser.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    results = []
    for trials in args.trials:
        with tempfile.TemporaryDirectory() as work:
            results.append(sweep(trials, Path(work)))
        r = results[-1]
        print(f"{r['trials']:>5} trials: {r['per_trial']:.2f} s per trial (tuning loop), driver RSS peak "
              f"{r['peak_mib']:.0f} MiB, final {r['final_mib']:.0f} MiB; MLflow children {r['children']}", flush=True)
    small, large = results[0], results[-1]
    print(f"ratios {large['trials']} / {small['trials']} trials: per-trial time {large['per_trial'] / small['per_trial']:.2f}×, "
          f"driver peak memory {large['peak_mib'] / small['peak_mib']:.2f}× (target ≤ 1.5× each)")


if __name__ == "__main__":
    main()
