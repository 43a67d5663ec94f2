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

The experts run as one sparse dispatch, not a Python loop over experts: token→expert assignments are
sorted by expert and cut into equal blocks that each belong to one expert, two `bmm`s multiply every
block by its expert's factors, and `index_add_` puts the results back on their tokens (in chunks of
blocks sized for the cache).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# Activation bytes per dispatch chunk, (accelerator, CPU): about an L2/L3 share on a CPU; on an accelerator a
# bound on temporary memory that ordinary batches never reach.
CHUNK_BYTES = (256 << 20, 4 << 20)


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
        # every parameter is filled by upscale or load_state_dict: none is randomly initialised first
        self.base = nn.utils.skip_init(nn.Linear, in_features, out_features, bias=bias, dtype=dtype,
                                       device=torch.get_default_device() if device is None else device)
        self.gate = nn.Parameter(torch.empty(num_experts, gate_k, in_features, **factory))
        if k > 0:
            self.u = nn.Parameter(torch.empty(num_experts, out_features, k, **factory))
            self.svh = nn.Parameter(torch.empty(num_experts, k, in_features, **factory))
        else:
            self.delta = nn.Parameter(torch.empty(num_experts, out_features, in_features, **factory))
        self.expert_bias = nn.Parameter(torch.empty(num_experts, out_features, **factory)) if bias else None
        self.register_buffer("routable", torch.ones(num_experts, dtype=torch.bool, device=device))
        self.routing_counts: torch.Tensor | None = None    # (T,) tokens whose first choice was expert i, when recording

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
        if self.routing_counts is not None:
            self.routing_counts += torch.bincount(experts[:, 0], minlength=self.num_experts).to(self.routing_counts)
        self._add_experts(y, x, weights, experts)
        return y.view(*shape[:-1], self.out_features)

    def _add_experts(self, y: torch.Tensor, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor) -> None:
        """y += Σ_K p̂ᵢ Eᵢ(x) in place, computing each expert only on the tokens routed to it.

        The A = N·K (token, expert) assignments are sorted by expert and cut into blocks of B rows, each
        block belonging to one expert: a bounded number of blocks however unevenly tokens are routed.
        Two `bmm`s over the blocks (each with its expert's factors) compute every expert on its own tokens;
        unused rows of a last, partial block carry weight 0 and add nothing. Blocks go through in chunks of
        about CHUNK_BYTES of activations, so the gathered rows and expert outputs stay in cache on a CPU and
        bound the temporary memory on an accelerator.
        """
        top_k = experts.shape[1]
        device = x.device
        expert_of = experts.reshape(-1)                                                # (A,)
        order = expert_of.argsort(stable=True)
        expert_sorted = expert_of[order]
        counts = torch.bincount(expert_of, minlength=self.num_experts)                 # (T,) assignments per expert
        # B = ⌈A / 4T⌉ (≤ 5T blocks; padding ≤ A/4 rows);
        # dense experts copy a whole ΔWᵢ per block: ⌈A / T⌉
        block = -(-expert_of.numel() // (self.num_experts * (1 if self.dense_experts else 4)))
        blocks = (counts + block - 1) // block                                         # (T,) blocks per expert
        block_expert = torch.repeat_interleave(torch.arange(self.num_experts, device=device), blocks)  # (NB,)
        rank = torch.arange(order.numel(), device=device) - (counts.cumsum(0) - counts)[expert_sorted]
        slot = ((blocks.cumsum(0) - blocks)[expert_sorted] + rank // block) * block + rank % block
        n_slots = block_expert.numel() * block
        slot_token = torch.zeros(n_slots, dtype=torch.long, device=device).index_copy_(0, slot, order // top_k)
        slot_weight = x.new_zeros(n_slots).index_copy_(0, slot, weights.reshape(-1)[order].to(x.dtype))

        row_bytes = max(self.in_features, self.out_features) * x.element_size()
        chunk = max(1, CHUNK_BYTES[device.type == "cpu"] // (row_bytes * block))       # blocks per chunk
        for first in range(0, block_expert.numel(), chunk):
            chunk_experts = block_expert[first:first + chunk]                          # (nb,)
            rows = slice(first * block, (first + chunk_experts.numel()) * block)
            tokens, weight = slot_token[rows], slot_weight[rows].view(-1, block, 1)    # (nb·B,), (nb, B, 1)
            packed = x.index_select(0, tokens).view(-1, block, self.in_features)       # (nb, B, n)
            if self.dense_experts:                                                     # p̂ ΔWᵢ x
                out = torch.bmm(packed * weight, self.delta[chunk_experts].transpose(1, 2))
            else:                                                                      # Uᵢ (p̂ Sᵢ Vᵢᵀ x)
                inner = torch.bmm(packed, self.svh[chunk_experts].transpose(1, 2)) * weight
                out = torch.bmm(inner, self.u[chunk_experts].transpose(1, 2))          # (nb, B, m)
            if self.expert_bias is not None:                                           # + p̂ (bᵢ − b0)
                out.baddbmm_(weight, self.expert_bias[chunk_experts].unsqueeze(1))
            y.index_add_(0, tokens, out.view(-1, self.out_features))
