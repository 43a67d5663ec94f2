"""upscale(): walk a pretrained model, swap its linear layers for SmileLinear layers.

The formula lives in layer.py; the SVDs in svd.py. This file checks inputs, gathers each layer's
weights from the pretrained model and the experts, builds the layer and puts it in a copy of the
pretrained model. The caller's models are never modified. Models are nn.Modules or, for models too large
to hold T + 1 copies of, checkpoint directories read one layer at a time (weights.py): the same code path.
"""
from __future__ import annotations

import fnmatch
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from smile_ray.errors import SmileError
from smile_ray.smile.layer import SmileLinear
from smile_ray.smile.svd import SOLVERS, Decomposer, SvdCache, SvdStats
from smile_ray.smile.weights import (ModelWeights, as_weights, is_finite, linear_layers, return_freed_memory,
                                     value_range)

Model = nn.Module | ModelWeights
Experts = Sequence[Model] | Mapping[str, Model]


@dataclass
class UpscaleInfo:
    """What one upscale did; attached to the returned model as `smile_info`."""

    upscaled_layers: list[str] = field(default_factory=list)
    skipped_layers: list[str] = field(default_factory=list)   # every weight's task vector zero: the base layer
    dropped_bias_layers: list[str] = field(default_factory=list)   # skipped, though some expert's bias changed
    clamped_layers: list[str] = field(default_factory=list)   # gate_k or k above min(m, n)
    svd_computed: int = 0
    svd_cache_hits: int = 0
    svd_seconds: float = 0.0

    def count_svds(self, stats: SvdStats) -> None:
        self.svd_computed, self.svd_cache_hits, self.svd_seconds = stats.computed, stats.cache_hits, stats.seconds


def named_experts(experts: Experts) -> dict[str, ModelWeights]:
    """Experts as an ordered name → weights mapping (positional experts are named expert0, expert1, …)."""
    if isinstance(experts, Mapping):
        return {name: as_weights(model) for name, model in experts.items()}
    return {f"expert{i}": as_weights(model) for i, model in enumerate(experts)}


def check_same_architecture(base: Model, experts: Mapping[str, Model]) -> None:
    """Raise SmileError naming the first parameter whose name or shape differs from the base's."""
    shapes = as_weights(base).shapes()
    for expert_name, expert in experts.items():
        theirs = as_weights(expert).shapes()
        missing = [n for n in shapes if n not in theirs] + [n for n in theirs if n not in shapes]
        if missing:
            where = "missing from" if missing[0] in shapes else "not in the pretrained model but in"
            raise SmileError(f"{missing[0]}: parameter {where} expert '{expert_name}' "
                             "(experts must share the base architecture)")
        for name, shape in shapes.items():
            if theirs[name] != shape:
                raise SmileError(f"{name}: expert '{expert_name}' has shape {list(theirs[name])}, "
                                 f"the pretrained model {list(shape)}")


def check_finite(layer: str, tensors: Mapping[str, torch.Tensor]) -> None:
    for owner, tensor in tensors.items():
        if tensor is not None and not is_finite(tensor):
            raise SmileError(f"{layer}: {owner} has non-finite weights (NaN or inf)")


def matches(name: str, targets: Sequence[str] | None) -> bool:
    """A module name matches a pattern if the pattern globs the whole name or its last components."""
    if targets is None:
        return True
    return any(fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(name, f"*.{p}") for p in targets)


def is_zero(tensor: torch.Tensor | None) -> bool:
    """The reference's test for an untrained task vector, allclose(Δ, 0) with rtol 1e-5 and atol 1e-8, which
    against zero is |Δ| ≤ 1e-8 everywhere (Δ in float32, as upscale computes it)."""
    if tensor is None:
        return True
    low, high = value_range(tensor)
    return -1e-8 <= low and high <= 1e-8


