"""Files the product writes: atomically (a temporary file renamed into place, so a reader never sees half of one)
and with the permissions of a plain new file under the umask (a sweep's outputs live on storage other users and
nodes read; mkstemp / mkdtemp would make them owner-only)."""
from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any


def current_umask() -> int:
    """The process umask, read without changing it (Linux: /proc/self/status, kernel ≥ 4.7).

    Elsewhere it falls back to the `os.umask` round trip, which sets the umask for a moment: a file another thread
    creates in that instant gets 0o022 instead of the real umask. Only the fallback has that race."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def default_file_mode() -> int:
    """The mode `open(path, "w")` gives a new file: 0o666 less the umask. (mkstemp/mkdtemp create 0o600/0o700,
    which an atomic write's rename would otherwise keep.)"""
    return 0o666 & ~current_umask()


def default_dir_mode() -> int:
    """The mode `mkdir` gives a new directory: 0o777 less the umask."""
    return 0o777 & ~current_umask()


def write_json(data: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Write `data` as indented JSON, atomically (a temp file in the same directory, then `os.replace`), with the
    permissions of a plain new file (`default_file_mode`), not mkstemp's owner-only 0o600."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2)
            f.write("\n")
            f.flush()
            os.fchmod(f.fileno(), default_file_mode())
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def check_new_directory(path: str | os.PathLike, what: str) -> None:
    """Refuse (SmileError naming `what`) a path that holds a file or a non-empty directory: a model is written
    into a new or empty directory, never over something else."""
    from smile_ray.errors import SmileError

    path = Path(path)
    if path.exists() and not path.is_dir():
        raise SmileError(f"{what} {path}: is a file; give a new or empty directory")
    if path.is_dir() and any(path.iterdir()):
        raise SmileError(f"{what} {path}: is not empty; give a new or empty directory")
