"""How long a command-line run takes to exit once its work is done, with and without `smile_ray.cli.finish`.

    python bench/cli_exit.py [--repeats 3]

Each side is a fresh Python that imports what `python -m smile_ray.tune` has imported by its end (torch,
transformers' CLIP, Ray Tune, MLflow, matplotlib), says it is done, and exits through `sys.exit` or through
`finish`: the time from "done" to the process's end, measured side by side, alternating, median of the repeats.
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

PROGRAM = """
import sys
import matplotlib.figure, mlflow, ray.tune, torch, transformers
from transformers import CLIPVisionModel
from smile_ray.cli import finish
print("done", flush=True)
finish(0) if sys.argv[1] == "finish" else sys.exit(0)
"""


def exit_seconds(way: str) -> float:
    process = subprocess.Popen([sys.executable, "-c", PROGRAM, way], stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "done"
    start = time.perf_counter()
    if process.wait() != 0:
        raise SystemExit(f"the {way} side exited with {process.returncode}")
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    times: dict[str, list[float]] = {"sys.exit": [], "finish": []}
    for _ in range(args.repeats):
        for way in times:
            times[way].append(exit_seconds("finish" if way == "finish" else "exit"))
    plain, fast = (statistics.median(times[way]) for way in ("sys.exit", "finish"))
    print(f"exit after the work is done (median of {args.repeats}): sys.exit {plain:.2f} s, finish {fast:.2f} s "
          f"({plain / fast:.1f}x faster)")


if __name__ == "__main__":
    main()