def upscale(base: Model, experts: Experts, *, gate_k: int, k: int, top_k: int = 1,
            routing_use_diff: bool = True, average_experts: bool = False, targets: Sequence[str] | None = None,
            svd_cache: SvdCache | str | Path | None = None, device: torch.device | str | None = None,
            svd_solver: str = "exact") -> nn.Module:
    """Build a SMILE model from a pretrained `base` and fine-tuned `experts` of the same architecture.

    gate_k: router rank per expert; k: expert rank (< 0: dense experts); top_k: experts per token.
    routing_use_diff: route with the right singular vectors of ΔWᵢ (True) or of Wᵢ (False).
    average_experts: parameters outside the linear layers (LayerNorms, embeddings and an lm_head, convs)
      become the experts' mean instead of staying pretrained.
    targets: module-name patterns choosing which nn.Linear layers to upscale (default: all).
    svd_cache: a directory (or SvdCache) reusing truncated SVDs across calls; device: where SVDs run.
    svd_solver: "exact" or "randomized" (svd.py: faster where task vectors' spectra decay past the ranks used).
    Returns a new module (the inputs are untouched) with `.smile_info` (an UpscaleInfo).
    """
    base, experts = as_weights(base), named_experts(experts)
    if not experts:
        raise SmileError("experts: at least one fine-tuned model is needed")
    if not isinstance(gate_k, int) or gate_k <= 0:
        raise SmileError(f"gate_k: must be a positive integer, got {gate_k!r}")
    if not isinstance(k, int) or k == 0:
        raise SmileError(f"k: must be a positive rank, or negative for dense experts, got {k!r}")
    if svd_solver not in SOLVERS:
        raise SmileError(f"svd_solver: must be one of {', '.join(SOLVERS)}, got {svd_solver!r}")
    if not isinstance(top_k, int) or not 1 <= top_k <= len(experts):
        raise SmileError(f"top_k: must be between 1 and the number of experts ({len(experts)}), got {top_k!r}")
    check_same_architecture(base, experts)
    decomposer = Decomposer(svd_cache, device, svd_solver)
    info = UpscaleInfo()
    names = [name for name in base.linear_names() if matches(name, targets)]
    model = base.instantiate(without=names)

    with torch.no_grad():
        for name in names:
            pretrained = base.linear(name)
            layer = smile_layer(name, pretrained, experts, gate_k=gate_k, k=k, top_k=top_k,
                                routing_use_diff=routing_use_diff, decomposer=decomposer, info=info)
            if base.lazy:
                return_freed_memory()            # this layer's temporaries, before the next layer's
            if layer is None and not base.lazy:  # the copy of the base holds this layer already
                continue
            replacement = pretrained if layer is None else layer
            if name:
                model.set_submodule(name, replacement)
            else:                                # the base itself is a single nn.Linear
                model = replacement
        if average_experts:
            average_non_linear(model, list(experts.values()))

    if info.clamped_layers:
        # name only the rank(s) above some clamped layer's full rank: k=32 does not exceed a 128-wide layer
        shapes = base.shapes()
        smallest = min(min(shapes[f"{name}.weight" if name else "weight"]) for name in info.clamped_layers)
        over = [f"{label}={value}" for label, value in (("gate_k", gate_k), ("k", k)) if value > smallest]
        warnings.warn(f"{', '.join(over)} {'exceeds' if len(over) == 1 else 'exceed'} min(in, out) of "
                      f"{len(info.clamped_layers)} layer(s) "
                      f"(first: {info.clamped_layers[0]}); clamped to the layer's full rank", stacklevel=2)
    if info.dropped_bias_layers:
        warnings.warn(f"{len(info.dropped_bias_layers)} layer(s) where only biases changed stay pretrained, their bias "
                      f"changes dropped (first: {info.dropped_bias_layers[0]}): a router needs a weight's task vector",
                      stacklevel=2)
    info.count_svds(decomposer.stats)
    model.smile_info = info
    return model


