"""The merge methods a configuration can name, each declaring its parameters in one place.

A method turns a pretrained model and its experts into one model. `Method.resolve` checks a
`method:` mapping (unknown keys, wrong types, bad values) and fills defaults, so that a bad
configuration fails with one line before any model is loaded.
"""
from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from smile_ray.errors import SmileError
from smile_ray.smile import individual, projection_merge, simple_average, task_arithmetic, upscale
from smile_ray.smile.projection import SPACES
from smile_ray.smile.svd import SOLVERS

REQUIRED = object()


@dataclass(frozen=True)
class Param:
    """One method parameter: name, type, default (REQUIRED if none) and a one-line help."""

    name: str
    kind: type
    default: Any = REQUIRED
    help: str = ""
    check: Callable[[Any], str | None] | None = None     # returns a complaint, or None when the value is fine
    label: Callable[[Any], str] | None = None            # how a run name shows the value ("" or None: not shown)

    def validate(self, value: Any, where: str) -> Any:
        if self.kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if value is not None or self.default is not None:
            ok = isinstance(value, self.kind) and not (self.kind is int and isinstance(value, bool))
            if not ok:
                raise SmileError(f"{where}: expected {self.kind.__name__}, got {value!r}")
        complaint = self.check(value) if self.check and value is not None else None
        if complaint:
            raise SmileError(f"{where}: {complaint}, got {value!r}")
        return value


def positive(value: int) -> str | None:
    return None if value > 0 else "must be positive"


def nonzero(value: int) -> str | None:
    return None if value != 0 else "must be a positive rank or negative (dense / automatic)"


def strings(value: list) -> str | None:
    return None if all(isinstance(v, str) for v in value) else "must be a list of module-name patterns"


def names(value: list) -> str | None:
    if not value or not all(isinstance(v, str) for v in value) or len(set(value)) != len(value):
        return "must be a non-empty list of the pool's expert names, each once"
    return None


def experts_param(verb: str) -> Param:
    """`experts`: the subset of the pool a configuration uses (default: all); a searched dimension chooses among
    subsets, e.g. `experts: {grid: [[math], [code], [math, code]]}` (the reference's model-pool versions)."""
    return Param("experts", list, None, f"the pool's experts to {verb} (default: all)", names,
                 lambda v: "+".join(v) if v else "")


Merge = Callable[..., nn.Module]
Candidates = Mapping[str, Sequence[Any]]          # parameter → every value a space may give it


@dataclass(frozen=True)
class Prefill:
    """SVDs that every trial of a method slices, computed once per sweep before the trials start.

    plan(blocks): from a space's blocks of this method (values are constants or the largest a search can draw),
    the keyword arguments of each computation to run; `per_expert`: once per expert of the pool (else once, on the
    pretrained model alone); compute(base, expert, *, svd_cache, device, **entry) does one and returns what it
    computed (`svd_computed`, `svd_seconds`)."""

    plan: Callable[[list[dict[str, Any]]], list[dict[str, Any]]]
    compute: Callable[..., Any]
    per_expert: bool = True


