"""Timing shared by the benches: functions measured side by side, so a change in the machine's speed (these machines
are shared and virtualised) affects every one alike."""
from __future__ import annotations

import statistics
import time

import torch


def timed_side_by_side(fns: list, repeats: int, device: torch.device) -> list[float]:
    """Median seconds per call of each function, calls interleaved round by round (one warm-up round), so a
    change in the machine's speed during the run affects every function alike. On a GPU each call is timed
    from an idle device to its last kernel's end."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    samples: list[list[float]] = [[] for _ in fns]
    for round_ in range(repeats + 1):
        for fn, times in zip(fns, samples):
            sync()
            start = time.perf_counter()
            fn()
            sync()
            if round_:
                times.append(time.perf_counter() - start)
    return [statistics.median(times) for times in samples]
