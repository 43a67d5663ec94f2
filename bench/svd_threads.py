"""Where more torch threads start to pay for a truncated SVD: 1 thread against all, per matrix size, with the
machine idle and with every other core busy (another process spinning), side by side in one run.

    python bench/svd_threads.py                 # Gram sizes 32 … 3072, square and 4:1 matrices
    python bench/svd_threads.py --repeats 9

Prints, per shape, the median seconds with 1 thread and with N threads, idle and busy, and the ratio N/1 (above 1:
the extra threads cost time). `smile_ray.smile.svd.MIN_PARALLEL_GRAM` is chosen from this table.
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import time

import torch

from smile_ray.smile.svd import _decompose      # the decomposition alone, at a fixed thread count


def spin(stop) -> None:
    while not stop.is_set():
        pass


def timed(matrix: torch.Tensor, rank: int, threads: int, repeats: int) -> float:
    torch.set_num_threads(threads)
    _decompose(matrix, rank, None)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        _decompose(matrix, rank, None)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 64, 128, 256, 384, 512, 768, 1024, 2048, 3072])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    cores = len(os.sched_getaffinity(0))
    print(f"torch {torch.__version__}, {cores} cores; seconds per truncated SVD (rank 32), median of {args.repeats}")
    print(f"{'shape':>12} {'1 idle':>9} {f'{cores} idle':>9} {'ratio':>6} {'1 busy':>9} {f'{cores} busy':>9} {'ratio':>6}")
    generator = torch.Generator().manual_seed(0)
    for n in args.sizes:
        for m in (n, 4 * n):
            if m > 12288:
                continue
            matrix = torch.randn(m, n, generator=generator)
            row = {}
            for load in ("idle", "busy"):
                stop = multiprocessing.Event()
                spinners = [multiprocessing.Process(target=spin, args=(stop,)) for _ in range(cores - 1)
                            if load == "busy"]
                for process in spinners:
                    process.start()
                try:
                    row[load] = (timed(matrix, 32, 1, args.repeats), timed(matrix, 32, cores, args.repeats))
                finally:
                    stop.set()
                    for process in spinners:
                        process.join()
            (i1, iN), (b1, bN) = row["idle"], row["busy"]
            print(f"{f'{m}×{n}':>12} {i1:9.5f} {iN:9.5f} {iN / i1:6.2f} {b1:9.5f} {bN:9.5f} {bN / b1:6.2f}", flush=True)


if __name__ == "__main__":
    main()
