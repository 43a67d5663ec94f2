"""Baselines SMILE is compared against: weight averaging, task arithmetic, a single model as is. Models are
nn.Modules or checkpoint directories read tensor by tensor (weights.py)."""
from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from smile_ray.errors import SmileError
from smile_ray.smile.upscale import Experts, Model, check_same_architecture, named_experts
from smile_ray.smile.weights import as_weights


@torch.no_grad()
def task_arithmetic(base: Model, experts: Experts, *, scaling: float) -> nn.Module:
    """θ = θ0 + λ Σᵢ (θᵢ − θ0) over every parameter (Ilharco et al.); a new module."""
    base, experts = as_weights(base), named_experts(experts)
    check_same_architecture(base, experts)
    merged = base.instantiate()
    for name, param in merged.named_parameters():
        theta0 = param.detach().float()
        delta = sum(e.tensor(name).float() - theta0 for e in experts.values())
        param.copy_((theta0 + scaling * delta).to(param.dtype))
    return merged


def simple_average(base: Model, experts: Experts) -> nn.Module:
    """θ = mean of the experts' parameters (task arithmetic with λ = 1/T); a new module."""
    experts = named_experts(experts)
    if not experts:
        raise SmileError("experts: simple averaging needs at least one fine-tuned model")
    return task_arithmetic(base, experts, scaling=1.0 / len(experts))


def individual(base: Model, experts: Mapping[str, Model], *, model: str) -> nn.Module:
    """One model of the pool as is (a copy): an expert by name, or the pretrained model ('pretrained')."""
    if model == "pretrained":
        return as_weights(base).instantiate()
    if model not in experts:
        raise SmileError(f"method.model: unknown model '{model}'; choose 'pretrained' or one of {sorted(experts)}")
    return as_weights(experts[model]).instantiate()
