"""SmileLinear: the SMILE layer, where the whole forward formula lives.

For one token x ∈ Rⁿ (a row of the flattened input), with T experts built from task vectors
ΔWᵢ = Wᵢ − W0 = Uᵢ Sᵢ Vᵢᵀ:

    y0      = W0 x + b0                                   shared (pretrained) layer
    rᵢ(x)   = ‖ Vᵢ[:, :gate_k]ᵀ x ‖₂                       router logit of expert i
    p       = softmax(r)                                  over the T experts
    K       = top_k experts with the largest pᵢ, weights p̂ᵢ = pᵢ / Σ_{j∈K} pⱼ
    Eᵢ(x)   = Uᵢ[:, :k] Sᵢ[:k] Vᵢ[:, :k]ᵀ x + (bᵢ − b0)    low-rank expert (k > 0)
            = ΔWᵢ x + (bᵢ − b0)                           dense expert (k < 0)
    y       = y0 + Σ_{i∈K} p̂ᵢ Eᵢ(x)

With a single expert the routing weight is 1. An expert that is not "routable" (its ΔWᵢ is zero in
this layer) gets zero router vectors and a logit of −∞, so it never takes weight from the others.

The experts run as one sparse dispatch, not a Python loop: token→expert assignments are sorted
by expert and each expert multiplies only its own contiguous group of tokens, in one grouped GEMM
(`torch.nn.functional.grouped_mm`); the results are added back to their tokens with `index_add_`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SmileLinear(nn.Module):
    """A linear layer upscaled into a sparse mixture of low-rank (or dense) experts.

    Parameters (T experts, input n, output m):
      base.weight (m, n), base.bias (m,)      W0, b0
      gate (T, gate_k, n)                      Vᵢ[:, :gate_k]ᵀ stacked
      u (T, m, k), svh (T, k, n)               Uᵢ[:, :k] and Sᵢ[:k] Vᵢ[:, :k]ᵀ      (k > 0)
      delta (T, m, n)                          ΔWᵢ                                  (k < 0)
      expert_bias (T, m)                       bᵢ − b0                              (if the layer has a bias)
    Buffer routable (T,) bool: experts with a non-zero task vector in this layer.
    """

    def __init__(self, in_features: int, out_features: int, num_experts: int, *, gate_k: int, k: int,
                 top_k: int = 1, bias: bool = True, device=None, dtype=None):
        super().__init__()
        if gate_k <= 0:
            raise ValueError(f"gate_k must be positive, got {gate_k}")
        if k == 0:
            raise ValueError("k must be a positive rank, or negative for dense experts; got 0")
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k must be between 1 and the number of experts ({num_experts}), got {top_k}")
        factory = {"device": device, "dtype": dtype}
        self.in_features, self.out_features = in_features, out_features
        self.num_experts, self.gate_k, self.k, self.top_k = num_experts, gate_k, k, top_k
        self.base = nn.Linear(in_features, out_features, bias=bias, **factory)
        self.gate = nn.Parameter(torch.empty(num_experts, gate_k, in_features, **factory))
        if k > 0:
            self.u = nn.Parameter(torch.empty(num_experts, out_features, k, **factory))
            self.svh = nn.Parameter(torch.empty(num_experts, k, in_features, **factory))
        else:
            self.delta = nn.Parameter(torch.empty(num_experts, out_features, in_features, **factory))
        self.expert_bias = nn.Parameter(torch.empty(num_experts, out_features, **factory)) if bias else None
        self.register_buffer("routable", torch.ones(num_experts, dtype=torch.bool, device=device))

    @property
    def dense_experts(self) -> bool:
        return self.k < 0

    @property
    def weight(self) -> torch.Tensor:
        """W0, so that code reading `layer.weight.dtype/device` keeps working."""
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    def expert_parameter_count(self) -> int:
        """Parameters of one expert: k·(m + n) (or m·n when dense) plus m for the bias."""
        m, n = self.out_features, self.in_features
        per = m * n if self.dense_experts else self.k * (m + n)
        return per + (m if self.expert_bias is not None else 0)

    def extra_repr(self) -> str:
        k = "dense" if self.dense_experts else self.k
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"num_experts={self.num_experts}, gate_k={self.gate_k}, k={k}, top_k={self.top_k}")

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Routing of N tokens x (N, n) → (weights (N, K), expert indices (N, K)).

        Logits are norms of the projections onto each expert's router subspace; softmax runs in
        float32 whatever the model dtype.
        """
        n_tokens = x.shape[0]
        if self.num_experts == 1:
            ones = torch.ones(n_tokens, 1, device=x.device, dtype=torch.float32)
            return ones, torch.zeros(n_tokens, 1, device=x.device, dtype=torch.long)
        projections = F.linear(x, self.gate.flatten(0, 1))                            # (N, T·gate_k)
        logits = projections.view(n_tokens, self.num_experts, self.gate_k).float().norm(dim=-1)  # (N, T)
        logits = logits.masked_fill(~self.routable, float("-inf"))
        if self.top_k == 1:                             # softmax is monotone and p̂ = 1: the arg-max decides
            return torch.ones(n_tokens, 1, device=x.device), logits.argmax(dim=-1, keepdim=True)
        probs = logits.softmax(dim=-1)
        weights, experts = probs.topk(self.top_k, dim=-1)                              # (N, K)
        return weights / weights.sum(dim=-1, keepdim=True), experts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, self.in_features)                                            # (N, n)
        y = self.base(x)                                                               # (N, m) = W0 x + b0
        weights, experts = self.route(x)                                               # (N, K)
        self._add_experts(y, x, weights, experts)
        return y.view(*shape[:-1], self.out_features)

    def _add_experts(self, y: torch.Tensor, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor) -> None:
        """y += Σ_K p̂ᵢ Eᵢ(x) in place, computing each expert only on the tokens routed to it.

        The (token, expert) assignments are sorted by expert, so each expert's tokens are one contiguous
        group, and every expert multiplies its own group in one grouped GEMM (no padding, no loop).
        """
        n_tokens, top_k = experts.shape
        expert_of = experts.reshape(-1)                                                # (N·K,)
        order = expert_of.argsort(stable=True)
        group_ends = torch.bincount(expert_of, minlength=self.num_experts).cumsum(0).to(torch.int32)  # (T,)
        token_of = order // top_k                                                      # sorted assignment → token
        inner = x.index_select(0, token_of)                                            # (N·K, n), grouped by expert
        if self.dense_experts:
            outer = self.delta                                                         # ΔWᵢ: (T, m, n)
        else:
            inner = grouped_linear(inner, self.svh, group_ends)                        # Sᵢ Vᵢᵀ x: (N·K, k)
            outer = self.u                                                             # Uᵢ: (T, m, k)
        inner = inner * weights.reshape(-1)[order].unsqueeze(1).to(inner.dtype)
        y.index_add_(0, token_of, grouped_linear(inner, outer, group_ends))           # (N·K, m)
        if self.expert_bias is not None:                                               # Σ_K p̂ᵢ (bᵢ − b0)
            dense_weights = x.new_zeros(n_tokens, self.num_experts).scatter_(1, experts, weights.to(x.dtype))
            y.addmm_(dense_weights, self.expert_bias)


def grouped_linear(x: torch.Tensor, weight: torch.Tensor, group_ends: torch.Tensor) -> torch.Tensor:
    """Rows of x (R, in) grouped by expert, each group times its own weight (T, out, in) transposed → (R, out).

    group_ends[i] is where group i's rows end. Grouped GEMM kernels want 16-byte-aligned rows, so odd sizes
    (e.g. k = 3) are zero-padded, which changes no result.
    """
    out_features, in_features = weight.shape[1:]
    align = max(1, 16 // x.element_size())
    pad_in, pad_out = -in_features % align, -out_features % align
    if pad_in or pad_out:
        x, weight = F.pad(x, (0, pad_in)), F.pad(weight, (0, pad_in, 0, pad_out))
    return F.grouped_mm(x, weight.transpose(1, 2), offs=group_ends)[:, :out_features]