@dataclass(frozen=True)
class Method:
    """A merge method: its parameters, which experts it needs, how it merges, and what a sweep shows of it."""

    name: str
    help: str
    params: tuple[Param, ...]
    merge: Merge                                  # (base, experts: dict, *, svd_cache, device, **params)
    single_model: bool = False                    # uses only the expert named by its `model` parameter
    columns: tuple[str, ...] = ()                 # parameters shown in the sweep's live and ranked tables
    grid_axes: tuple[str, str] | None = None      # (rows, columns) of the sweep's heatmap of the score
    prefill: Prefill | None = None

    def resolve(self, given: Mapping[str, Any], prefix: str = "method") -> dict[str, Any]:
        """Validated parameters with defaults filled in (`given` excludes the `name` key)."""
        known = {p.name: p for p in self.params}
        for key in given:
            if key not in known:
                raise SmileError(f"{prefix}.{key}: unknown parameter of method '{self.name}' "
                                 f"(known: {', '.join(known) or 'none'})")
        resolved = {}
        for param in self.params:
            if param.name not in given and param.default is REQUIRED:
                raise SmileError(f"{prefix}.{param.name}: required by method '{self.name}' ({param.help})")
            resolved[param.name] = param.validate(given.get(param.name, param.default), f"{prefix}.{param.name}")
        return resolved

    def describe(self, params: Mapping[str, Any]) -> str:
        """A few words that tell this configuration from the others of a sweep: "smile gk16 k32",
        "individual sun397", "task_arithmetic λ0.3" (MLflow run names, plot legends)."""
        words = [self.name]
        for param in self.params:
            if param.label is not None and param.name in params:
                words.append(param.label(params[param.name]))
        return " ".join(word for word in words if word)

    def check_pool(self, candidates: Candidates, experts: Sequence[str], where: str = "method") -> None:
        """What depends on the pool: `experts` subsets of it, top_k at most the number of experts merged, `model`
        one of them or 'pretrained'."""
        subsets = [subset or list(experts) for subset in candidates.get("experts", [None])]
        for subset in subsets:
            unknown = [name for name in subset if name not in experts]
            if unknown:
                raise SmileError(f"{where}.experts: unknown expert {unknown[0]!r} (the pool has {', '.join(experts)})")
        fewest = min(len(subset) for subset in subsets)
        largest = max(candidates.get("top_k", [1]))
        if largest > fewest:
            raise SmileError(f"{where}.top_k: must be at most the number of experts ({fewest}), got {largest}")
        for model in candidates.get("model", []) if self.single_model else []:
            if model != "pretrained" and model not in experts:
                raise SmileError(f"{where}.model: unknown model {model!r}; choose 'pretrained' or one of "
                                 f"{', '.join(experts)}")

    def apply(self, base: Any, experts: Mapping[str, Any], params: Mapping[str, Any], *, svd_cache: Any,
              device: Any) -> nn.Module:
        """The merged model of `experts` (those `needed_experts` chose, which is all the `experts` parameter is
        for) with the other parameters."""
        return self.merge(base, experts, svd_cache=svd_cache, device=device,
                          **{key: value for key, value in params.items() if key != "experts"})

    def needed_experts(self, params: Mapping[str, Any], names: list[str]) -> list[str]:
        """The experts this configuration reads (a single model loads one, or none for 'pretrained'), after
        checking it against the pool."""
        self.check_pool({key: [value] for key, value in params.items()}, names)
        if not self.single_model:
            return list(params.get("experts") or names)
        return [] if params["model"] == "pretrained" else [params["model"]]


def _smile(base, experts, *, svd_cache, device, **params):
    return upscale(base, experts, svd_cache=svd_cache, device=device, **params)


def _simple_average(base, experts, *, svd_cache, device):
    return simple_average(base, experts)


def _task_arithmetic(base, experts, *, svd_cache, device, scaling):
    return task_arithmetic(base, experts, scaling=scaling)


def _individual(base, experts, *, svd_cache, device, model):
    return individual(base, experts, model=model)


def _projection(base, experts, *, svd_cache, device, model, **params):
    if model == "pretrained":
        raise SmileError("method.model: projection merging needs a fine-tuned model, not 'pretrained'")
    return projection_merge(base, experts[model], svd_cache=svd_cache, device=device, **params)


