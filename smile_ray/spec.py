"""Configurations and search spaces: YAML files, `--set key.path=value` overrides, validation.

A search space is validated completely before Ray starts; every error is one line naming the file
or the key path (e.g. `method.gate_k.grid[1]: must be positive, got 0`).
"""
from __future__ import annotations

import copy
import itertools
import math
import os
import random
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from smile_ray.errors import SmileError

if TYPE_CHECKING:
    from smile_ray.kinds import ModelPoolConfig, TaskPoolConfig, TaskScores


def load_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML mapping from `path`; SmileError naming the file on a missing file or bad syntax."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise SmileError(f"{path}: no such file") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise SmileError(f"{where}: invalid YAML ({problem})") from None
    if not isinstance(data, Mapping):
        raise SmileError(f"{path}: expected a mapping at the top level")
    return dict(data)


KEY_SEGMENT = re.compile(r"([^.\[\]]+)((?:\[-?\d+\])*)")     # name, then any [i] list indices
KEY_INDEX = re.compile(r"\[(-?\d+)\]")


def _key_steps(item: str, key: str) -> list[str | int]:
    """`method[3].gate_k` → ["method", 3, "gate_k"]."""
    steps: list[str | int] = []
    for segment in key.split("."):
        match = KEY_SEGMENT.fullmatch(segment)
        if match is None:
            raise SmileError(f"--set {item!r}: expected KEY.PATH=VALUE, e.g. method.gate_k=16 or method[3].k=-1")
        steps.append(match.group(1))
        for index in KEY_INDEX.findall(match.group(2)):
            if int(index) < 0:
                raise SmileError(f"--set {item!r}: {segment}: list indices start at 0")
            steps.append(int(index))
    return steps


def _path(steps: Sequence[str | int]) -> str:
    return "".join(f"[{s}]" if isinstance(s, int) else f".{s}" for s in steps).lstrip(".")


def first_difference(a: Any, b: Any, steps: Sequence[str | int] = ()) -> str | None:
    """The key path (`method[3].gate_k`) of the first place where two documents differ; None when they are equal."""
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        for key in [*a, *(k for k in b if k not in a)]:
            found = (_path([*steps, key]) if key not in a or key not in b
                     else first_difference(a[key], b[key], [*steps, key]))
            if found is not None:
                return found
        return None
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b)):
            found = first_difference(x, y, [*steps, i])
            if found is not None:
                return found
        return None
    return None if a == b else _path(steps) or "the whole document"


