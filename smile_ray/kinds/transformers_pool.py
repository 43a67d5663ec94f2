"""The section shared by the model pools of Hugging Face language models (seq2seq, causal_lm): a base and named
experts, each a hub id or a local `save_pretrained` directory, with dtype, revision and tokenizer."""
from __future__ import annotations

from dataclasses import dataclass, field

from smile_ray.errors import SmileError
from smile_ray.kinds import ModelPoolConfig, Section
from smile_ray.kinds.clip_vision import checked_experts, dtype_name
from smile_ray.sources import Source


@dataclass(frozen=True)
class TransformersPoolConfig(ModelPoolConfig):
    base: str                                     # hub id or directory of the pretrained model
    experts: dict[str, str] = field(default_factory=dict)      # name → hub id or directory
    dtype: str = "float32"
    revision: str | None = None
    tokenizer: str | None = None                  # default: the base's
    allow_pickle: bool = False                    # load pytorch_model.bin checkpoints (pickle can run code)

    keys = ("base", "experts", "dtype", "revision", "tokenizer", "allow_pickle")

    @classmethod
    def parse(cls, section: Section) -> TransformersPoolConfig:
        base = section.get("base", str, "a hub id or a directory")
        if not base:
            raise SmileError(f"{section.where('base')}: expected a hub id or a directory, got ''")
        return cls(base=base, experts=checked_experts(section),
                   dtype=dtype_name(section.get("dtype", str, "a dtype name", "float32"), section.where("dtype")),
                   revision=section.get("revision", str, "a branch, tag or commit", None),
                   tokenizer=section.get("tokenizer", str, "a hub id or a directory", None),
                   allow_pickle=section.get("allow_pickle", bool, "true or false", False))

    def expert_names(self) -> list[str]:
        return list(self.experts)

    def tokenizer_source(self) -> Source:
        """The tokenizer (a directory must hold one): `tokenizer`, else the base's."""
        field_name = "model_pool.tokenizer" if self.tokenizer else "model_pool.base (its tokenizer)"
        return Source(field_name, self.tokenizer or self.base, revision=self.revision, role="tokenizer")
