"""`model_pool: {kind: causal_lm}`: a pretrained decoder-only language model (Mistral, Llama, Qwen2) and named
fine-tuned experts of its architecture, as hub ids or local `save_pretrained` directories (FusionBench's
CausalLMPool). Models are never loaded whole for SMILE: the upscale reads the base and the experts tensor by tensor
from their safetensors files, so it needs the memory of one model, not T + 2."""
from __future__ import annotations

from dataclasses import dataclass, field

from smile_ray.errors import SmileError
from smile_ray.kinds import ModelPoolConfig, Section, register_model_pool
from smile_ray.kinds.clip_vision import checked_experts, dtype_name
from smile_ray.sources import Source

CAUSAL_LM_TYPES = ("mistral", "llama", "qwen2")     # the architectures with a SMILE variant (modeling_smile.py)


@register_model_pool("causal_lm", loader="smile_ray.pools.causal_lm:load_pool")
@dataclass(frozen=True)
class CausalLMConfig(ModelPoolConfig):
    base: str                                     # hub id or directory of the pretrained model
    experts: dict[str, str] = field(default_factory=dict)      # name → fine-tuned model (hub id or directory)
    dtype: str = "float32"
    revision: str | None = None
    tokenizer: str | None = None                  # default: the base's

    keys = ("base", "experts", "dtype", "revision", "tokenizer")

    @classmethod
    def parse(cls, section: Section) -> CausalLMConfig:
        base = section.get("base", str, "a hub id or a directory")
        if not base:
            raise SmileError(f"{section.where('base')}: expected a hub id or a directory, got ''")
        return cls(base=base, experts=checked_experts(section),
                   dtype=dtype_name(section.get("dtype", str, "a dtype name", "float32"), section.where("dtype")),
                   revision=section.get("revision", str, "a branch, tag or commit", None),
                   tokenizer=section.get("tokenizer", str, "a hub id or a directory", None))

    def expert_names(self) -> list[str]:
        return list(self.experts)

    def sources(self) -> list[Source]:
        """The base (a causal LM of a supported architecture), every expert (the base's architecture and shapes:
        hidden size, vocabulary, layers), and the tokenizer."""
        tokenizer = self.tokenizer or self.base
        field_name = "model_pool.tokenizer" if self.tokenizer else "model_pool.base (its tokenizer)"
        return [Source("model_pool.base", self.base, revision=self.revision, role="base", model_types=CAUSAL_LM_TYPES),
                *(Source(f"model_pool.experts.{name}", location, revision=self.revision, role="expert")
                  for name, location in self.experts.items()),
                Source(field_name, tokenizer, revision=self.revision, role="tokenizer")]
