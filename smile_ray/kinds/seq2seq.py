"""`model_pool: {kind: seq2seq}`: a pretrained encoder-decoder (`AutoModelForSeq2SeqLM`, e.g. google/flan-t5-base) and
named experts, each a fully fine-tuned model or a PEFT adapter (LoRA) made for the base, as a hub id or a local
directory (FusionBench's Seq2SeqLMPool and its LoRA pools). An adapter is merged into the base when loaded, so only
the layers it touched carry a task vector: SMILE upscales those and leaves the rest pretrained."""
from __future__ import annotations

from dataclasses import dataclass

from smile_ray.kinds import register_model_pool
from smile_ray.kinds.transformers_pool import TransformersPoolConfig
from smile_ray.sources import Source


@register_model_pool("seq2seq", loader="smile_ray.pools.seq2seq:load_pool")
@dataclass(frozen=True)
class Seq2SeqConfig(TransformersPoolConfig):
    def sources(self) -> list[Source]:
        """The base, every expert (of the base's architecture and shapes, or an adapter made for it), and the
        tokenizer (a directory must hold one)."""
        common = {"revision": self.revision, "allow_pickle": self.allow_pickle}
        return [Source("model_pool.base", self.base, role="base", **common),
                *(Source(f"model_pool.experts.{name}", location, role="expert", adapter=True, **common)
                  for name, location in self.experts.items()),
                self.tokenizer_source()]
