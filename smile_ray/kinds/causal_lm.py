"""`model_pool: {kind: causal_lm}`: a pretrained decoder-only language model (Mistral, Llama, Qwen2) and named
fine-tuned experts of its architecture, as hub ids or local `save_pretrained` directories (FusionBench's
CausalLMPool). Models are never loaded whole for SMILE: the upscale reads the base and the experts tensor by tensor
from their safetensors files, so it needs the memory of one model, not T + 2."""
from __future__ import annotations

from dataclasses import dataclass

from smile_ray.kinds import register_model_pool
from smile_ray.kinds.transformers_pool import TransformersPoolConfig
from smile_ray.sources import Source

CAUSAL_LM_TYPES = ("mistral", "llama", "qwen2")     # the architectures with a SMILE variant (modeling_smile.py)


@register_model_pool("causal_lm", loader="smile_ray.pools.causal_lm:load_pool")
@dataclass(frozen=True)
class CausalLMConfig(TransformersPoolConfig):
    keys = tuple(key for key in TransformersPoolConfig.keys if key != "allow_pickle")   # safetensors only

    def sources(self) -> list[Source]:
        """The base (a causal LM of a supported architecture), every expert (the base's architecture and shapes:
        hidden size, vocabulary, layers), and the tokenizer."""
        common = {"revision": self.revision, "allow_pickle": None}      # streamed from safetensors, never unpickled
        return [Source("model_pool.base", self.base, role="base", model_types=CAUSAL_LM_TYPES, **common),
                *(Source(f"model_pool.experts.{name}", location, role="expert", **common)
                  for name, location in self.experts.items()),
                self.tokenizer_source()]
