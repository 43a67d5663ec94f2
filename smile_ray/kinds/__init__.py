"""Model-pool and task-pool kinds: what a space's `model_pool: {kind: …}` and `task_pool: {kind: …}` can name.

A kind is a config class that reads and checks its own YAML section (unknown keys, types, values: a one-line
SmileError naming the key path) and names, by dotted path, the function that loads it. Config classes import no
torch, so a space is validated before the model stack loads. Every module of this package is imported on first
lookup, so adding a kind is one module here that registers its config class, plus a space that names it:

    @register_model_pool("clip_vision", loader="smile_ray.pools.clip_vision:load_pool")
    @dataclass(frozen=True)
    class ClipVisionConfig(ModelPoolConfig):
        base: str
        experts: dict[str, str]

        @classmethod
        def parse(cls, section: Section) -> "ClipVisionConfig": ...

A model pool's loader takes its config and returns the pool (`expert_names`, `load_base()`, `load_expert(name)`);
a task pool's takes its config and the loaded model pool and returns the evaluator (`tasks`, `prepare()`, `device`,
`evaluate(model, on_task_done=…)`).
"""
from __future__ import annotations

import importlib
import pkgutil
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol, TypeVar

from smile_ray.errors import SmileError
from smile_ray.sources import Source

REQUIRED = object()
C = TypeVar("C", bound="PoolConfig")


class Section:
    """One YAML section of a space, read key by key; every error is one line naming the key path."""

    def __init__(self, data: Any, path: str, known: Sequence[str]) -> None:
        if not isinstance(data, Mapping):
            raise SmileError(f"{path}: expected a mapping, got {data!r}")
        for key in data:
            if key not in known:
                raise SmileError(f"{path}.{key}: unknown key (known: {', '.join(known)})")
        self.data, self.path = dict(data), path

    def where(self, key: str) -> str:
        return f"{self.path}.{key}"

    def get(self, key: str, kind: type | tuple[type, ...], what: str, default: Any = REQUIRED, *,
            minimum: int | None = None, choices: Sequence[Any] | None = None) -> Any:
        """The value at `key`, checked: of `kind` (bool is no int), at least `minimum`, one of `choices`; `default`
        when absent (REQUIRED: absent is an error). None is accepted where the default is None."""
        if key not in self.data:
            if default is REQUIRED:
                raise SmileError(f"{self.where(key)}: missing ({what})")
            return default
        value = self.data[key]
        if value is None and default is None:
            return None
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
            raise SmileError(f"{self.where(key)}: expected {what}, got {value!r}")
        if minimum is not None and value < minimum:
            raise SmileError(f"{self.where(key)}: must be at least {minimum}, got {value}")
        if choices is not None and value not in choices:
            raise SmileError(f"{self.where(key)}: unknown {key} {value!r} (known: {', '.join(map(str, choices))})")
        return value


def task_entries(section: Section, known: Sequence[str], default: tuple | None = None, *,
                 fields: Sequence[str] = (), required: Sequence[str] = (), strings: Sequence[str] = (),
                 mapped_names_known: bool = False) -> tuple | None:
    """`tasks:` a non-empty list of task names from `known`, or (where `fields` are given) mappings holding `required`
    and other `fields` (those in `strings` as strings; with `mapped_names_known`, a mapping's name from `known`
    too); no name twice. `default` when absent."""
    tasks = section.get("tasks", list, "a list of tasks", default)
    if tasks is default:
        return default
    if not tasks:
        raise SmileError(f"{section.where('tasks')}: empty list")
    or_mapping = ", or a mapping" if fields else ""
    names = []
    for i, entry in enumerate(tasks):
        where = f"{section.where('tasks')}[{i}]"
        if isinstance(entry, Mapping) and fields:
            for key, value in entry.items():
                if key not in fields:
                    raise SmileError(f"{where}.{key}: unknown key (known: {', '.join(fields)})")
                if key in strings and value is not None and not isinstance(value, str):
                    raise SmileError(f"{where}.{key}: expected a string, got {value!r}")
            for key in required:
                if key not in entry:
                    raise SmileError(f"{where}.{key}: missing")
            name = entry["name"]
            if not mapped_names_known:
                names.append(str(name))
                continue
        elif isinstance(entry, str):
            name = entry
        else:
            raise SmileError(f"{where}: expected a task name{or_mapping}, got {entry!r}")
        if name not in known:
            raise SmileError(f"{where}: unknown task {name!r} (known: {', '.join(known)}{or_mapping})")
        names.append(name)
    if len(set(names)) != len(names):
        raise SmileError(f"{section.where('tasks')}: a task is listed twice in {names}")
    return tuple(dict(entry) if isinstance(entry, Mapping) else entry for entry in tasks)


@dataclass(frozen=True)
class TaskScores:
    """What one task reports: its metric names, the primary one (the task's score), and whether higher is better.
    Every other metric of the task is better when lower (a loss) unless it is listed in `higher`."""

    names: tuple[str, ...]
    primary: str
    higher: tuple[str, ...] = ()

    def mode(self, metric: str) -> str:
        return "max" if metric == self.primary or metric in self.higher else "min"