def apply_overrides(config: Mapping[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """A copy of `config` with each `a.b.c=VALUE` set (VALUE parsed as YAML: 16, [4, 16], true, text); `a[i]`
    names entry i of a list, e.g. one block of a list of methods: `method[3].gate_k=[4, 8]`."""
    result = copy.deepcopy(dict(config))
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise SmileError(f"--set {item!r}: expected KEY.PATH=VALUE, e.g. method.gate_k=16")
        steps = _key_steps(item, key)
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            raise SmileError(f"--set {item!r}: the value is not valid YAML") from None
        node: Any = result
        for depth, step in enumerate(steps):
            last = depth == len(steps) - 1
            if isinstance(step, int):
                if not isinstance(node, list):
                    raise SmileError(f"--set {item!r}: {_path(steps[:depth])} is not a list")
                if step >= len(node):
                    raise SmileError(f"--set {item!r}: {_path(steps[:depth])} has no entry [{step}]")
            elif isinstance(node, list):
                example = f", e.g. {_path([*steps[:depth], len(node) - 1, *steps[depth:]])}" if node else ""
                raise SmileError(f"--set {item!r}: {_path(steps[:depth])} is a list of {len(node)}; name an "
                                 f"entry{example}")
            elif not isinstance(node, dict):
                raise SmileError(f"--set {item!r}: {_path(steps[:depth])} is not a mapping")
            if last:
                node[step] = value
            else:
                if isinstance(step, str) and node.get(step) is None:
                    node[step] = {}
                node = node[step]
    return result


# ---------------------------------------------------------------------------------------------------------------
# Search spaces
# ---------------------------------------------------------------------------------------------------------------


def _shipped_spaces_dir() -> Path:
    """The folder of the shipped spaces: the package smile_ray.search_spaces (the top-level search_spaces/ mapped in
    pyproject.toml); a checkout used without installing, or an editable install made before that mapping, lacks the
    package, and then the folder next to smile_ray/ is used."""
    try:
        return Path(str(resources.files("smile_ray.search_spaces")))
    except ModuleNotFoundError:
        return Path(__file__).resolve().parent.parent / "search_spaces"


SEARCH_SPACES_DIR = _shipped_spaces_dir()
TOP_LEVEL = ("name", "description", "model_pool", "task_pool", "method", "search", "resources", "tracking")
DISTRIBUTIONS = {"uniform": float, "loguniform": float, "randint": int, "lograndint": int}
SEARCH_FIELDS = {"algorithm": ("grid", "random", "optuna"), "num_samples": 1, "metric": None,
                 "mode": (None, "max", "min"), "max_concurrent": None, "scheduler": ("none", "asha", "halving"),
                 "max_failures": 1, "seed": 0, "min_samples": 16, "reduction_factor": 3,   # these three: halving
                 "noise_margin": 1.0}


def resolve_space_path(space: str | Path) -> Path:
    """A space file. A path with a directory part (`./embedded.yaml`, `/x/s.yaml`) is taken as given; a bare name
    (`clip_b32` or `clip_b32.yaml`) is the shipped space of that name, even if a same-named file lies in the current
    directory; a bare name that is not shipped is looked for in the current directory, then in ./search_spaces."""
    text = str(space)
    shipped = ", ".join(sorted(p.stem for p in SEARCH_SPACES_DIR.glob("*.yaml")))
    if any(sep and sep in text for sep in (os.sep, os.altsep)):
        if Path(text).is_file():
            return Path(text)
        raise SmileError(f"--space {space}: no such file (a shipped space is named without a folder: {shipped})")
    names = [text] if text.endswith((".yaml", ".yml")) else [text, f"{text}.yaml"]
    candidates = [SEARCH_SPACES_DIR / n for n in names if n.endswith(".yaml")]
    candidates += [Path(n) for n in names] + [Path("search_spaces", n) for n in names]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise SmileError(f"--space {space}: no such file, nor a space in search_spaces/ (shipped: {shipped})")


@dataclass(frozen=True)
class Sampled:
    """A searched parameter: kind is grid, choice, or a distribution name; args its values or bounds."""

    kind: str
    args: tuple

    def tune_domain(self, algorithm: str):
        from ray import tune    # only the driver needs Ray

        if self.kind == "grid":
            return tune.choice(list(self.args)) if algorithm == "optuna" else tune.grid_search(list(self.args))
        if self.kind == "choice":
            return tune.choice(list(self.args))
        return getattr(tune, self.kind)(*self.args)

    def largest(self) -> float:
        return max(self.args) if self.kind in ("grid", "choice") else self.args[1] - (self.kind.endswith("randint"))


@dataclass
class SweepSpec:
    """A validated search space: constants for the pools, method blocks whose parameters may be searched."""

    name: str
    document: dict[str, Any]            # the space as given (after --set), for the record
    model_pool: ModelPoolConfig
    task_pool: TaskPoolConfig
    methods: list[dict[str, Any]]       # each: {"name": str, param: constant or Sampled}, defaults filled
    search: dict[str, Any]
    resources: dict[str, float]
    tracking: dict[str, Any]

    @property
    def searched(self) -> bool:
        return any(isinstance(v, Sampled) and v.kind != "grid" for block in self.methods for v in block.values())

    def grid_points(self) -> list[dict[str, Any]]:
        """Every method configuration of a space without random parameters, in order."""
        points = []
        for block in self.methods:
            keys = [k for k, v in block.items() if isinstance(v, Sampled)]
            for values in itertools.product(*(block[k].args for k in keys)):
                points.append({**block, **dict(zip(keys, values))})
        return points

    def trial_count(self) -> int:
        """How many trials Tune runs: every grid point, times num_samples draws of what is sampled (optuna draws
        num_samples configurations, grids included)."""
        samples = self.search["num_samples"]
        if self.search["algorithm"] == "optuna" or len(self.methods) > 1:
            return samples if self.search["algorithm"] == "optuna" else len(self.grid_points()) * samples
        return math.prod(len(v.args) for v in self.methods[0].values()
                         if isinstance(v, Sampled) and v.kind == "grid") * samples

    def single_point(self) -> dict[str, Any]:
        """The method configuration of a space that searches nothing: what `python -m smile_ray.run` runs."""
        sweep = "one configuration is run here; sweep it with python -m smile_ray.tune"
        if len(self.methods) != 1:
            raise _fail("method", f"a list of {len(self.methods)} methods, but {sweep}")
        for key, value in self.methods[0].items():
            if isinstance(value, Sampled):
                raise _fail(f"method.{key}", f"a {value.kind} of values, but {sweep}")
        return dict(self.methods[0])

    def param_space(self) -> dict[str, Any]:
        """The Tune param_space: {"method": …} (pools travel separately, they are constants)."""
        from ray import tune

        algorithm = self.search["algorithm"]
        if self.search["scheduler"] == "halving" and algorithm == "grid":
            # successive halving stops a trial against the scores seen before it: a grid in its written order
            # (weak corners first, often) would let the weak through and cut the strong; a seeded shuffle mixes them
            points = self.grid_points()
            random.Random(self.search["seed"]).shuffle(points)
            return {"method": tune.grid_search(points)}
        if len(self.methods) == 1:
            block = self.methods[0]
            return {"method": {k: v.tune_domain(algorithm) if isinstance(v, Sampled) else v for k, v in block.items()}}
        return {"method": tune.grid_search(self.grid_points())}

    def prefill_plan(self) -> list[tuple[str, dict[str, Any], bool]]:
        """What the sweep computes into the SVD cache before its trials: (method name, keyword arguments, once per
        expert?) for every method of the space that declares a `Prefill`."""
        from smile_ray.methods import get_method

        plan = []
        for name in dict.fromkeys(block["name"] for block in self.methods):
            prefill = get_method(name).prefill
            if prefill is not None:
                blocks = [candidates(block) for block in self.methods if block["name"] == name]
                plan += [(name, entry, prefill.per_expert) for entry in prefill.plan(blocks)]
        return plan


def candidates(block: Mapping[str, Any]) -> dict[str, list[Any]]:
    """parameter → every value a method block may give it (a distribution: its largest draw)."""
    return {key: (list(value.args) if value.kind in ("grid", "choice") else [value.largest()])
            if isinstance(value, Sampled) else [value] for key, value in block.items()}


def _fail(path: str, message: str) -> SmileError:
    return SmileError(f"{path}: {message}")


def _check_type(path: str, value: Any, kind: type | tuple[type, ...], what: str) -> Any:
    if isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
        raise _fail(path, f"expected {what}, got {value!r}")
    if not isinstance(value, kind):
        raise _fail(path, f"expected {what}, got {value!r}")
    return value


def _check_fields(path: str, section: Mapping[str, Any], allowed: Sequence[str]) -> None:
    for key in section:
        if key not in allowed:
            raise _fail(f"{path}.{key}", f"unknown key (known: {', '.join(allowed)})")


def _searched_value(path: str, value: Any, param) -> Any:
    """A method parameter as given: a constant, a bare list (grid), or {grid|choice|<distribution>: …}."""
    if isinstance(value, list) and param.kind is not list:
        value = {"grid": value}
    if isinstance(value, Mapping):
        if len(value) != 1:
            raise _fail(path, "expected one of grid, choice, " + ", ".join(DISTRIBUTIONS))
        (kind, args), = value.items()
        if kind in ("grid", "choice"):
            if not isinstance(args, list) or not args:
                raise _fail(f"{path}.{kind}", "empty grid" if kind == "grid" else "empty choice")
            return Sampled(kind, tuple(param.validate(v, f"{path}.{kind}[{i}]") for i, v in enumerate(args)))
        if kind not in DISTRIBUTIONS:
            raise _fail(path, f"unknown search kind {kind!r} (known: grid, choice, {', '.join(DISTRIBUTIONS)})")
        if param.kind not in (int, float) or (DISTRIBUTIONS[kind] is float and param.kind is int):
            raise _fail(f"{path}.{kind}", f"a {kind} distribution does not fit an {param.kind.__name__} parameter")
        if not (isinstance(args, list) and len(args) == 2 and all(isinstance(a, (int, float)) and
                                                                not isinstance(a, bool) for a in args)):
            raise _fail(f"{path}.{kind}", "expected [low, high]")
        low, high = args
        if not low < high or (kind.startswith("log") and low <= 0):
            raise _fail(f"{path}.{kind}", f"expected low < high{' and low > 0' if kind.startswith('log') else ''}, "
                                          f"got {args}")
        param.validate(param.kind(low), f"{path}.{kind}[0]")
        return Sampled(kind, (param.kind(low), param.kind(high)))
    return param.validate(value, path)


def _method_block(path: str, block: Any) -> dict[str, Any]:
    from smile_ray.methods import REQUIRED, get_method

    _check_type(path, block, Mapping, "a mapping with the method's name and parameters")
    if "name" not in block:
        raise _fail(f"{path}.name", "missing")
    try:
        method = get_method(block["name"])
    except SmileError as error:
        raise _fail(f"{path}.name", str(error).split(": ", 1)[1]) from None
    params = {p.name: p for p in method.params}
    _check_fields(path, block, ["name", *params])
    resolved: dict[str, Any] = {"name": method.name}
    for name, param in params.items():
        if name in block:
            resolved[name] = _searched_value(f"{path}.{name}", block[name], param)
        elif param.default is REQUIRED:
            raise _fail(f"{path}.{name}", f"required by method '{method.name}' ({param.help})")
        else:
            resolved[name] = param.default
    return resolved


def checked_pools(config: Mapping[str, Any]) -> tuple[ModelPoolConfig, TaskPoolConfig]:
    """The `model_pool` and `task_pool` sections of a configuration or space, validated by their kinds and paired
    (smile_ray.kinds)."""
    from smile_ray.kinds import parse_pool

    for key in ("model_pool", "task_pool"):
        if key not in config:
            raise _fail(key, "missing")
    models, tasks = parse_pool(config["model_pool"], "model_pool"), parse_pool(config["task_pool"], "task_pool")
    return models.with_tasks(tasks), tasks.with_models(models)


def _search(section: Any) -> dict[str, Any]:
    section = {} if section is None else _check_type("search", section, Mapping, "a mapping")
    _check_fields("search", section, list(SEARCH_FIELDS))
    resolved = {}
    for key, default in SEARCH_FIELDS.items():
        path = f"search.{key}"
        if isinstance(default, tuple):
            value = section.get(key, default[0])
            if value not in default:
                raise _fail(path, f"must be one of {', '.join(filter(None, default))}, got {value!r}")
        elif key == "metric":
            value = section.get(key)
            if value is not None:
                _check_type(path, value, str, "a metric name such as average/accuracy")
        elif isinstance(default, float):
            value = section.get(key, default)
            _check_type(path, value, (int, float), "a number")
            if isinstance(value, bool) or value < 0:
                raise _fail(path, f"must be a number ≥ 0, got {value!r}")
        else:
            value = section.get(key, default)
            if value is not None or key != "max_concurrent":
                _check_type(path, value, int, "an integer")
                least = {"max_failures": 0, "seed": 0, "reduction_factor": 2}.get(key, 1)
                if value < least:
                    raise _fail(path, f"must be ≥ {least}, got {value}")
        resolved[key] = value
    return resolved


def _resources(section: Any) -> dict[str, float]:
    section = {} if section is None else _check_type("resources", section, Mapping, "a mapping")
    _check_fields("resources", section, ["gpu", "cpu"])
    resolved = {"gpu": section.get("gpu", 0), "cpu": section.get("cpu", 1)}
    for key, value in resolved.items():
        _check_type(f"resources.{key}", value, (int, float), "a number")
        if value < 0 or (key == "cpu" and value == 0):
            raise _fail(f"resources.{key}", f"must be {'> 0' if key == 'cpu' else '≥ 0'}, got {value}")
        if key == "gpu" and value > 1 and value != int(value):
            raise _fail("resources.gpu", f"a fraction must be below 1, or a whole number of GPUs; got {value}")
    return resolved


def parse_space(document: Mapping[str, Any], name: str) -> SweepSpec:
    """Validate a space document (after --set); every error names its key path."""
    _check_fields("space", document, TOP_LEVEL)
    for key in ("model_pool", "task_pool", "method"):
        if key not in document:
            raise _fail(key, "missing")
    name = document.get("name", name)
    _check_type("name", name, str, "a string")
    blocks = document["method"]
    if isinstance(blocks, list):
        if not blocks:
            raise _fail("method", "empty list of methods")
        methods = [_method_block(f"method[{i}]", b) for i, b in enumerate(blocks)]
    else:
        methods = [_method_block("method", blocks)]
    search = _search(document.get("search"))
    model_pool, task_pool = checked_pools(document)
    spec = SweepSpec(name=name, document=copy.deepcopy(dict(document)), model_pool=model_pool, task_pool=task_pool,
                     methods=methods, search=search,
                     resources=_resources(document.get("resources")), tracking={})
    tracking = document.get("tracking") or {}
    _check_type("tracking", tracking, Mapping, "a mapping")
    _check_fields("tracking", tracking, ["experiment", "save_model"])
    spec.tracking = {"experiment": _check_type("tracking.experiment", tracking.get("experiment", f"smile-{name}"),
                                               str, "a string"),
                     "save_model": _check_type("tracking.save_model", tracking.get("save_model", False), bool,
                                               "true or false")}
    if len(methods) > 1 and spec.searched:
        raise _fail("method", "random distributions and choices need a single method block (grids may have many)")
    if search["algorithm"] == "grid" and spec.searched:
        raise _fail("search.algorithm", "grid search cannot sample choices or distributions; use random or optuna")
    if search["algorithm"] == "optuna" and len(methods) > 1:
        raise _fail("search.algorithm", "optuna searches a single method block")
    from smile_ray.methods import get_method

    experts = spec.model_pool.expert_names()
    for i, block in enumerate(methods):
        get_method(block["name"]).check_pool(candidates(block), experts, "method" if len(methods) == 1
                                             else f"method[{i}]")
    search["metric"], search["mode"] = _objective(search, spec.task_pool.scores())
    if search["scheduler"] == "halving" and not spec.task_pool.sample_slices:
        from smile_ray.kinds import task_pool_kinds

        able = ", ".join(kind for kind, config in task_pool_kinds().items() if config.sample_slices)
        raise _fail("search.scheduler", f"halving evaluates samples in rungs, which task pool kind "
                                        f"'{spec.task_pool.kind}' cannot (kinds that can: {able})")
    return spec


def reported_metrics(scores: Mapping[str, TaskScores]) -> dict[str, str | None]:
    """Every number a trial reports → whether higher ("max") or lower ("min") is better (None: not declared): each
    task's metrics as its task pool declares them, the average of each metric all tasks share, "average/score"
    (the mean of the tasks' primary metrics), and the report's model_info/… and timings/… numbers."""
    from smile_ray.report import MODEL_INFO_NUMBERS, TIMINGS

    reported: dict[str, str | None] = {f"{task}/{name}": s.mode(name) for task, s in scores.items() for name in s.names}
    if scores:
        first = next(iter(scores.values()))
        reported.update({f"average/{name}": first.mode(name) for name in first.names
                         if all(name in s.names for s in scores.values())})
        reported["average/score"] = "max"
    reported.update({f"model_info/{key}": None for key in MODEL_INFO_NUMBERS})
    reported.update({f"timings/{key}": None for key in TIMINGS})
    return reported


def _objective(search: Mapping[str, Any], scores: Mapping[str, TaskScores]) -> tuple[str, str]:
    """search.metric (default: average/accuracy where every task reports accuracy, else average/score; with no
    tasks, model_info/all_params, smallest first), checked against what trials report, and search.mode (default: the
    metric's declared direction), checked against it."""
    reported = reported_metrics(scores)
    if not scores and not search["metric"]:
        return "model_info/all_params", search["mode"] or "min"
    metric = search["metric"] or ("average/accuracy" if "average/accuracy" in reported else "average/score")
    if metric not in reported:
        averages = ", ".join(key for key in reported if key.startswith("average/"))
        names = sorted({name for s in scores.values() for name in s.names})
        raise _fail("search.metric", f"unknown metric {metric!r}: expected {averages}, <task>/{'|'.join(names)}, "
                                     f"model_info/<count> or timings/<step>_seconds (tasks: {', '.join(scores)})")
    declared = reported[metric]
    mode = search["mode"] or declared or "max"
    if declared is not None and mode != declared:
        raise _fail("search.mode", f"{metric} is better when {'higher' if declared == 'max' else 'lower'}: "
                                   f"mode {declared}, not {mode}")
    return metric, mode


def load_space(space: str | Path, overrides: Sequence[str] = ()) -> SweepSpec:
    """Read, override and validate a search space (a path or a shipped name)."""
    path = resolve_space_path(space)
    document = apply_overrides(load_yaml(path), overrides)
    return parse_space(document, path.stem)
