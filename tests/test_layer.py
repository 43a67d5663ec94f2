"""The SMILE formula, checked against an independent float64 computation written here."""
import warnings

import pytest
import torch
from torch import nn

import smile_ray.smile.layer as layer_module
from smile_ray import SmileLinear, upscale

torch.manual_seed(0)


def make_pool(num_experts: int, bias: bool = True, zero: tuple[int, ...] = (), seed: int = 0):
    """A two-layer MLP and fine-tuned copies whose task vectors are random (zero for experts in `zero`)."""
    g = torch.Generator().manual_seed(seed)
    base = nn.Sequential(nn.Linear(12, 10, bias=bias), nn.Tanh(), nn.Linear(10, 7, bias=bias))
    experts = []
    for i in range(num_experts):
        expert = nn.Sequential(nn.Linear(12, 10, bias=bias), nn.Tanh(), nn.Linear(10, 7, bias=bias))
        expert.load_state_dict(base.state_dict())
        if i not in zero:
            with torch.no_grad():
                for p in expert.parameters():
                    p.add_(0.3 * torch.randn(p.shape, generator=g))
        experts.append(expert)
    return base, experts


def reference_layer(x, w0, b0, ws, bs, gate_k, k, top_k, routing_use_diff=True):
    """SMILE for one linear layer in float64, from full SVDs (independent of the package's Gram SVD)."""
    x, w0 = x.double(), w0.double()
    y = x @ w0.T + (0 if b0 is None else b0.double())
    deltas = [w.double() - w0 for w in ws]
    logits, outputs = [], []
    for w, delta, b in zip(ws, deltas, bs):
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        gate_v = (vh if routing_use_diff else torch.linalg.svd(w.double(), full_matrices=False)[2])[:gate_k]
        logits.append((x @ gate_v.T).norm(dim=-1))
        expert_w = delta if k < 0 else u[:, :k] @ torch.diag(s[:k]) @ vh[:k]
        outputs.append(x @ expert_w.T + (0 if b0 is None else b.double() - b0.double()))
    logits, outputs = torch.stack(logits, 1), torch.stack(outputs, 1)          # (N, T), (N, T, m)
    if len(ws) == 1:
        return y + outputs[:, 0]
    p = logits.softmax(-1)
    top, idx = p.topk(top_k, dim=-1)
    top = top / top.sum(-1, keepdim=True)
    return y + (top.unsqueeze(-1) * outputs.gather(1, idx.unsqueeze(-1).expand(-1, -1, outputs.shape[-1]))).sum(1)


def reference_model(x, base, experts, **kw):
    h = reference_layer(x, base[0].weight, base[0].bias, [e[0].weight for e in experts],
                        [e[0].bias for e in experts], **kw)
    return reference_layer(torch.tanh(h), base[2].weight, base[2].bias, [e[2].weight for e in experts],
                           [e[2].bias for e in experts], **kw)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("top_k", [1, 2, 4])
