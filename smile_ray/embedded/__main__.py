"""`python -m smile_ray.embedded [--scale full|tiny] [--cache-dir DIR] [--force]`: build or find the benchmark."""
from __future__ import annotations

import argparse
import sys
import time

from smile_ray.cli import finish
from smile_ray.embedded.build import build_embedded
from smile_ray.embedded.recipe import RECIPES
from smile_ray.errors import SmileError


def main(argv: list[str] | None = None) -> int:
    """Build (or find) the embedded benchmark and print where it is."""
    parser = argparse.ArgumentParser(prog="python -m smile_ray.embedded", description=__doc__)
    parser.add_argument("--scale", default="full", choices=sorted(RECIPES))
    parser.add_argument("--cache-dir", default=None, help="default: $SMILE_RAY_CACHE/embedded or "
                                                          "~/.cache/smile_ray/embedded")
    parser.add_argument("--force", action="store_true", help="rebuild even if a finished build is cached")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    try:
        bench = build_embedded(args.cache_dir, scale=args.scale, force=args.force)
    except SmileError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"embedded benchmark ({args.scale}) at {bench.root}  [{time.perf_counter() - started:.1f} s]")
    print(f"  clip:    {bench.clip_dir}")
    for task in bench.tasks:
        print(f"  {task.name:<10} expert {bench.experts[task.name]}  data {task.dataset}")
    return 0


if __name__ == "__main__":
    finish(main())