class PoolConfig(ABC):
    """A kind's validated section. Subclasses are frozen dataclasses registered with `register_*_pool`."""

    kind: ClassVar[str]
    loader: ClassVar[str]                         # "module:function" that loads it
    keys: ClassVar[tuple[str, ...]] = ()          # the keys its section may hold (besides kind)

    @classmethod
    @abstractmethod
    def parse(cls: type[C], section: Section) -> C:
        """The config a section describes (unknown keys are refused by Section before this is called)."""

    def sources(self) -> list[Source]:
        """Models and datasets to check before anything loads (smile_ray.sources.check_sources)."""
        return []

    def check(self) -> None:
        """A kind's own checks before anything loads, after its sources' (may import its libraries, not torch)."""

    def load(self, *args: Any) -> Any:
        module, _, function = self.loader.partition(":")
        return getattr(importlib.import_module(module), function)(self, *args)


class ModelPoolConfig(PoolConfig):
    @abstractmethod
    def expert_names(self) -> list[str]:
        """The experts' names, in pool order."""

    def with_tasks(self, tasks: TaskPoolConfig) -> ModelPoolConfig:
        """This pool as it pairs with `tasks` (a kind that shares settings with its task pool overrides it)."""
        return self


class TaskPoolConfig(PoolConfig):
    # the pool evaluates any slice of each task's samples, with metrics that are means over samples (so a sweep can
    # score a configuration on the first samples and stop it early: `search.scheduler: halving`)
    sample_slices: ClassVar[bool] = False

    @abstractmethod
    def scores(self) -> dict[str, TaskScores]:
        """Task name → what it reports, in evaluation order."""

    def with_models(self, models: ModelPoolConfig) -> TaskPoolConfig:
        """This pool as it pairs with `models`."""
        return self


class ModelPool(Protocol):
    """What a model-pool kind's loader returns."""

    expert_names: list[str]

    def load_base(self) -> Any: ...

    def load_expert(self, name: str) -> Any: ...


class TaskPool(Protocol):
    """What a task-pool kind's loader returns. `evaluate` returns {task: {metric: value}} for every task (and may
    add an "average"), calling on_task_done(task, metrics, results so far) after each. A pool whose config has
    `sample_slices` also takes `rows` (a slice of each task's samples; tasks without samples there are left out of
    the results) and answers `sample_counts()` (task → its number of samples)."""

    tasks: Sequence[Any]
    device: Any

    def prepare(self) -> None: ...

    def evaluate(self, model: Any, *, on_task_done: Callable[[str, dict, dict], None] | None = None) -> dict: ...


MODEL_POOLS: dict[str, type[ModelPoolConfig]] = {}
TASK_POOLS: dict[str, type[TaskPoolConfig]] = {}


def _register(registry: dict[str, type], kind: str, loader: str) -> Callable[[type[C]], type[C]]:
    def register(config_class: type[C]) -> type[C]:
        if kind in registry and registry[kind] is not config_class:
            raise ValueError(f"kind {kind!r} is registered twice ({registry[kind].__name__}, {config_class.__name__})")
        config_class.kind, config_class.loader = kind, loader
        registry[kind] = config_class
        return config_class
    return register


def register_model_pool(kind: str, *, loader: str) -> Callable[[type[C]], type[C]]:
    return _register(MODEL_POOLS, kind, loader)


def register_task_pool(kind: str, *, loader: str) -> Callable[[type[C]], type[C]]:
    return _register(TASK_POOLS, kind, loader)


_imported = False


def _import_kinds() -> None:
    """Import every module of this package once: each registers its kinds."""
    global _imported
    if not _imported:
        for module in pkgutil.iter_modules(__path__):
            importlib.import_module(f"{__name__}.{module.name}")
        _imported = True


def parse_pool(section: Any, path: str) -> PoolConfig:
    """The validated config of a `model_pool` or `task_pool` section (path names which)."""
    _import_kinds()
    registry: dict[str, type[PoolConfig]] = MODEL_POOLS if path == "model_pool" else TASK_POOLS
    if not isinstance(section, Mapping):
        raise SmileError(f"{path}: expected a mapping, got {section!r}")
    kind = section.get("kind")
    if not isinstance(kind, str) or kind not in registry:
        raise SmileError(f"{path}.kind: unknown kind {kind!r} (known: {', '.join(sorted(registry))})")
    config_class = registry[kind]
    return config_class.parse(Section({k: v for k, v in section.items() if k != "kind"}, path,
                                      known=config_class.keys))


def model_pool_kinds() -> dict[str, type[ModelPoolConfig]]:
    _import_kinds()
    return dict(MODEL_POOLS)


def task_pool_kinds() -> dict[str, type[TaskPoolConfig]]:
    _import_kinds()
    return dict(TASK_POOLS)