@pytest.mark.parametrize("k", [3, -1])
def test_forward_matches_float64_reference(bias, top_k, k):
    base, experts = make_pool(4, bias=bias)
    model = upscale(base, experts, gate_k=2, k=k, top_k=top_k)
    x = torch.randn(64, 12)
    expected = reference_model(x, base, experts, gate_k=2, k=k, top_k=top_k)
    torch.testing.assert_close(model(x).double(), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("k", [4, -1])
def test_router_from_finetuned_weights(k):
    base, experts = make_pool(3)
    model = upscale(base, experts, gate_k=3, k=k, top_k=2, routing_use_diff=False)
    x = torch.randn(32, 12)
    expected = reference_model(x, base, experts, gate_k=3, k=k, top_k=2, routing_use_diff=False)
    torch.testing.assert_close(model(x).double(), expected, rtol=1e-4, atol=1e-4)
    layers = sum(isinstance(m, SmileLinear) for m in model.modules())
    # one SVD of Wᵢ per expert and layer for the router, plus ΔWᵢ's for low-rank experts (dense ones use ΔWᵢ itself)
    assert model.smile_info.svd_computed == layers * len(experts) * (2 if k > 0 else 1)


def test_one_expert_gets_weight_one():
    base, experts = make_pool(1)
    model = upscale(base, experts, gate_k=2, k=5)
    x = torch.randn(16, 12)
    torch.testing.assert_close(model(x).double(), reference_model(x, base, experts, gate_k=2, k=5, top_k=1),
                               rtol=1e-4, atol=1e-4)
    # full rank, dense: the single expert reproduces the fine-tuned model exactly
    dense = upscale(base, experts, gate_k=2, k=-1)
    torch.testing.assert_close(dense(x), experts[0](x), rtol=1e-5, atol=1e-5)


def test_top1_routes_each_token_to_its_own_expert_when_inputs_separate():
    """Experts trained on disjoint input directions: each token goes to the expert of its direction."""
    base = nn.Linear(8, 8, bias=False)
    experts = []
    for i in range(4):
        e = nn.Linear(8, 8, bias=False)
        e.load_state_dict(base.state_dict())
        with torch.no_grad():
            e.weight[:, 2 * i:2 * i + 2] += torch.randn(8, 2)      # ΔWᵢ only reads input dims 2i, 2i+1
        experts.append(e)
    model = upscale(base, experts, gate_k=2, k=2)
    x = torch.zeros(4, 8)
    for i in range(4):
        x[i, 2 * i] = 1.0
    torch.testing.assert_close(model(x), torch.stack([experts[i](x[i]) for i in range(4)]), rtol=1e-5, atol=1e-5)


def test_zero_task_vector_expert_takes_no_tokens():
    base, experts = make_pool(3, zero=(1,))
    model = upscale(base, experts, gate_k=2, k=3, top_k=2)
    layer = model[0]
    assert layer.routable.tolist() == [True, False, True]
    assert torch.count_nonzero(layer.gate[1]) == 0
    x = torch.randn(50, 12)
    _, chosen = layer.route(x)
    assert (chosen != 1).all()
    # with the zero expert excluded, the layer equals SMILE over the two trained experts
    expected = reference_model(x, base, [experts[0], experts[2]], gate_k=2, k=3, top_k=2)
    torch.testing.assert_close(model(x).double(), expected, rtol=1e-4, atol=1e-4)


def test_layer_with_all_task_vectors_zero_stays_base_linear():
    base, experts = make_pool(2, zero=(0, 1))
    model = upscale(base, experts, gate_k=2, k=3)
    assert type(model[0]) is nn.Linear and type(model[2]) is nn.Linear
    assert model.smile_info.skipped_layers == ["0", "2"]
    x = torch.randn(5, 12)
    torch.testing.assert_close(model(x), base(x))


def test_ranks_above_layer_size_are_clamped_with_a_warning():
    base, experts = make_pool(3)
    with pytest.warns(UserWarning, match="clamped"):
        model = upscale(base, experts, gate_k=50, k=40)
    assert (model[0].gate_k, model[0].k) == (10, 10) and (model[2].gate_k, model[2].k) == (7, 7)
    x = torch.randn(20, 12)
    expected = reference_model(x, base, experts, gate_k=50, k=40, top_k=1)   # slicing past the end = clamping
    torch.testing.assert_close(model(x).double(), expected, rtol=1e-4, atol=1e-4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        upscale(base, experts, gate_k=2, k=3)


@pytest.mark.parametrize("gate_k, k, named", [
    (1000, 5, "gate_k=1000 exceeds"),      # k=5 fits both layers (10×12, 7×10): not named
    (5, 1000, "k=1000 exceeds"),
    (9, 3, "gate_k=9 exceeds"),            # above the 7×10 layer only
    (50, 40, "gate_k=50, k=40 exceed"),
])
def test_clamp_warning_names_only_the_ranks_that_exceed(gate_k, k, named):
    base, experts = make_pool(2)
    with pytest.warns(UserWarning) as record:
        upscale(base, experts, gate_k=gate_k, k=k)
    [message] = [str(w.message) for w in record if "min(in, out)" in str(w.message)]
    assert message.startswith(f"{named} min(in, out) of ")
    assert "clamped to the layer's full rank" in message


def test_input_shape_is_kept_and_batched_dispatch_handles_imbalance():
    base, experts = make_pool(4)
    model = upscale(base, experts, gate_k=2, k=3, top_k=2)
    x = torch.randn(3, 5, 12)
    assert model(x).shape == (3, 5, 7)
    torch.testing.assert_close(model(x).reshape(15, 7), model(x.reshape(15, 12)))
    one = x[:1, :1]                                    # a single token: capacity 1 on one or two experts
    torch.testing.assert_close(model(one).reshape(1, 7), model(x.reshape(15, 12))[:1])


def routed(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's output and, per token, the experts every SMILE layer chose: (N, layers · top_k)."""
    picks = []
    hooks = [m.register_forward_hook(lambda layer, args, out: picks.append(layer.route(args[0])[1]))
             for m in model.modules() if isinstance(m, SmileLinear)]
    try:
        out = model(x)
    finally:
        for hook in hooks:
            hook.remove()
    return out, torch.cat(picks, dim=1)


def test_half_precision_model_keeps_its_dtype():
    base, experts = make_pool(3)
    base16, experts16 = base.to(torch.bfloat16), [e.to(torch.bfloat16) for e in experts]
    model = upscale(base16, experts16, gate_k=2, k=3)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    x = torch.randn(64, 12, generator=torch.Generator().manual_seed(0))
    expected = reference_model(x, base16.float(), [e.float() for e in experts16], gate_k=2, k=3, top_k=1)
    out, picks = routed(model, x.bfloat16())
    _, picks32 = routed(upscale(base16.float(), [e.float() for e in experts16], gate_k=2, k=3), x)
    same = (picks == picks32).all(dim=1)         # bf16 rounding may flip a near-tie between two experts' logits
    assert same.float().mean() >= 0.9
    torch.testing.assert_close(out.double()[same], expected[same], rtol=0.05, atol=0.05)


def test_layer_constructor_rejects_bad_hyperparameters():
    with pytest.raises(ValueError, match="gate_k"):
        SmileLinear(4, 4, 2, gate_k=0, k=2)
    with pytest.raises(ValueError, match="top_k"):
        SmileLinear(4, 4, 2, gate_k=1, k=2, top_k=3)
    with pytest.raises(ValueError, match="k must"):
        SmileLinear(4, 4, 2, gate_k=1, k=0)


@pytest.mark.parametrize("chunk_bytes", [None, 1], ids=["one chunk", "a chunk per block"])
@pytest.mark.parametrize("k, top_k", [(3, 1), (3, 2), (-1, 1)])
def test_dispatch_when_nearly_every_token_goes_to_one_expert(k, top_k, chunk_bytes, monkeypatch):
    """One expert takes most of 300 tokens: its assignments span several blocks, others get few or none."""
    if chunk_bytes is not None:
        monkeypatch.setattr(layer_module, "CHUNK_BYTES", (chunk_bytes, chunk_bytes))
    base, experts = make_pool(4)
    model = upscale(base, experts, gate_k=2, k=k, top_k=top_k)
    direction = model[0].gate[2, 0]
    x = 4 * direction / direction.norm() + 0.05 * torch.randn(300, 12)
    _, chosen = model[0].route(x)
    assert (chosen[:, 0] == 2).float().mean() > 0.9
    expected = reference_model(x, base, experts, gate_k=2, k=k, top_k=top_k)
    torch.testing.assert_close(model(x).double(), expected, rtol=1e-4, atol=1e-4)
