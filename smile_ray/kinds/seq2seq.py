"""`model_pool: {kind: seq2seq}`: a pretrained encoder-decoder (`AutoModelForSeq2SeqLM`, e.g. google/flan-t5-base) and
named experts, each a fully fine-tuned model or a PEFT adapter (LoRA) made for the base, as a hub id or a local
directory (FusionBench's Seq2SeqLMPool and its LoRA pools). An adapter is merged into the base when loaded, so only
the layers it touched carry a task vector: SMILE upscales those and leaves the rest pretrained."""
from __future__ import annotations

from dataclasses import dataclass, field

from smile_ray.errors import SmileError
from smile_ray.kinds import ModelPoolConfig, Section, register_model_pool
from smile_ray.kinds.clip_vision import checked_experts, dtype_name
from smile_ray.sources import Source


@register_model_pool("seq2seq", loader="smile_ray.pools.seq2seq:load_pool")
@dataclass(frozen=True)
class Seq2SeqConfig(ModelPoolConfig):
    base: str                                     # hub id or directory of the pretrained model
    experts: dict[str, str] = field(default_factory=dict)      # name → model or adapter (hub id or directory)
    dtype: str = "float32"
    revision: str | None = None
    tokenizer: str | None = None                  # default: the base's

    keys = ("base", "experts", "dtype", "revision", "tokenizer")

    @classmethod
    def parse(cls, section: Section) -> Seq2SeqConfig:
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
        """The base, every expert (of the base's architecture and shapes, or an adapter made for it), and the
        tokenizer (a directory must hold one)."""
        sources = [Source("model_pool.base", self.base, revision=self.revision, role="base"),
                   *(Source(f"model_pool.experts.{name}", location, revision=self.revision, role="expert", adapter=True)
                     for name, location in self.experts.items())]
        tokenizer = self.tokenizer or self.base
        field_name = "model_pool.tokenizer" if self.tokenizer else "model_pool.base (its tokenizer)"
        return [*sources, Source(field_name, tokenizer, revision=self.revision, role="tokenizer")]
