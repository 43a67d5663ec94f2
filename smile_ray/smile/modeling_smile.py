"""SMILE variants of transformers architectures: checkpoints that load anywhere with the Auto classes.

`smile_ray.smile.checkpoint.save_model` writes a SMILE model with `save_pretrained`, which copies this file and
layer.py (its one relative import) into the checkpoint and names them in config.json's `auto_map`. So

    AutoModel.from_pretrained(DIR, trust_remote_code=True)

loads it where only torch and transformers are installed. The config's `model_type` (`smile_<architecture>`) is
unknown to transformers, so an Auto class without `trust_remote_code` refuses with transformers' own message rather
than building the plain architecture with re-initialised layers.

A variant is the architecture's own config and model class with one addition: the config lists, under
`smile_layers`, every linear layer that is a SmileLinear (name → its shape: experts, gate_k, k, top_k, bias), and
the model swaps those `nn.Linear` layers for SmileLinear layers when it is built; the weights then load by name.
Everything else (attention implementation, KV cache, generation) is the installed transformers class's own.
`smile_skipped_layers` names the upscaling targets that no expert changed, which stay plain nn.Linear layers, and
the reference implementation's fields say what was asked for: `num_local_experts` (experts), `num_experts_per_tok`
(top_k), `rank_of_router` (gate_k), `rank_of_expert` (k; negative: dense experts). A layer narrower than the ranks
asked for holds its full rank; `smile_layers` has each layer's own.
This file imports only torch, transformers and `.layer`.
"""
from __future__ import annotations

from typing import Any

from torch import nn
from transformers import (CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM, MistralConfig,
                          MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM, T5Config, T5ForConditionalGeneration)

from .layer import SmileLinear


def smile_layout(model: nn.Module) -> dict[str, dict[str, Any]]:
    """name → constructor arguments of every SmileLinear in `model`."""
    return {name: {"in_features": m.in_features, "out_features": m.out_features, "num_experts": m.num_experts,
                   "gate_k": m.gate_k, "k": m.k, "top_k": m.top_k, "bias": m.expert_bias is not None}
            for name, m in model.named_modules() if isinstance(m, SmileLinear)}


def apply_layout(model: nn.Module, layout: dict[str, dict[str, Any]]) -> nn.Module:
    """Swap the named nn.Linear layers of `model` for uninitialised SmileLinear layers of those shapes (in place)."""
    for name, shape in layout.items():
        linear = model.get_submodule(name)
        if not isinstance(linear, nn.Linear) or (linear.out_features, linear.in_features) != (
                shape["out_features"], shape["in_features"]):
            raise ValueError(f"{name}: smile_layers describes a {shape['out_features']}×{shape['in_features']} "
                             f"linear layer that this architecture does not have")
        options = {key: value for key, value in shape.items() if key not in ("in_features", "out_features")}
        model.set_submodule(name, SmileLinear(linear.in_features, linear.out_features, options.pop("num_experts"),
                                              **options, device=linear.weight.device, dtype=linear.weight.dtype))
    return model


def smile_variant(config_class: type, model_class: type, auto_class: str = "AutoModel") -> tuple[type, type]:
    """(SmileConfig, SmileModel) subclasses of an architecture's config and model classes; `auto_class` is the Auto
    class that loads the model (AutoModel, AutoModelForSeq2SeqLM, …)."""

    def config_init(self, smile_layers: dict | None = None, smile_skipped_layers: list | None = None,
                    num_local_experts: int | None = None, num_experts_per_tok: int = 1, rank_of_router: int | None = None,
                    rank_of_expert: int | None = None, **kwargs: Any) -> None:
        config_class.__init__(self, **kwargs)
        self.smile_layers = dict(smile_layers or {})
        self.smile_skipped_layers = list(smile_skipped_layers or [])
        self.num_local_experts, self.num_experts_per_tok = num_local_experts, num_experts_per_tok
        self.rank_of_router, self.rank_of_expert = rank_of_router, rank_of_expert

    def model_init(self, config, *args: Any, **kwargs: Any) -> None:
        model_class.__init__(self, config, *args, **kwargs)
        apply_layout(self, config.smile_layers)

    config_name, model_name = f"Smile{config_class.__name__}", f"Smile{model_class.__name__}"
    smile_config = type(config_name, (config_class,), {
        "__init__": config_init, "__module__": __name__, "__qualname__": config_name,
        "model_type": f"smile_{config_class.model_type}"})
    smile_model = type(model_name, (model_class,), {
        "__init__": model_init, "__module__": __name__, "__qualname__": model_name, "config_class": smile_config})
    smile_config.register_for_auto_class("AutoConfig")
    smile_model.register_for_auto_class(auto_class)
    return smile_config, smile_model


SmileCLIPVisionConfig, SmileCLIPVisionModel = smile_variant(CLIPVisionConfig, CLIPVisionModel)
SmileT5Config, SmileT5ForConditionalGeneration = smile_variant(T5Config, T5ForConditionalGeneration,
                                                               "AutoModelForSeq2SeqLM")
SmileMistralConfig, SmileMistralForCausalLM = smile_variant(MistralConfig, MistralForCausalLM, "AutoModelForCausalLM")
SmileLlamaConfig, SmileLlamaForCausalLM = smile_variant(LlamaConfig, LlamaForCausalLM, "AutoModelForCausalLM")
SmileQwen2Config, SmileQwen2ForCausalLM = smile_variant(Qwen2Config, Qwen2ForCausalLM, "AutoModelForCausalLM")

VARIANTS: dict[str, type] = {model.__mro__[1].__name__: model for model in (      # architecture → its SMILE variant
    SmileCLIPVisionModel, SmileT5ForConditionalGeneration, SmileMistralForCausalLM, SmileLlamaForCausalLM,
    SmileQwen2ForCausalLM)}
