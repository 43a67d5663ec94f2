"""Free space on a sweep's `--output`: checked before a sweep starts, and watched while it runs.

A disk that fills up under a sweep would fail its writes half-way (Tune's experiment state, trial results, a sqlite
MLflow store in --output), leaving files that `--resume` cannot read. So a sweep keeps a reserve: it refuses to
start with less than `min_free_mib` free, and `smile_ray.tracking.DiskSpaceGuard` stops it, as Ctrl-C does (Tune
saves its state and every unfinished trial waits for `--resume`), as soon as the free space falls below the reserve,
while writes still succeed.
"""
from __future__ import annotations

import os
from pathlib import Path

from smile_ray.errors import OutputFull, SmileError
from smile_ray.sweep.record import DEFAULT_MIN_FREE_MIB


def free_mib(path: Path) -> float:
    """MiB free to this user on the file system holding `path` (its nearest existing parent)."""
    existing = next(p for p in (path, *path.parents) if p.exists())
    stats = os.statvfs(existing)
    return stats.f_bavail * stats.f_frsize / 2 ** 20


def output_full(output: Path, min_free: float) -> OutputFull:
    """What the driver raises once `DiskSpaceGuard` stopped the sweep."""
    return OutputFull(f"--output {output}: only {free_mib(output):.0f} MiB free on its file system (the sweep keeps "
                      f"{min_free:g} MiB, --min-free-mib); the sweep stopped with its state saved: free some space "
                      f"and continue with: python -m smile_ray.tune --resume --output {output}"
                      + ("" if min_free == DEFAULT_MIN_FREE_MIB else f" --min-free-mib {min_free:g}"))


def check_free_space(output: Path, min_free: float) -> None:
    """Refuse (SmileError) to start a sweep in an --output with less than the reserve free."""
    if free_mib(output) < min_free:
        raise SmileError(f"--output {output}: only {free_mib(output):.0f} MiB free on its file system; a sweep needs "
                         f"{min_free:g} MiB (--min-free-mib) to write its state safely")
