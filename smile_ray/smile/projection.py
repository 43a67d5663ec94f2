"""Singular projection merging (smile-facts §3): keep only the part of a task vector that lies in
a chosen subspace of the pretrained weight's singular directions.

For each linear layer, W0 = U diag(s) Vᵀ and ΔW = W_ft − W0:
  Space I      U_k U_kᵀ ΔW V_k V_kᵀ                   the top-k singular directions of W0
  Space II     U_r U_rᵀ ΔW V_r V_rᵀ                   the remaining singular directions (k+1 … min(m, n))
  Space II+III (I − U_k U_kᵀ) ΔW (I − V_k V_kᵀ)       everything but the top k, null spaces included
k < 0 picks the smallest k whose singular values reach half of Σ s. The merged layer is W0 plus the
projection, with the fine-tuned bias; every other parameter comes from the fine-tuned model.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from smile_ray.errors import SmileError
from smile_ray.smile.svd import Decomposer, SvdCache
from smile_ray.smile.upscale import Model, UpscaleInfo, check_finite, check_same_architecture, matches
from smile_ray.smile.weights import as_weights

SPACES = ("I", "II", "II+III")


def energy_rank(s: torch.Tensor, fraction: float = 0.5) -> int:
    """Smallest k with Σ_{i≤k} sᵢ ≥ fraction · Σ s (sum of singular values, not squares)."""
    return int((s.cumsum(0) < fraction * s.sum()).sum()) + 1


def project(delta: torch.Tensor, u: torch.Tensor, v: torch.Tensor, k: int, space: str) -> torch.Tensor:
    """The part of `delta` (m × n) in `space`, given W0's singular vectors u (m × r), v (n × r)."""
    if space == "I":
        uk, vk = u[:, :k], v[:, :k]
        return uk @ (uk.T @ delta @ vk) @ vk.T
    if space == "II":
        ur, vr = u[:, k:], v[:, k:]
        return ur @ (ur.T @ delta @ vr) @ vr.T
    uk, vk = u[:, :k], v[:, :k]
    left = delta - uk @ (uk.T @ delta)                          # (I − U_k U_kᵀ) ΔW
    return left - (left @ vk) @ vk.T                            # … (I − V_k V_kᵀ)


@torch.no_grad()
def projection_merge(base: Model, finetuned: Model, *, space: str = "II+III", k: int = -1,
                     targets: Sequence[str] | None = None, svd_cache: SvdCache | str | Path | None = None,
                     device: torch.device | str | None = None) -> nn.Module:
    """Merge one fine-tuned model into its base through the projection onto `space`; a new module, with
    `.smile_info` (an UpscaleInfo: the projected layers and the SVDs of W0 computed or taken from the cache)."""
    if space not in SPACES:
        raise SmileError(f"method.space: must be one of {list(SPACES)}, got {space!r}")
    if not isinstance(k, int) or k == 0:
        raise SmileError(f"method.k: must be a positive rank or negative (half the singular-value mass), got {k!r}")
    base, finetuned = as_weights(base), as_weights(finetuned)
    check_same_architecture(base, {"finetuned": finetuned})
    decomposer = Decomposer(svd_cache, device)
    merged = finetuned.instantiate()
    merged_modules = dict(merged.named_modules())
    info = UpscaleInfo()
    for name in base.linear_names():
        if not matches(name, targets):
            continue
        layer, target = base.linear(name), merged_modules[name]
        check_finite(name, {"the pretrained model": layer.weight, "the fine-tuned model": target.weight})
        w0 = layer.weight.detach().float()
        key = decomposer.key(name, decomposer.digest(layer.weight), "", "base")
        factors = decomposer.factors(w0, min(w0.shape), key)
        layer_k = min(k, factors.rank) if k > 0 else energy_rank(factors.s)
        delta = project(target.weight.detach().float() - w0, factors.u, factors.v, layer_k, space)
        target.weight.copy_((w0 + delta).to(target.weight.dtype))
        info.upscaled_layers.append(name)
    info.count_svds(decomposer.stats)
    merged.smile_info = info
    return merged
