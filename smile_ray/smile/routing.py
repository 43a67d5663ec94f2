"""Where a SMILE model sends its tokens: per upscaled layer, the share of tokens whose first choice is each expert.

    with RoutingRecorder(model) as recorder:
        evaluate(model, task_a)
        shares_a = recorder.take()            # {layer: [share of expert 0, …]}, counts reset
        evaluate(model, task_b)
        shares_b = recorder.take()

Every token a layer sees counts (padding included). Pure torch; the sweep logs what it finds (smile_ray.tracking).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from smile_ray.smile.layer import SmileLinear


class RoutingRecorder:
    """Counts each SmileLinear's first choices while active (a context manager)."""

    def __init__(self, model: nn.Module) -> None:
        self.layers = {name: m for name, m in model.named_modules() if isinstance(m, SmileLinear)}

    def __enter__(self) -> RoutingRecorder:
        for layer in self.layers.values():
            layer.routing_counts = torch.zeros(layer.num_experts, dtype=torch.long, device=layer.gate.device)
        return self

    def __exit__(self, *exc: object) -> None:
        for layer in self.layers.values():
            layer.routing_counts = None

    def take(self) -> dict[str, list[float]]:
        """layer → share of the tokens since the last take whose first choice was each expert; counts reset."""
        return {name: shares(counts) for name, counts in self.take_counts().items()}

    def take_counts(self) -> dict[str, torch.Tensor]:
        """layer → tokens since the last take whose first choice was each expert (on the CPU); counts reset."""
        counts = {}
        for name, layer in self.layers.items():
            counts[name] = layer.routing_counts.cpu().clone()
            layer.routing_counts.zero_()
        return counts


def shares(counts: torch.Tensor) -> list[float]:
    """Counts per expert as shares of their sum (all zero when nothing was counted)."""
    counts = counts.double()
    return (counts / counts.sum().clamp_min(1)).tolist()


def own_expert_share(routing: Mapping[str, Mapping[str, Sequence[float]]], experts: Sequence[str]) -> dict[str, float]:
    """task → the share of its tokens routed to the expert of the same name, averaged over layers (tasks without an
    expert of their name are left out)."""
    own = {}
    for task, layers in routing.items():
        if task in experts and layers:
            index = list(experts).index(task)
            own[task] = sum(shares[index] for shares in layers.values()) / len(layers)
    return own
