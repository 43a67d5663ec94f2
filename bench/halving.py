"""Multi-fidelity sweeps against full evaluation, side by side: the same space swept twice, with
`search.scheduler: halving` (rungs of samples, sweep/halving.py) and with every trial evaluated on every sample.

    python bench/halving.py                                  # embedded_grid: 36 SMILE points on the embedded benchmark
    python bench/halving.py --space embedded --set search.min_samples=32

Prints the evaluation samples each sweep spent (the sum over trials of timings/eval_samples), its wall time, and
whether the halving sweep found the same best configuration and the same top 3 (among its trials that saw every
sample). Target (issue 12): ≥ 3× fewer samples for the same best configuration.
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


def sweep(space: str, overrides: list[str], out: Path) -> tuple[dict, float]:
    command = [sys.executable, "-m", "smile_ray.tune", "--space", space, "--output", str(out / "sweep"),
               "--tracking-uri", f"sqlite:///{out / 'mlflow.db'}", *[a for o in overrides for a in ("--set", o)]]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode:
        sys.exit(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    return json.loads((out / "sweep" / "summary.json").read_text()), seconds


def ranking(summary: dict) -> list[str]:
    """Configurations of the trials that saw every sample, best first (ties broken by configuration)."""
    from smile_ray.methods import describe

    sign = -1 if summary["mode"] == "max" else 1
    finished = [t for t in summary["trials"] if t["status"] == "finished"]
    return [describe(t["config"]) for t in sorted(finished, key=lambda t: (sign * t["metrics"][summary["metric"]],
                                                                         describe(t["config"])))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--space", default="embedded_grid")
    parser.add_argument("--set", action="append", default=[], dest="overrides", metavar="KEY=VALUE")
    parser.add_argument("--keep", help="keep both sweeps' --output and MLflow here (default: a temporary directory)")
    args = parser.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    with tempfile.TemporaryDirectory() as work:
        runs = {}
        for name, scheduler in (("full", "none"), ("halving", "halving")):
            out = Path(args.keep or work) / name
            out.mkdir(parents=True)
            runs[name] = sweep(args.space, [*args.overrides, f"search.scheduler={scheduler}"], out)
    (full, full_s), (halved, halved_s) = runs["full"], runs["halving"]
    samples = {name: sum(t["metrics"].get("timings/eval_samples", 0) for t in summary["trials"])
               for name, (summary, _) in runs.items()}
    metric = full["metric"]
    print(f"space {args.space}: {len(full['trials'])} trials, metric {metric}")
    print(f"  full evaluation   {samples['full']:>10,.0f} samples  {full_s:7.0f} s wall")
    stopped = sum(t["status"] == "stopped" for t in halved["trials"])
    print(f"  halving           {samples['halving']:>10,.0f} samples  {halved_s:7.0f} s wall   "
          f"({stopped} of {len(halved['trials'])} trials stopped early)")
    print(f"  → {samples['full'] / samples['halving']:.2f}× fewer samples, {full_s / halved_s:.2f}× less wall time "
          f"(target: ≥ 3× fewer samples)")
    best, best_halved = ranking(full), ranking(halved)
    print(f"  best: full {best[0]} ({100 * full['best']['metrics'][metric]:.2f}), halving {best_halved[0]} "
          f"({100 * halved['best']['metrics'][metric]:.2f}) → {'same' if best[0] == best_halved[0] else 'DIFFERENT'}")
    print(f"  top 3: full {best[:3]}, halving {best_halved[:3]} → "
          f"{'same' if best[:3] == best_halved[:3] else 'same set' if set(best[:3]) == set(best_halved[:3]) else 'DIFFERENT'}")


if __name__ == "__main__":
    main()
