"""`python -m smile_ray.run`: merge and evaluate one configuration, print a per-task table.

With no arguments it runs SMILE on the embedded benchmark (built and cached on first use).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from smile_ray.cli import finish
from smile_ray.cluster import usable_cpus
from smile_ray.errors import SmileError, user_message
from smile_ray.files import check_new_directory, write_json
from smile_ray.report import format_task_table, task_names
from smile_ray.sources import check_pools
from smile_ray.spec import apply_overrides, load_yaml, parse_space

EMBEDDED_DEFAULT = {
    "model_pool": {"kind": "embedded"},
    "task_pool": {"kind": "embedded"},
    "method": {"name": "smile", "gate_k": 32, "k": 32, "top_k": 1},
}


def default_svd_cache() -> Path:
    root = os.environ.get("SMILE_RAY_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "smile_ray") / "svd"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m smile_ray.run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML with model_pool, task_pool and method, or a search space whose "
                                         "method is one point (default: embedded SMILE)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key with a YAML value, e.g. --set method.gate_k=8 (repeatable)")
    parser.add_argument("--report", help="write the FusionBench-style report JSON here")
    parser.add_argument("--save-model", help="save the merged model to this directory (safetensors)")
    parser.add_argument("--svd-cache", default=str(default_svd_cache()),
                        help="directory of cached truncated SVDs (default: %(default)s)")
    parser.add_argument("--no-svd-cache", action="store_true", help="compute every SVD afresh")
    parser.add_argument("--device", help="cuda, cuda:1 or cpu (default: cuda when available)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: the CPUs this process may use)")
    return parser.parse_args(argv)


def checked_device(name: str | None):
    """--device as a torch.device (None: the default), or a one-line error when this machine has no such device."""
    import torch

    if name is None:
        return None
    try:
        device = torch.device(name)
    except RuntimeError:
        raise SmileError(f"--device {name!r}: not a device name (cpu, cuda, cuda:1, …)") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0 or (device.index or 0) >= count:
            raise SmileError(f"--device {name}: this machine has {count or 'no'} CUDA device{'s' * (count != 1)}")
    return device


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        config = load_yaml(args.config) if args.config else EMBEDDED_DEFAULT
        spec = parse_space(apply_overrides(config, args.overrides), "run")   # the checks a sweep makes
        method = spec.single_point()
        check_pools(spec.model_pool, spec.task_pool)
        if args.save_model:
            check_new_directory(args.save_model, "--save-model")
        import torch                     # the model stack loads after the checks: bad input is refused fast

        from smile_ray.hub import quiet_transformers
        from smile_ray.trial import load_pools, run_trial

        quiet_transformers()
        device = checked_device(args.device)
        if args.threads is not None and args.threads < 1:
            raise SmileError(f"--threads: expected at least 1, got {args.threads}")
        torch.set_num_threads(args.threads or usable_cpus())

        print(f"method: {json.dumps(method)}", flush=True)
        pools = load_pools(spec.model_pool, spec.task_pool, device)
        pools.tasks.prepare()            # datasets read (and refused) before the merge, as a sweep's driver does

        def progress(task: str, metrics: dict, running: dict) -> None:
            score = pools.primary[task]
            print(f"  {task:<16} {score} {100 * metrics[score]:6.2f}%  ({metrics['samples']} samples, "
                  f"{metrics['samples'] / max(metrics['seconds'], 1e-9):.1f}/s)", flush=True)

        report = run_trial({"method": method}, pools=pools, svd_cache=None if args.no_svd_cache else args.svd_cache,
                           device=device, on_task_done=progress, save_model_dir=args.save_model)
    except SmileError as error:
        print(f"error: {user_message(error)}", file=sys.stderr)
        return 2
    if task_names(report):
        print(format_task_table(report))
    info, timings = report["model_info"], report["timings"]
    print(f"parameters: {info['all_params']:,} ({info['ratio']:.2f}× the pretrained model, "
          f"{info['active_params']:,} active per token)")
    print("seconds: " + ", ".join(f"{k.removesuffix('_seconds')} {v:.1f}" for k, v in timings.items())
          + f"; SVDs computed {info['svd_calls']}, from cache {info['svd_cache_hits']}")
    if args.report:
        print(f"report: {write_json(report, args.report)}")
    if args.save_model:
        print(f"model: {args.save_model}")
    return 0


if __name__ == "__main__":
    finish(main())
