"""A pool of CLIP vision towers: the pretrained base and named fine-tuned experts (FusionBench's CLIPVisionModelPool).

Every entry is a hub id or a local directory. `CLIPVisionModel.from_pretrained` also reads a full `CLIPModel`
checkpoint (it takes the `vision_model.*` weights), so `base` may be e.g. `openai/clip-vit-base-patch32`.
"""
from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:   # transformers is imported when a model is loaded: validating a pool stays light
    from transformers import CLIPVisionModel

from smile_ray.errors import SmileError
from smile_ray.hub import load_pretrained
from smile_ray.kinds.clip_vision import CLIP_MODEL_TYPES, ClipVisionConfig
from smile_ray.smile.weights import check_finite_weights
from smile_ray.tasks.ta8 import TA8_TASK_NAMES, check_task_names

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16,
}

TA8_ARCHITECTURES: dict[str, str] = {
    "ViT-B/32": "clip-vit-base-patch32",
    "ViT-L/14": "clip-vit-large-patch14",
}


def resolve_dtype(value: str | torch.dtype, field_name: str = "dtype") -> torch.dtype:
    """A torch dtype from a name such as "float32" / "bf16", or a torch.dtype."""
    if isinstance(value, torch.dtype):
        if value in DTYPES.values():
            return value
    elif isinstance(value, str) and value.removeprefix("torch.") in DTYPES:
        return DTYPES[value.removeprefix("torch.")]
    raise SmileError(f"{field_name}: unknown dtype {value!r} (use float32, bfloat16 or float16)")


@dataclass
class ClipVisionPool:
    """The pretrained CLIP vision tower and the fine-tuned experts to merge into it."""

    base: str  # hub id or local dir of a CLIPVisionModel or a full CLIPModel checkpoint
    experts: dict[str, str]  # expert name -> hub id or local dir of a CLIPVisionModel; order is kept
    dtype: str | torch.dtype = "float32"  # dtype the models are loaded in
    revision: str | None = None  # hub revision (branch, tag or commit) for every hub id; ignored for dirs
    allow_pickle: bool = False  # load pytorch_model.bin checkpoints (unpickling can run code)
    field_prefix: str = "model_pool"  # how errors name this pool's fields, e.g. "model_pool.experts.mnist"

    def __post_init__(self) -> None:
        if not isinstance(self.base, str) or not self.base:
            raise SmileError(f"{self.field_prefix}.base: expected a hub id or a directory, got {self.base!r}")
        if not isinstance(self.experts, Mapping):
            raise SmileError(f"{self.field_prefix}.experts: expected a mapping name -> model, got {self.experts!r}")
        for name, source in self.experts.items():
            if not isinstance(name, str) or not name:
                raise SmileError(f"{self.field_prefix}.experts: expert names must be non-empty strings, got {name!r}")
            if not isinstance(source, str) or not source:
                raise SmileError(f"{self.field_prefix}.experts.{name}: expected a hub id or a directory, "
                                 f"got {source!r}")
        self.experts = dict(self.experts)
        self.torch_dtype = resolve_dtype(self.dtype, f"{self.field_prefix}.dtype")

    @property
    def expert_names(self) -> list[str]:
        """Expert names, in pool order."""
        return list(self.experts)

    def load_base(self) -> CLIPVisionModel:
        """The pretrained vision tower, in eval mode."""
        return load_clip_vision(self.base, field=f"{self.field_prefix}.base", dtype=self.torch_dtype,
                                revision=self.revision, allow_pickle=self.allow_pickle)

    def load_expert(self, name: str) -> CLIPVisionModel:
        """One fine-tuned vision tower, in eval mode."""
        if name not in self.experts:
            raise SmileError(f"{self.field_prefix}.experts: no expert {name!r} (have: {', '.join(self.experts)})")
        return load_clip_vision(self.experts[name], field=f"{self.field_prefix}.experts.{name}",
                                dtype=self.torch_dtype, revision=self.revision, allow_pickle=self.allow_pickle)

    def load_experts(self) -> OrderedDict[str, CLIPVisionModel]:
        """All experts, name -> model, in pool order (all are held in memory at once)."""
        return OrderedDict((name, self.load_expert(name)) for name in self.experts)


def load_pool(config: ClipVisionConfig) -> ClipVisionPool:
    """The pool a `model_pool: {kind: clip_vision}` section describes (smile_ray.kinds.clip_vision)."""
    return ClipVisionPool(base=config.base, experts=config.experts, dtype=config.dtype, revision=config.revision,
                          allow_pickle=config.allow_pickle)


def load_clip_vision(source: str, *, field: str, dtype: torch.dtype = torch.float32,
                     revision: str | None = None, allow_pickle: bool = False) -> CLIPVisionModel:
    """A `CLIPVisionModel` from a hub id or a directory, its weights finite; one-line `SmileError` naming `field` on
    failure. Safetensors only, unless `allow_pickle`."""
    from transformers import CLIPVisionModel, PretrainedConfig   # outside load_pretrained's "cannot load" errors

    def load(source: str, *, dtype: torch.dtype, **hub_kwargs) -> CLIPVisionModel:
        config, _ = PretrainedConfig.get_config_dict(source, **hub_kwargs)
        model_type = config.get("model_type")
        if model_type not in CLIP_MODEL_TYPES:
            raise ValueError(f"model_type is {model_type!r}, not a CLIP vision model")
        with _quiet_load_report():
            model, info = CLIPVisionModel.from_pretrained(source, dtype=dtype, output_loading_info=True,
                                                          use_safetensors=None if allow_pickle else True,
                                                          **hub_kwargs)
        missing = sorted(info["missing_keys"])
        if missing:  # a full CLIPModel checkpoint leaves unexpected text-tower keys (fine); missing ones are not
            raise ValueError(f"{len(missing)} weights missing from the checkpoint, e.g. {missing[0]}")
        return model.eval()

    return check_finite_weights(load_pretrained(load, source, field=field, revision=revision, dtype=dtype),
                                f"{field}: {source!r}")


@contextmanager
def _quiet_load_report() -> Iterator[None]:
    """Hide transformers' load report: loading a vision tower from a full CLIP checkpoint lists every text key."""
    logger = logging.getLogger("transformers.modeling_utils")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def ta8_pool(architecture: str = "ViT-B/32", tasks: Sequence[str] | None = None, *,
             dtype: str | torch.dtype = "float32", revision: str | None = None) -> ClipVisionPool:
    """FusionBench's TA8 model pool: `openai/<arch>` plus `tanganke/<arch>_<task>` for each task.

    `architecture` is "ViT-B/32" or "ViT-L/14" (or the repo stem, e.g. "clip-vit-large-patch14");
    `tasks` defaults to the eight TA8 tasks, in FusionBench's order.
    """
    stems = {**{stem: stem for stem in TA8_ARCHITECTURES.values()}, **TA8_ARCHITECTURES}
    if architecture not in stems:
        raise SmileError(f"architecture: unknown CLIP architecture {architecture!r} "
                         f"(known: {', '.join(TA8_ARCHITECTURES)})")
    stem = stems[architecture]
    names = check_task_names(TA8_TASK_NAMES if tasks is None else tasks)
    return ClipVisionPool(base=f"openai/{stem}", experts={name: f"tanganke/{stem}_{name}" for name in names},
                          dtype=dtype, revision=revision)
