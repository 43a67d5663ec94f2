"""Parameter accounting of merged and upscaled models (smile-facts §1.7).

Per upscaled layer (m out, n in, T experts, top_k K):
  extra  = T·gate_k·n + T·(k·(m + n) + m·[bias])     (k > 0; m·n instead of k·(m + n) when dense)
  active = everything except the (T − K) experts a token does not use
"""
from __future__ import annotations

from torch import nn

from smile_ray.smile.layer import SmileLinear


def count_parameters(model: nn.Module) -> int:
    """Parameters of `model`, shared tensors counted once."""
    return sum(p.numel() for p in model.parameters())


def parameter_report(model: nn.Module, base: nn.Module | int | None = None) -> dict[str, float]:
    """all_params, active_params (per token) and, given the base model (or its parameter count), extra_params and
    ratio."""
    total = count_parameters(model)
    idle = sum((layer.num_experts - layer.top_k) * layer.expert_parameter_count()
               for layer in model.modules() if isinstance(layer, SmileLinear))
    report: dict[str, float] = {"all_params": total, "active_params": total - idle}
    if base is not None:
        base_total = base if isinstance(base, int) else count_parameters(base)
        report.update(base_params=base_total, extra_params=total - base_total, ratio=total / base_total)
    return report