def smile_layer(name: str, base: nn.Linear, experts: Mapping[str, ModelWeights], *, gate_k: int, k: int, top_k: int,
                routing_use_diff: bool, decomposer: Decomposer, info: UpscaleInfo) -> SmileLinear | None:
    """One SmileLinear from a pretrained linear and the experts' copies of it; None if nothing was trained.
    Experts are read and decomposed one at a time, so a layer costs the memory of one expert's copy, not T."""
    check_finite(name, {"the pretrained model": base.weight, "the pretrained bias": base.bias})
    out_features, in_features = base.weight.shape
    full_rank = min(out_features, in_features)
    layer_gate_k, layer_k = min(gate_k, full_rank), (min(k, full_rank) if k > 0 else k)
    layer = SmileLinear(in_features, out_features, len(experts), gate_k=layer_gate_k, k=layer_k, top_k=top_k,
                        bias=base.bias is not None, device=base.weight.device, dtype=base.weight.dtype)
    layer.base.load_state_dict(base.state_dict())
    w0 = base.weight.detach().float()
    b0 = None if base.bias is None else base.bias.detach().float()
    base_digest = decomposer.digest(base.weight)
    svd_rank = max(layer_gate_k, layer_k)
    bias_changed = False
    for i, (expert_name, weights) in enumerate(experts.items()):
        expert = weights.linear(name)
        if not isinstance(expert, nn.Linear):
            raise SmileError(f"{name}: expert '{expert_name}' has a {type(expert).__name__} here, not nn.Linear")
        check_finite(name, {f"expert '{expert_name}'": expert.weight, f"expert '{expert_name}' bias": expert.bias})
        delta = expert.weight.detach().to(torch.float32, copy=True).sub_(w0)      # one float32 buffer
        routable = not is_zero(delta)
        layer.routable[i] = routable
        if not routable:                         # nothing learnt here: zero router vectors, zero expert
            layer.gate[i].zero_()
            (layer.delta[i] if layer.dense_experts else layer.u[i]).zero_()
            if not layer.dense_experts:
                layer.svh[i].zero_()
        else:
            expert_digest = decomposer.digest(expert.weight)
            key = {what: decomposer.key(name, base_digest, expert_digest, what) for what in ("diff", "weight")}
            # ΔWᵢ's factors feed the low-rank expert and the router of routing_use_diff;
            # dense experts routed by Wᵢ need none
            factors = (decomposer.factors(delta, svd_rank, key["diff"])
                       if routing_use_diff or not layer.dense_experts else None)
            router = factors if routing_use_diff else decomposer.factors(expert.weight.detach().float(),
                                                                         layer_gate_k, key["weight"])
            layer.gate[i].copy_(router.v[:, :layer_gate_k].T)
            if layer.dense_experts:
                layer.delta[i].copy_(delta)
            else:
                layer.u[i].copy_(factors.u[:, :layer_k])
                layer.svh[i].copy_(factors.s[:layer_k, None] * factors.v[:, :layer_k].T)
        if layer.expert_bias is not None:
            bias_delta = expert.bias.detach().float() - b0
            bias_changed |= not is_zero(bias_delta)
            layer.expert_bias[i].copy_(bias_delta)
        del expert, delta
    if not layer.routable.any():   # no expert's weight changed: nothing to route by (the reference skips it too)
        info.skipped_layers.append(name)
        if bias_changed:
            info.dropped_bias_layers.append(name)
        return None
    if gate_k > full_rank or k > full_rank:
        info.clamped_layers.append(name)
    info.upscaled_layers.append(name)
    return layer


def average_non_linear(model: nn.Module, experts: list[ModelWeights]) -> None:
    """Replace every parameter outside the linear layers SMILE may upscale (embeddings, an lm_head, norms) by the
    mean of the experts' copies, read one at a time."""
    kept = [*linear_layers(model), *(name for name, m in model.named_modules() if isinstance(m, SmileLinear))]
    linear_params = {f"{name}.{p}" for name in kept for p, _ in model.get_submodule(name).named_parameters()}
    for name, param in model.named_parameters():
        if name in linear_params:
            continue
        total = sum(expert.tensor(name).float() for expert in experts)
        param.copy_((total / len(experts)).to(param.dtype))
