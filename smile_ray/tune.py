"""`python -m smile_ray.tune`: a SMILE sweep on Ray Tune, tracked in MLflow.

    python -m smile_ray.tune                                  # the embedded benchmark's space
    python -m smile_ray.tune --space clip_b32.yaml            # a shipped space (search_spaces/), or any path
    python -m smile_ray.tune --space clip_b32 --set method.gate_k=[4,16] --set task_pool.max_samples=64
    python -m smile_ray.tune --space clip_b32 --resume         # continue an interrupted sweep
    python -m smile_ray.tune --resume --output DIR            # the same, with the space stored in DIR

One sweep, in order: validate the space (before Ray starts); check that every model and dataset can be
found; fill the SVD cache of the model pool once, for the largest rank in the space, in parallel Ray
tasks; run the trials (each reports after every task, so ASHA can stop weak ones); write summary.json.
Exit status: 0 done (failed trials are listed in the summary), 2 invalid input, 1 the sweep could not run or
was interrupted (Ctrl-C: `--resume` continues it), 3 done, but the MLflow tracking server stopped answering and
did not come back: what it did not take is held in --output (`python -m smile_ray.sync --output DIR` delivers it).
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

from smile_ray.cli import finish
from smile_ray.cluster import DEFAULT_RESOURCE_WAIT_S, describe_resources, keep_local_ray_on_loopback
from smile_ray.errors import OutputFull, SmileError, user_message, without_credentials
from smile_ray.spec import SweepSpec, load_space
from smile_ray.sweep.driver import run_sweep
from smile_ray.sweep.record import (DEFAULT_MIN_FREE_MIB, HELD_EXIT, OUTBOX_DIR, SUMMARY_FILE, SWEEP_FILE,
                                    SweepOptions, experiment_path, resume_space)
from smile_ray.sweep.summary import ranked_table

# The driver's MLflow client gives up on a server that does not answer after seconds, not MLflow's 4 minutes of
# retries (which would hold up Tune's event loop): the callback then holds its writes on disk (smile_ray.outbox).
MLFLOW_HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                        "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}

DEFAULT_SPACE = "embedded"


# ---------------------------------------------------------------------------------------------------------------
# What runs on the workers: SVD prefill tasks and the trial function
# ---------------------------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------------------------
# The driver
# ---------------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m smile_ray.tune", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--space", help="a space YAML, or a name in search_spaces/ (default: embedded; with --resume, "
                                         "the space the sweep in --output started with)")
    parser.add_argument("--output", help="trial storage, SVD cache and summary.json (default: ./smile_runs/<space>)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a key of the space with a YAML value, e.g. --set method.gate_k=[4,16]; "
                             "method[3].k=-1 sets entry 3 of a list")
    again = parser.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true", help="continue the sweep stored in --output")
    again.add_argument("--overwrite", action="store_true",
                       help="start over in an --output that holds a sweep (its Tune state, reports and MLflow runs "
                            "are replaced; the SVD cache is kept)")
    parser.add_argument("--address", default=os.environ.get("RAY_ADDRESS"),
                        help="an existing Ray cluster (default: $RAY_ADDRESS, else a local Ray)")
    parser.add_argument("--wait-for-resources", type=float, metavar="SECONDS",
                        help="how long to wait for a node that fits a trial's resources to join an --address cluster "
                             f"(default {DEFAULT_RESOURCE_WAIT_S:g}; a local Ray is checked at once)")
    parser.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI"),
                        help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite in --output)")
    parser.add_argument("--experiment", help="MLflow experiment name (default: the space's tracking.experiment)")
    parser.add_argument("--min-free-mib", type=float, default=DEFAULT_MIN_FREE_MIB, metavar="MIB",
                        help="free space kept on --output's file system: a sweep does not start with less, and stops, "
                             "resumable, when it falls below (default %(default)g)")
    parser.add_argument("--svd-cache", help="the SVD cache, which sweeps of the same models may share, on any "
                                            "storage every node sees (default: <output>/svd_cache)")
    parser.add_argument("--validate", action="store_true", help="only validate the space and print its trials")
    return parser.parse_args(argv)


def describe(spec: SweepSpec) -> str:
    """What --validate prints: the trial count, the SVD prefill, and every configuration (the parameters that are
    searched or differ from the method's defaults; a sampled one shows its distribution)."""
    from smile_ray.methods import describe as describe_method
    from smile_ray.methods import get_method
    from smile_ray.spec import Sampled

    plan = ", ".join(describe_method({"name": name, **entry}) + ("" if per_expert else " (pretrained only)")
                     for name, entry, per_expert in spec.prefill_plan()) or "none"
    count, samples = spec.trial_count(), spec.search["num_samples"]
    lines = [f"{spec.name}: valid; {count} trial{'s' * (count != 1)} ({spec.search['algorithm']} search"
             f"{f', num_samples {samples}' if samples != 1 else ''}); SVD prefill: {plan}; "
             f"{describe_resources(spec.resources)} (checked against the cluster when the sweep starts)"]
    searched = {(block["name"], key) for block in spec.methods for key, v in block.items() if isinstance(v, Sampled)}
    for point in spec.methods if spec.searched else spec.grid_points():
        defaults = {p.name: p.default for p in get_method(point["name"]).params}
        shown = [f"{key}={f'{value.kind}{list(value.args)}' if isinstance(value, Sampled) else value}"
                 for key, value in point.items()
                 if key != "name" and ((point["name"], key) in searched or value != defaults.get(key))]
        lines.append(f"  {point['name']:<16} {' '.join(shown)}".rstrip())
    return "\n".join(lines)


def sweep_space(args: argparse.Namespace) -> SweepSpec:
    """--space; else, on --resume, the space the sweep in --output started with; else the embedded benchmark's."""
    if args.space is None and args.resume:
        spec = resume_space(Path(args.output or Path("smile_runs") / DEFAULT_SPACE), args.overrides)
        if spec is not None:
            return spec
    return load_space(args.space or DEFAULT_SPACE, args.overrides)


def mlflow_hint(tracking_uri: str, experiment: str) -> str:
    """How to open the sweep in the MLflow UI, as a command that works when pasted (this environment's mlflow,
    which a venv need not have put on PATH)."""
    if tracking_uri.startswith(("http://", "https://")):
        return f"MLflow: {without_credentials(tracking_uri)}  (experiment {experiment})"
    beside = Path(sys.executable).parent / "mlflow"
    command = shlex.quote(str(beside)) if beside.is_file() else f"{shlex.quote(sys.executable)} -m mlflow"
    return (f"MLflow: {command} ui --backend-store-uri {shlex.quote(tracking_uri)} --host 127.0.0.1 --port 5000  "
            f"(then http://127.0.0.1:5000, experiment {experiment})")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")          # Tune's table reporter, with our columns
    for name, value in MLFLOW_HTTP_DEFAULTS.items():
        os.environ.setdefault(name, value)
    if args.address is None:
        keep_local_ray_on_loopback()                           # before anything imports ray
    output = None
    credentials = (" --tracking-uri <the tracking URI with its credentials>"      # printed commands ask for them
                   if args.tracking_uri and without_credentials(args.tracking_uri) != args.tracking_uri else "")
    try:
        spec = sweep_space(args)
        if args.validate:
            print(describe(spec))
            return 0
        output = Path(args.output or Path("smile_runs") / spec.name).resolve()
        tracking_uri = args.tracking_uri or f"sqlite:///{output / 'mlflow.db'}"
        from smile_ray.hub import credentials_in_environment

        with credentials_in_environment(tracking_uri) as plain_uri:
            options = SweepOptions(output=output, tracking_uri=plain_uri, address=args.address, resume=args.resume,
                                   overwrite=args.overwrite, resource_wait_s=args.wait_for_resources,
                                   experiment=args.experiment or spec.tracking["experiment"],
                                   svd_cache=Path(args.svd_cache).resolve() if args.svd_cache else None,
                                   min_free_mib=args.min_free_mib)
            summary = run_sweep(spec, options)
    except SmileError as error:
        print(f"error: {user_message(error)}", file=sys.stderr)
        return 2
    except OutputFull as full:
        print(f"error: {full}{credentials}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        from ray import tune

        if output is not None and (tune.Tuner.can_restore(str(experiment_path(output)))
                                   or (output / SWEEP_FILE).is_file()):
            print(f"interrupted; the finished trials are kept, continue with: python -m smile_ray.tune --resume "
                  f"--output {output}{credentials}", file=sys.stderr)
        else:
            print("interrupted before any trial started; run the same command again", file=sys.stderr)
        return 1
    except Exception as error:   # the sweep itself could not run (Ray, storage, MLflow): one line, status 1
        print(f"error: the sweep could not run: {type(error).__name__}: {user_message(error)}", file=sys.stderr)
        return 1
    print("\n" + ranked_table(summary))
    failed = sum(t["status"] == "error" for t in summary["trials"])
    print(f"\n{len(summary['trials'])} trials ({failed} failed); summary: {options.output / SUMMARY_FILE}")
    print(mlflow_hint(options.tracking_uri, options.experiment))
    held = summary["mlflow"]["held_records"]
    if held:
        print(f"error: the MLflow tracking server {options.tracking_uri} did not answer: {held} "
              f"records are held in {options.output / OUTBOX_DIR}; deliver them with: python -m smile_ray.sync "
              f"--output {options.output}{credentials}", file=sys.stderr)
        return HELD_EXIT
    return 0


if __name__ == "__main__":
    finish(main())
