"""What the randomized SVD solver costs on the embedded benchmarks: SMILE's average score with the exact and with the
randomized solver at the same points, side by side, through the product's own code path (`run_trial`).

    python bench/svd_solvers.py                         # CLIP and T5 (full experts), their default points
    python bench/svd_solvers.py --benchmark clip --configs 4:8,8:16

Prints per point the average score (each task's primary metric, %) with each solver, the difference, and the upscale
time of each; then the largest loss. The randomized solver decomposes a layer only where its sketch (2·rank + 8
columns) is at most half the layer's smaller side, and where the residual check passes (smile/svd.py): on these
small models (every layer's smaller side is 128 in the CLIP benchmark, 64 in the T5 one) that is max(gate_k, k) ≤ 28
and ≤ 12, and the default points are chosen there. Target (issue 12): ≤ 0.1 point lost.
"""
from __future__ import annotations

import argparse

import torch

from smile_ray.hub import quiet_transformers
from smile_ray.trial import build_pools, run_trial

BENCHMARKS = {
    "clip": ({"model_pool": {"kind": "embedded"}, "task_pool": {"kind": "embedded"}}, "2:4,4:8,8:8,8:16,16:16,16:24"),
    "t5": ({"model_pool": {"kind": "embedded_t5"}, "task_pool": {"kind": "embedded_glue"}},
           "2:4,4:8,8:8,4:12,12:12"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--benchmark", choices=sorted(BENCHMARKS), action="append")
    parser.add_argument("--configs", help="gate_k:k pairs, comma-separated (default: the benchmark's)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    quiet_transformers()
    worst = 0.0
    for name in args.benchmark or sorted(BENCHMARKS):
        sections, configs = BENCHMARKS[name]
        pools = build_pools(sections)
        print(f"\n{name}: average score (%), exact vs randomized SVD")
        for pair in (args.configs or configs).split(","):
            gate_k, k = map(int, pair.split(":"))
            row = {}
            for solver in ("exact", "randomized"):
                report = run_trial({"method": {"name": "smile", "gate_k": gate_k, "k": k, "svd_solver": solver}},
                                   pools=pools)
                row[solver] = (100 * report["average"]["score"], report["timings"]["upscale_seconds"])
            lost = row["exact"][0] - row["randomized"][0]
            worst = max(worst, lost)
            print(f"  gate_k {gate_k:3d} k {k:4d}: exact {row['exact'][0]:6.2f}  randomized {row['randomized'][0]:6.2f}"
                  f"  lost {lost:+.2f}   upscale {row['exact'][1]:5.2f} s vs {row['randomized'][1]:5.2f} s")
    print(f"\nlargest loss: {worst:.2f} points (target ≤ 0.1)")


if __name__ == "__main__":
    main()
