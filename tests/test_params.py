"""Parameter accounting against the paper's published counts (smile-facts §1.7), on meta-device models."""
import pytest
import torch
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModel, MistralConfig, MistralForCausalLM, T5Config, \
    T5ForConditionalGeneration

from smile_ray.smile.modeling_smile import apply_layout
from smile_ray.smile.params import count_parameters, parameter_report


def upscaled_shape(model: nn.Module, num_experts: int, gate_k: int, k: int, top_k: int = 1, suffixes=None):
    """Every (chosen) nn.Linear swapped for an empty SmileLinear, as upscale() would build it."""
    layout = {name: {"in_features": m.in_features, "out_features": m.out_features, "num_experts": num_experts,
                     "gate_k": min(gate_k, m.in_features, m.out_features),
                     "k": min(k, m.in_features, m.out_features) if k > 0 else k,
                     "top_k": top_k, "bias": m.bias is not None}
              for name, m in model.named_modules()
              if isinstance(m, nn.Linear) and (suffixes is None or name.rsplit(".", 1)[-1] in suffixes)}
    return apply_layout(model, layout)


def clip_b32():
    with torch.device("meta"):
        return CLIPVisionModel(CLIPVisionConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                                num_attention_heads=12, patch_size=32, image_size=224))


def flan_t5_base():
    config = T5Config(d_model=768, d_ff=2048, d_kv=64, num_layers=12, num_heads=12, vocab_size=32128,
                      feed_forward_proj="gated-gelu")
    config.tie_word_embeddings = False          # Flan-T5's lm_head is its own matrix (transformers 5 ignores the kwarg)
    with torch.device("meta"):
        model = T5ForConditionalGeneration(config)
    model.encoder.embed_tokens = model.decoder.embed_tokens = model.shared     # shared input embeddings
    return model


def mistral_7b():
    with torch.device("meta"):
        return MistralForCausalLM(MistralConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                                num_attention_heads=32, num_key_value_heads=8, vocab_size=32000))


MISTRAL_LINEARS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def test_clip_b32_counts_match_the_paper():
    assert count_parameters(clip_b32()) == 87_456_000
    report = parameter_report(upscaled_shape(clip_b32(), 8, 16, 32), clip_b32())
    assert report["all_params"] == 141_203_712
    assert report["extra_params"] == 141_203_712 - 87_456_000
    assert report["ratio"] == pytest.approx(1.6146, abs=1e-4)


def test_active_parameters_count_top_k_experts_only():
    report = parameter_report(upscaled_shape(clip_b32(), 8, 16, 32, top_k=2))
    per_layer_experts = 12 * (4 * (32 * 1536 + 768) + (32 * 3840 + 3072) + (32 * 3840 + 768))
    assert report["all_params"] - report["active_params"] == 6 * per_layer_experts


@pytest.mark.parametrize("gate_k, k, expected", [(4, 16, 312_368_384), (8, 32, 377_158_912)])
def test_flan_t5_base_counts_match_the_paper(gate_k, k, expected):
    assert count_parameters(flan_t5_base()) == 247_577_856
    assert count_parameters(upscaled_shape(flan_t5_base(), 8, gate_k, k)) == expected


@pytest.mark.parametrize("experts, k, expected", [(1, 8, 7_272_665_088), (3, 512, 11_298_148_352)])
def test_mistral_7b_counts_match_the_paper(experts, k, expected):
    assert count_parameters(mistral_7b()) == 7_241_732_096
    assert count_parameters(upscaled_shape(mistral_7b(), experts, 8, k, suffixes=MISTRAL_LINEARS)) == expected
