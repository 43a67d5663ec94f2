"""Models read tensor by tensor from their checkpoint directories merge exactly as the same models loaded whole."""
import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

from smile_ray.errors import SmileError
from smile_ray.smile import individual, simple_average, task_arithmetic, upscale
from smile_ray.smile.layer import SmileLinear
from smile_ray.smile.weights import CheckpointWeights
from tests.lm_fixtures import UNCHANGED, save_causal_pool

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    return save_causal_pool(tmp_path_factory.mktemp("causal_pool"))


def whole(directory):
    return AutoModelForCausalLM.from_pretrained(directory).eval()


def on_disk(pool):
    return CheckpointWeights(pool["base"]), {name: CheckpointWeights(d) for name, d in pool["experts"].items()}


def logits(model):
    ids = torch.arange(4, 36).reshape(2, 16)
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_the_fixture_is_sharded(pool):
    assert len(list(pool["base"].glob("model-*.safetensors"))) > 1


@pytest.mark.parametrize("ranks", [dict(gate_k=4, k=8, top_k=2), dict(gate_k=8, k=-1, top_k=1)])
def test_streamed_upscale_equals_the_in_memory_one(pool, ranks):
    in_memory = upscale(whole(pool["base"]), {n: whole(d) for n, d in pool["experts"].items()},
                        targets=PROJECTIONS, **ranks)
    base, experts = on_disk(pool)
    streamed = upscale(base, experts, targets=PROJECTIONS, **ranks)
    assert torch.equal(logits(streamed), logits(in_memory))
    assert streamed.smile_info.upscaled_layers == in_memory.smile_info.upscaled_layers
    assert streamed.smile_info.skipped_layers == [UNCHANGED]
    assert type(streamed.get_submodule(UNCHANGED)) is nn.Linear
    assert isinstance(streamed.get_submodule("model.layers.0.self_attn.q_proj"), SmileLinear)
    assert not any(p.is_meta for p in streamed.parameters())


def test_streamed_baselines_equal_the_in_memory_ones(pool):
    models = {n: whole(d) for n, d in pool["experts"].items()}
    base, experts = on_disk(pool)
    assert torch.equal(logits(task_arithmetic(base, experts, scaling=0.3)),
                       logits(task_arithmetic(whole(pool["base"]), models, scaling=0.3)))
    assert torch.equal(logits(simple_average(base, experts)), logits(simple_average(whole(pool["base"]), models)))
    assert torch.equal(logits(individual(base, experts, model="expert1")), logits(models["expert1"]))


def test_average_experts_reads_the_experts_non_linear_weights(pool):
    base, experts = on_disk(pool)
    streamed = upscale(base, experts, gate_k=4, k=8, targets=PROJECTIONS, average_experts=True)
    in_memory = upscale(whole(pool["base"]), {n: whole(d) for n, d in pool["experts"].items()}, gate_k=4, k=8,
                        targets=PROJECTIONS, average_experts=True)
    assert torch.equal(logits(streamed), logits(in_memory))


def test_tied_embeddings_are_tied_again(tmp_path):
    pool = save_causal_pool(tmp_path, "llama", experts=2, tie_word_embeddings=True)
    model = CheckpointWeights(pool["base"]).instantiate()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert torch.equal(logits(model), logits(whole(pool["base"])))


def test_a_missing_tensor_is_named(pool):
    base, _ = on_disk(pool)
    del base.entries["model.norm.weight"]
    with pytest.raises(SmileError, match=r"no weight 'model.norm.weight' in .*base \(1 of the model's weights"):
        base.instantiate()


def test_the_lm_head_stays_the_base_s_and_average_experts_averages_it(tmp_path):
    pool = save_causal_pool(tmp_path, "qwen2", experts=2)
    for directory in pool["experts"].values():         # experts whose lm_head changed too
        model = whole(directory)
        with torch.no_grad():
            model.lm_head.weight.add_(1.0)
        model.save_pretrained(directory, max_shard_size="40KB")
    base, experts = on_disk(pool)
    upscaled = upscale(base, experts, gate_k=4, k=8)
    assert type(upscaled.lm_head) is nn.Linear and "lm_head" not in upscaled.smile_info.upscaled_layers
    assert torch.equal(upscaled.lm_head.weight, whole(pool["base"]).lm_head.weight)
    averaged = upscale(base, experts, gate_k=4, k=8, average_experts=True)
    assert torch.allclose(averaged.lm_head.weight, whole(pool["base"]).lm_head.weight + 1.0)
