"""How every command-line entry point ends (`python -m smile_ray.tune`, `.run`, `.sync`, `.embedded`)."""
import gc
import sys
from typing import NoReturn


def finish(code: int) -> NoReturn:
    """`sys.exit(code)` without the interpreter's last garbage collections over every object still alive: torch,
    transformers, Ray and MLflow leave so many that they took about 3 s of each command's exit on 2 CPU cores, to
    free memory the OS takes back anyway. Objects are still released as their modules are cleared, and the atexit
    handlers (Ray's shutdown, logging's flush) still run; only the search for reference cycles is skipped."""
    gc.freeze()
    sys.exit(code)