def largest_smile_ranks(blocks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The upscales whose SVDs every SMILE trial of a space slices: the largest gate_k and k per routing variant."""
    plan: dict[tuple[bool, str], dict[str, int]] = {}
    for block in blocks:
        for variant in itertools.product(block["routing_use_diff"], block["svd_solver"]):
            entry = plan.setdefault(variant, {"gate_k": 1, "k": 1})
            entry["gate_k"] = max(entry["gate_k"], *block["gate_k"])
            entry["k"] = max(entry["k"], *block["k"])
    return [{"routing_use_diff": use_diff, "svd_solver": solver, **ranks}
            for (use_diff, solver), ranks in plan.items()]


def _smile_prefill(base, expert, *, svd_cache, device, **entry):
    return upscale(base, [expert], svd_cache=svd_cache, device=device, **entry).smile_info


def _projection_prefill(base, expert, *, svd_cache, device):
    return projection_merge(base, base, svd_cache=svd_cache, device=device).smile_info     # W0's SVDs


METHODS: dict[str, Method] = {m.name: m for m in [
    Method("smile", "SMILE upscaling: sparse mixture of low-rank experts from task-vector SVDs", (
        Param("gate_k", int, REQUIRED, "router rank per expert", positive, lambda v: f"gk{v}"),
        Param("k", int, REQUIRED, "expert rank; negative for dense experts", nonzero,
              lambda v: "dense" if v < 0 else f"k{v}"),
        Param("top_k", int, 1, "experts per token", positive, lambda v: f"top{v}" if v != 1 else ""),
        Param("routing_use_diff", bool, True, "route with the SVD of ΔW (true) or of W (false)",
              label=lambda v: "" if v else "W-routing"),
        Param("average_experts", bool, False, "average non-linear parameters over the experts",
              label=lambda v: "averaged" if v else ""),
        Param("targets", list, None, "module-name patterns of the linears to upscale (default: all)", strings,
              lambda v: f"targets={','.join(v)}" if v else ""),
        experts_param("upscale"),
        Param("svd_solver", str, "exact", f"how the task vectors' SVDs are computed: {' or '.join(SOLVERS)}",
              lambda v: None if v in SOLVERS else f"must be one of {', '.join(SOLVERS)}",
              lambda v: "" if v == "exact" else v),
    ), _smile, columns=("gate_k", "k", "top_k"), grid_axes=("gate_k", "k"),
        prefill=Prefill(largest_smile_ranks, _smile_prefill)),
    Method("simple_average", "mean of the fine-tuned models' weights", (experts_param("average"),),
           _simple_average, columns=("experts",)),
    Method("task_arithmetic", "θ0 + λ Σ (θᵢ − θ0)", (
        Param("scaling", float, 0.3, "λ, the task-vector scaling", label=lambda v: f"λ{v:g}"),
        experts_param("merge")), _task_arithmetic, columns=("scaling", "experts")),
    Method("individual", "one model of the pool as is", (
        Param("model", str, "pretrained", "expert name, or 'pretrained'", label=str),), _individual,
        single_model=True, columns=("model",)),
    Method("projection", "singular projection merging of one fine-tuned model (Space I / II / II+III)", (
        Param("model", str, REQUIRED, "the fine-tuned expert to project", label=str),
        Param("space", str, "II+III", f"one of {', '.join(SPACES)}",
              lambda v: None if v in SPACES else f"must be one of {', '.join(SPACES)}", str),
        Param("k", int, -1, "split rank; negative: half the singular-value mass", nonzero,
              lambda v: f"k{v}" if v > 0 else ""),
        Param("targets", list, None, "module-name patterns of the linears to project (default: all)", strings,
              lambda v: f"targets={','.join(v)}" if v else ""),
    ), _projection, single_model=True, columns=("model", "space", "k"),
        prefill=Prefill(lambda blocks: [{}], _projection_prefill, per_expert=False)),
]}


def get_method(name: Any) -> Method:
    """The method called `name`, or a SmileError listing the known ones."""
    if not isinstance(name, str) or name not in METHODS:
        raise SmileError(f"method.name: unknown method {name!r} (known: {', '.join(METHODS)})")
    return METHODS[name]


def describe(method: Mapping[str, Any]) -> str:
    """`Method.describe` of a `method:` section ({"name": …, parameters}); its name alone for an unknown method."""
    name = method.get("name")
    return METHODS[name].describe(method) if isinstance(name, str) and name in METHODS else str(name or "")
