"""`model_pool: {kind: clip_vision}`: a pretrained CLIP vision tower and named fine-tuned experts, each a hub id or a
local `save_pretrained` directory (FusionBench's CLIPVisionModelPool)."""
from __future__ import annotations

from dataclasses import dataclass, field

from smile_ray.errors import SmileError
from smile_ray.kinds import ModelPoolConfig, Section, register_model_pool
from smile_ray.sources import Source

CLIP_MODEL_TYPES = ("clip", "clip_vision_model")       # a full CLIPModel checkpoint holds the vision tower too
DTYPE_NAMES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
               "float16": "float16", "fp16": "float16"}


def dtype_name(value: str, where: str) -> str:
    """"float32" / "bfloat16" / "float16" from any of their names ("bf16", "torch.float16", …)."""
    name = value.removeprefix("torch.") if isinstance(value, str) else None
    if name not in DTYPE_NAMES:
        raise SmileError(f"{where}: unknown dtype {value!r} (use float32, bfloat16 or float16)")
    return DTYPE_NAMES[name]


def checked_experts(section: Section) -> dict[str, str]:
    """`experts: {name: hub id or directory}`, names and places non-empty strings."""
    experts = section.get("experts", dict, "a mapping name -> model")
    if not experts:
        raise SmileError(f"{section.where('experts')}: no experts")
    for name, source in experts.items():
        if not isinstance(name, str) or not name:
            raise SmileError(f"{section.where('experts')}: expert names must be non-empty strings, got {name!r}")
        if not isinstance(source, str) or not source:
            raise SmileError(f"{section.where('experts')}.{name}: expected a hub id or a directory, got {source!r}")
    return dict(experts)


@register_model_pool("clip_vision", loader="smile_ray.pools.clip_vision:load_pool")
@dataclass(frozen=True)
class ClipVisionConfig(ModelPoolConfig):
    base: str                                     # hub id or directory of a CLIPVisionModel or a full CLIPModel
    experts: dict[str, str] = field(default_factory=dict)      # name → hub id or directory, in pool order
    dtype: str = "float32"
    revision: str | None = None                   # hub revision of every hub id (directories ignore it)
    allow_pickle: bool = False                    # load pytorch_model.bin checkpoints (pickle can run code)

    keys = ("base", "experts", "dtype", "torch_dtype", "revision", "allow_pickle")

    @classmethod
    def parse(cls, section: Section) -> ClipVisionConfig:
        if "dtype" in section.data and "torch_dtype" in section.data:
            raise SmileError(f"{section.where('torch_dtype')}: give either dtype or torch_dtype, not both")
        dtype_key = "torch_dtype" if "torch_dtype" in section.data else "dtype"
        base = section.get("base", str, "a hub id or a directory")
        if not base:
            raise SmileError(f"{section.where('base')}: expected a hub id or a directory, got ''")
        return cls(base=base, experts=checked_experts(section),
                   dtype=dtype_name(section.get(dtype_key, str, "a dtype name", "float32"), section.where(dtype_key)),
                   revision=section.get("revision", str, "a branch, tag or commit", None),
                   allow_pickle=section.get("allow_pickle", bool, "true or false", False))

    def expert_names(self) -> list[str]:
        return list(self.experts)

    def sources(self) -> list[Source]:
        common = {"revision": self.revision, "model_types": CLIP_MODEL_TYPES, "allow_pickle": self.allow_pickle}
        return [Source("model_pool.base", self.base, role="base", **common),
                *(Source(f"model_pool.experts.{name}", location, role="expert", **common)
                  for name, location in self.experts.items())]
