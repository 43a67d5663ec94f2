"""A sweep's record in `--output`: where its parts live, what it fixed when it started (sweep.json), and the checks
that `--resume` and `--overwrite` make before anything starts or is written."""
from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from smile_ray.errors import SmileError, without_credentials
from smile_ray.files import write_json
from smile_ray.spec import SweepSpec, apply_overrides, first_difference, parse_space


SUMMARY_FILE = "summary.json"


EXPERIMENT_DIR = "tune"                  # Tune's experiment: tune/<its name in sweep.json> (experiment_path)


SVD_CACHE_DIR = "svd_cache"


SWEEP_FILE = "sweep.json"


REPORTS_DIR = "reports"


MODELS_DIR = "models"                    # tracking.save_model: one checkpoint per trial, named by its trial id


OUTBOX_DIR = "mlflow_outbox"             # MLflow writes held while the tracking server does not answer (outbox.py)


DEFAULT_MIN_FREE_MIB = 256.0             # free space a sweep keeps on --output's file system (sweep/disk_space.py)


HELD_EXIT = 3          # a sweep finished with MLflow records held in OUTBOX_DIR (the server did not come back)


@dataclass
class SweepOptions:
    output: Path
    tracking_uri: str
    experiment: str
    address: str | None = None
    resume: bool = False
    overwrite: bool = False
    resource_wait_s: float | None = None     # None: DEFAULT_RESOURCE_WAIT_S on an --address cluster, 0 locally
    verbose: int = 1
    svd_cache: Path | None = None            # None: SVD_CACHE_DIR in output; sweeps may share one (--svd-cache)
    min_free_mib: float = DEFAULT_MIN_FREE_MIB   # MiB: the reserve of free space kept on --output's file system (disk_space.py)

    @property
    def svd_cache_dir(self) -> Path:
        return self.svd_cache or self.output / SVD_CACHE_DIR


def read_record(output: Path) -> dict[str, Any]:
    """sweep.json: what a sweep fixed when it started (tracking store, experiment, space) and, once its SVD prefill
    has finished, what the prefill computed. Empty when there is none."""
    record = output / SWEEP_FILE
    return json.loads(record.read_text()) if record.is_file() else {}


def sweep_record(options: SweepOptions, spec: SweepSpec) -> dict[str, Any]:
    """Write sweep.json for a sweep that starts: its tracking store, experiment, space, place and the name of its
    Tune experiment, which a `--resume` keeps; returns what it wrote."""
    record = {"tracking_uri": without_credentials(options.tracking_uri), "experiment": options.experiment,
              "svd_cache": str(options.svd_cache_dir), "space_name": spec.name,
              "space": space_text(spec), "output": str(options.output),
              "tune_experiment": f"{time.strftime('%Y-%m-%d_%H-%M-%S')}_{uuid.uuid4().hex[:8]}"}
    write_json(record, options.output / SWEEP_FILE)
    return record


def experiment_path(output: Path) -> Path:
    """Where the sweep in `output` keeps Tune's experiment: tune/<a name of its own>. Tune stages an experiment's
    driver files in the Ray session under <the second it started>/<experiment name>, so two sweeps on one cluster
    with the same name, starting in the same second, would share that folder and delete each other's files. A
    sweep started before sweep.json named it keeps tune/ itself."""
    name = read_record(output).get("tune_experiment")
    return output / EXPERIMENT_DIR / name if name else output / EXPERIMENT_DIR


def space_text(spec: SweepSpec) -> str:
    """The space as given (after --set), as YAML: what sweep.json keeps (any YAML value survives, dates and .nan
    included) and what --resume compares."""
    return yaml.safe_dump(spec.document, sort_keys=False)


def resume_space(output: Path, overrides: list[str]) -> SweepSpec | None:
    """On `--resume` without `--space`: the space the sweep in `output` started with (then `--set`); None for no
    sweep there (or one from a version that did not record it)."""
    record = read_record(output)
    if not isinstance(record.get("space"), str):
        return None
    return parse_space(apply_overrides(yaml.safe_load(record["space"]), overrides), record["space_name"])


def resumable_record(spec: SweepSpec, output: Path) -> dict[str, Any]:
    """sweep.json of the sweep in `output`, which `--resume` continues, after checking that there is one (Tune's
    saved state, or only sweep.json when the driver was stopped before the first trial, during the SVD prefill),
    that it was started there and with this space (else Tune would restore the old trials and silently ignore what
    changed)."""
    from ray import tune

    record = read_record(output)
    if not tune.Tuner.can_restore(str(experiment_path(output))) and "space" not in record:
        raise SmileError(f"--resume: no sweep to resume in {output}")
    started_in = record.get("output")
    if started_in is not None and Path(started_in).resolve() != output.resolve():
        raise SmileError(f"--resume: the sweep in {output} was started in {started_in} and copied or moved since; its "
                         f"MLflow records and Tune state point there: resume it there")
    stored = record.get("space")
    if isinstance(stored, str) and stored != space_text(spec):
        changed = first_difference(yaml.safe_load(stored), spec.document) or "a value"
        raise SmileError(f"--resume: the space differs at {changed} from the one the sweep in {output} started with; "
                         f"leave out --space and --set to resume it as it was, or start a new --output")
    return record


def check_output(output: Path) -> None:
    """--output can be created and written, checked without creating it (nothing is written before every check
    has passed)."""
    existing = next(p for p in (output, *output.parents) if p.exists())
    if not existing.is_dir():
        raise SmileError(f"--output {output}: cannot create ({existing} is not a directory)")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise SmileError(f"--output {output}: not writable ({existing})")


SWEEP_PARTS = (EXPERIMENT_DIR, REPORTS_DIR, SWEEP_FILE, SUMMARY_FILE, OUTBOX_DIR)   # what --overwrite removes


def refuse_existing_sweep(output: Path, overwrite: bool) -> None:
    """A new sweep does not silently replace the one in --output: that one is continued with --resume, or started
    over with --overwrite."""
    if overwrite or not any((output / part).exists() for part in SWEEP_PARTS):
        return
    started = time.strftime("%Y-%m-%d %H:%M", time.localtime(min((output / p).stat().st_mtime for p in SWEEP_PARTS
                                                                 if (output / p).exists())))
    raise SmileError(f"--output {output} holds a sweep already (started {started}): continue it with --resume, "
                     f"start it over with --overwrite, or choose another --output")


def clear_sweep(output: Path) -> None:
    """--overwrite: remove the previous sweep's Tune state, reports, record and summary (the SVD cache and the
    MLflow store stay; the previous sweep's MLflow runs are deleted when the new one starts)."""
    for part in SWEEP_PARTS:
        path = output / part
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
