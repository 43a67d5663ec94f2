"""Baselines SMILE is compared against: weight averaging, task arithmetic, a single model as is."""
from __future__ import annotations

import copy
from collections.abc import Mapping

import torch
from torch import nn

from smile_ray.errors import SmileError
from smile_ray.smile.upscale import Experts, check_same_architecture, named_experts


@torch.no_grad()
def task_arithmetic(base: nn.Module, experts: Experts, *, scaling: float) -> nn.Module:
    """θ = θ0 + λ Σᵢ (θᵢ − θ0) over every parameter (Ilharco et al.); a new module."""
    experts = named_experts(experts)
    check_same_architecture(base, experts)
    merged = copy.deepcopy(base)
    expert_params = [dict(e.named_parameters()) for e in experts.values()]
    for name, param in merged.named_parameters():
        theta0 = param.detach().float()
        delta = sum(p[name].detach().float() - theta0 for p in expert_params)
        param.copy_((theta0 + scaling * delta).to(param.dtype))
    return merged


def simple_average(base: nn.Module, experts: Experts) -> nn.Module:
    """θ = mean of the experts' parameters (task arithmetic with λ = 1/T); a new module."""
    experts = named_experts(experts)
    if not experts:
        raise SmileError("experts: simple averaging needs at least one fine-tuned model")
    return task_arithmetic(base, experts, scaling=1.0 / len(experts))


def individual(base: nn.Module, experts: Mapping[str, nn.Module], *, model: str) -> nn.Module:
    """One model of the pool as is: an expert by name, or the pretrained model ('pretrained')."""
    if model == "pretrained":
        return copy.deepcopy(base)
    if model not in experts:
        raise SmileError(f"method.model: unknown model '{model}'; choose 'pretrained' or one of {sorted(experts)}")
    return copy.deepcopy(experts[model])
