"""upscale(): inputs untouched, validation errors, targets, average_experts, the SVD cache."""
import copy

import pytest
import torch
from torch import nn

from smile_ray import SmileError, SmileLinear, upscale
from smile_ray.smile.svd import svd_call_count
from smile_ray.smile.upscale import is_zero
from tests.test_layer import make_pool


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(20, 12)
        self.norm = nn.LayerNorm(12)
        self.attn = nn.Linear(12, 12)
        self.mlp = nn.Linear(12, 6)

    def forward(self, ids):
        return self.mlp(self.attn(self.norm(self.embed(ids))))


def make_net_pool(num_experts=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = Net()
    experts = []
    for _ in range(num_experts):
        e = copy.deepcopy(base)
        with torch.no_grad():
            for p in e.parameters():
                p.add_(0.2 * torch.randn(p.shape, generator=g))
        experts.append(e)
    return base, experts


def state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_inputs_are_not_modified():
    base, experts = make_net_pool()
    before = [state(m) for m in [base, *experts]]
    upscale(base, experts, gate_k=2, k=3, average_experts=True)
    for model, saved in zip([base, *experts], before):
        after = model.state_dict()
        assert all(torch.equal(after[k], v) for k, v in saved.items())


def test_targets_choose_layers_and_other_parameters_stay_pretrained():
    base, experts = make_net_pool()
    model = upscale(base, experts, gate_k=2, k=3, targets=["mlp"])
    assert isinstance(model.mlp, SmileLinear) and type(model.attn) is nn.Linear
    assert torch.equal(model.attn.weight, base.attn.weight)
    assert torch.equal(model.norm.weight, base.norm.weight) and torch.equal(model.embed.weight, base.embed.weight)
    assert model.smile_info.upscaled_layers == ["mlp"]


def test_average_experts_replaces_non_linear_parameters_by_the_experts_mean():
    base, experts = make_net_pool()
    model = upscale(base, experts, gate_k=2, k=3, average_experts=True)
    for name in ["embed.weight", "norm.weight", "norm.bias"]:
        mean = torch.stack([dict(e.named_parameters())[name] for e in experts]).mean(0)
        torch.testing.assert_close(dict(model.named_parameters())[name], mean)
    assert torch.equal(model.attn.base.weight, base.attn.weight)       # linears keep W0 as their shared part


def test_dense_and_low_rank_parameter_shapes():
    base, experts = make_net_pool(num_experts=4)
    low = upscale(base, experts, gate_k=2, k=3)
    assert low.mlp.gate.shape == (4, 2, 12) and low.mlp.u.shape == (4, 6, 3) and low.mlp.svh.shape == (4, 3, 12)
    dense = upscale(base, experts, gate_k=2, k=-1)
    assert dense.mlp.delta.shape == (4, 6, 12)
    torch.testing.assert_close(dense.mlp.delta[1], experts[1].mlp.weight - base.mlp.weight)
    torch.testing.assert_close(dense.mlp.expert_bias[1], experts[1].mlp.bias - base.mlp.bias)


@pytest.mark.parametrize("kwargs, message", [
    ({"gate_k": 0, "k": 2}, "gate_k"),
    ({"gate_k": -3, "k": 2}, "gate_k"),
    ({"gate_k": 2, "k": 0}, "k:"),
    ({"gate_k": 2, "k": 2, "top_k": 4}, "top_k"),
    ({"gate_k": 2, "k": 2, "top_k": 0}, "top_k"),
    ({"gate_k": 2, "k": 2, "svd_solver": "lanczos"}, "svd_solver: must be one of exact, randomized"),
])
def test_bad_hyperparameters_are_named(kwargs, message):
    base, experts = make_net_pool()
    with pytest.raises(SmileError, match=message):
        upscale(base, experts, **kwargs)


def test_expert_of_another_shape_names_the_parameter():
    base, experts = make_net_pool()
    other = Net()
    other.mlp = nn.Linear(12, 5)
    with pytest.raises(SmileError, match=r"^mlp.weight: expert 'expert1' has shape \[5, 12\]"):
        upscale(base, [experts[0], other], gate_k=2, k=2)


def test_expert_of_another_architecture_names_the_parameter():
    base, experts = make_net_pool()
    with pytest.raises(SmileError, match="missing from expert 'b'"):
        upscale(base, {"a": experts[0], "b": nn.Sequential(nn.Linear(12, 12))}, gate_k=2, k=2)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("parameter", ["weight", "bias"])
def test_non_finite_weights_name_the_layer_and_model(value, parameter):
    base, experts = make_net_pool()
    with torch.no_grad():
        getattr(experts[2].attn, parameter).view(-1)[3] = value
    owner = "expert 'expert2'" + (" bias" if parameter == "bias" else "")
    with pytest.raises(SmileError, match=rf"^attn: {owner} has non-finite"):
        upscale(base, experts, gate_k=2, k=2)


@pytest.mark.parametrize("scale", [0.0, 5e-9, 1e-8, 1.01e-8, 1e-6])
def test_zero_task_vector_test_is_the_references_allclose(scale):
    delta = torch.zeros(7, 5)
    delta[2, 3], delta[4, 1] = scale, -scale / 2
    assert is_zero(delta) == torch.allclose(delta, torch.zeros_like(delta))
    assert is_zero(-delta) == torch.allclose(-delta, torch.zeros_like(delta))


def test_no_experts_is_an_error():
    base, _ = make_net_pool()
    with pytest.raises(SmileError, match="experts"):
        upscale(base, [], gate_k=2, k=2)


def test_cache_makes_a_second_upscale_free_of_svds(tmp_path):
    base, experts = make_pool(4)
    first = upscale(base, experts, gate_k=3, k=5, svd_cache=tmp_path)
    assert first.smile_info.svd_computed == 8 and first.smile_info.svd_cache_hits == 0
    calls = svd_call_count()
    x = torch.randn(30, 12)
    for gate_k, k, top_k in [(3, 5, 1), (1, 2, 2), (5, 3, 4), (2, -1, 1)]:
        again = upscale(base, experts, gate_k=gate_k, k=k, top_k=top_k, svd_cache=tmp_path)
        fresh = upscale(base, experts, gate_k=gate_k, k=k, top_k=top_k)
        torch.testing.assert_close(again(x), fresh(x))
        assert again.smile_info.svd_computed == 0 and again.smile_info.svd_cache_hits == 8
    assert svd_call_count() == calls + 4 * 8                # only the cache-less comparisons computed


def test_cache_recomputes_for_a_larger_rank_and_keeps_it(tmp_path):
    base, experts = make_pool(2)
    upscale(base, experts, gate_k=1, k=2, svd_cache=tmp_path)
    bigger = upscale(base, experts, gate_k=1, k=4, svd_cache=tmp_path)
    assert bigger.smile_info.svd_computed == 4
    again = upscale(base, experts, gate_k=3, k=4, svd_cache=tmp_path)
    assert again.smile_info.svd_computed == 0


def test_cache_keys_on_weight_content(tmp_path):
    base, experts = make_pool(2)
    upscale(base, experts, gate_k=2, k=2, svd_cache=tmp_path)
    with torch.no_grad():
        experts[0][0].weight.add_(0.01)
    changed = upscale(base, experts, gate_k=2, k=2, svd_cache=tmp_path)
    assert changed.smile_info.svd_computed == 1 and changed.smile_info.svd_cache_hits == 3


def test_router_from_weights_is_cached_separately(tmp_path):
    base, experts = make_pool(2)
    upscale(base, experts, gate_k=2, k=2, svd_cache=tmp_path)
    by_weight = upscale(base, experts, gate_k=2, k=2, routing_use_diff=False, svd_cache=tmp_path)
    assert by_weight.smile_info.svd_computed == 4 and by_weight.smile_info.svd_cache_hits == 4


def test_randomized_factors_are_cached_apart_from_exact_ones(tmp_path):
    base, experts = make_pool(2)
    upscale(base, experts, gate_k=2, k=2, svd_cache=tmp_path)
    fast = upscale(base, experts, gate_k=2, k=2, svd_cache=tmp_path, svd_solver="randomized")
    assert fast.smile_info.svd_computed == 4 and fast.smile_info.svd_cache_hits == 0
    again = upscale(base, experts, gate_k=2, k=2, svd_cache=tmp_path, svd_solver="randomized")
    assert again.smile_info.svd_computed == 0 and again.smile_info.svd_cache_hits == 4


@pytest.mark.parametrize("top_k", [1, 2])
def test_a_layer_where_only_biases_changed_stays_pretrained_and_is_never_nan(top_k):
    base, experts = make_net_pool()
    for expert in experts:                       # weights back to the base's: only the mlp biases differ
        expert.mlp.weight.data.copy_(base.mlp.weight)
    with pytest.warns(UserWarning, match=r"1 layer\(s\) where only biases changed stay pretrained.*first: mlp"):
        model = upscale(base, experts, gate_k=2, k=3, top_k=top_k)
    assert type(model.mlp) is nn.Linear and torch.equal(model.mlp.bias, base.mlp.bias)
    assert model.smile_info.skipped_layers == ["mlp"] and model.smile_info.dropped_bias_layers == ["mlp"]
    out = model(torch.arange(10).view(2, 5))
    assert torch.isfinite(out).all()


def test_an_expert_whose_weight_did_not_change_is_never_routed_and_never_nan():
    base, experts = make_net_pool()
    experts[1].mlp.weight.data.copy_(base.mlp.weight)        # expert 1: only its bias changed here
    model = upscale(base, experts, gate_k=2, k=3, top_k=3)
    assert model.mlp.routable.tolist() == [True, False, True]
    weights, chosen = model.mlp.route(torch.randn(7, 12))
    assert torch.isfinite(weights).all() and torch.allclose(weights.sum(-1), torch.ones(7))
    assert (weights[chosen == 1] == 0).all()                 # chosen only as the third of three, with weight 0
