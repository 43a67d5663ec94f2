"""Builds of the embedded benchmarks, cached on disk: where they live, one builder at a time, all or nothing.

A build is written to a temporary directory and renamed into place under a file lock, so readers never see half a
build and concurrent builders do not collide; it runs seeded, deterministic and on one torch thread, so every
build of a recipe on a given kind of CPU is bit-identical.
"""
from __future__ import annotations

import contextlib
import fcntl
import multiprocessing
import os
import secrets
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import datasets
import torch
import transformers


def default_cache_dir() -> Path:
    """`$SMILE_RAY_CACHE/embedded` if set, else `~/.cache/smile_ray/embedded`."""
    base = os.environ.get("SMILE_RAY_CACHE")
    return Path(base) / "embedded" if base else Path.home() / ".cache" / "smile_ray" / "embedded"


def cached_build(root: Path, build_into: Callable[[Path], None], *, force: bool = False) -> Path:
    """`root`, built first by `build_into(tmp)` unless a finished build is there (or `force`)."""
    if root.is_dir() and not force:
        return root
    if getattr(multiprocessing.current_process(), "_inheriting", False):    # as multiprocessing itself checks
        raise RuntimeError(f"a build process of {root.name} imported the main script, which builds it again: "
                           f"put the script's code under `if __name__ == '__main__':`")   # else: waits on the lock
    root.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(root.parent / f".{root.name}.lock"):
        if root.is_dir() and not force:  # another process finished it while we waited
            return root
        for stale in [*root.parent.glob(f".{root.name}.tmp-*"), *root.parent.glob(f".{root.name}.old-*")]:
            shutil.rmtree(stale, ignore_errors=True)  # left by a builder that died holding this lock
        token = f"{os.getpid()}-{secrets.token_hex(4)}"
        tmp = root.parent / f".{root.name}.tmp-{token}"
        try:
            build_into(tmp)
            if root.exists():
                old = root.parent / f".{root.name}.old-{token}"
                os.replace(root, old)
                os.replace(tmp, root)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, root)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return root


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive advisory lock on `path` (created if missing)."""
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextlib.contextmanager
def build_environment(seed: int) -> Iterator[None]:
    """Seeded, deterministic, quiet, and on one torch thread.

    One thread makes a build bit-identical whatever thread count the caller runs with: matrix products split
    across threads round differently, and training carries the difference into every weight (on a 2-core machine a
    2-thread build moved the benchmark's averages by about 0.1 point). The caller's RNG state, thread count and
    determinism flag are restored afterwards.
    """
    asked = torch.get_num_threads()
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    bars_were_off = datasets.utils.are_progress_bars_disabled()
    hf_bars_were_on = transformers.utils.logging.is_progress_bar_enabled()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    datasets.utils.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            yield
    finally:
        torch.set_num_threads(asked)
        torch.use_deterministic_algorithms(was_deterministic)
        if not bars_were_off:
            datasets.utils.enable_progress_bars()
        if hf_bars_were_on:
            transformers.utils.logging.enable_progress_bar()
