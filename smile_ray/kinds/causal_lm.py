"""`model_pool: {kind: causal_lm}`: a pretrained decoder-only language model (Mistral, Llama, Qwen2) and named
fine-tuned experts of its architecture, as hub ids or local `save_pretrained` directories (FusionBench's
CausalLMPool). Models are never loaded whole for SMILE: the upscale reads the base and the experts tensor by tensor
from their safetensors files, so it needs the memory of one model, not T + 2."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from smile_ray.errors import SmileError
from smile_ray.kinds import register_model_pool
from smile_ray.kinds.transformers_pool import TransformersPoolConfig
from smile_ray.sources import Source

CAUSAL_LM_TYPES = ("mistral", "llama", "qwen2")     # the architectures with a SMILE variant (modeling_smile.py)


@register_model_pool("causal_lm", loader="smile_ray.pools.causal_lm:load_pool")
@dataclass(frozen=True)
class CausalLMConfig(TransformersPoolConfig):
    def sources(self) -> list[Source]:
        """The base (a causal LM of a supported architecture), every expert (the base's architecture and shapes:
        hidden size, vocabulary, layers), and the tokenizer."""
        return [Source("model_pool.base", self.base, revision=self.revision, role="base", model_types=CAUSAL_LM_TYPES),
                *(Source(f"model_pool.experts.{name}", location, revision=self.revision, role="expert")
                  for name, location in self.experts.items()),
                self.tokenizer_source()]

    def check(self) -> None:
        """Every local model holds safetensors: the upscale reads them tensor by tensor (a pickle checkpoint would
        have to be loaded whole, and unpickling runs code)."""
        import os

        from smile_ray.sources import weight_files

        models = {"model_pool.base": self.base, **{f"model_pool.experts.{n}": d for n, d in self.experts.items()}}
        for field_name, location in models.items():
            if os.path.isdir(location) and not weight_files(Path(location)):
                raise SmileError(f"{field_name}: {location!r} holds only a pickle checkpoint (pytorch_model.bin); "
                                 "causal_lm pools read safetensors (save_pretrained writes them)")
