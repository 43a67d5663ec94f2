"""SMILE layer and upscale speed, measured side by side in one run (ratios, not absolute seconds).

1. Forward of one SmileLinear (768→768, 8 experts, gate_k 16, k 32, top_k 1, 4096 tokens) against the
   dense nn.Linear it replaces, and against the reference implementation's shape: a Python loop over
   experts (one-hot mask, torch.where, index_add_).  Target: SMILE ≤ 1.4× dense.
2. upscale() of a CLIP-ViT-B/32-shaped random pool (8 experts) with the truncated SVD against the same
   upscale with full SVDs (torch.linalg.svd, full_matrices=True, as the reference computes them).

    python bench/smile_layer.py                  # everything (B/32 upscale: several minutes on 2 CPUs)
    python bench/smile_layer.py --layers 2       # a 2-layer B/32-shaped pool, for a quick look
    python bench/smile_layer.py --skip-upscale --device cuda --tokens 65536   # the forward on a GPU
"""
from __future__ import annotations

import argparse
import copy
import os
import time

import torch
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModel

import smile_ray.smile.svd as svd_module
from smile_ray import SmileLinear, upscale
from timing import timed_side_by_side      # bench/timing.py


def expert_loop_forward(layer: SmileLinear, x: torch.Tensor) -> torch.Tensor:
    """The reference's expert dispatch: route, then a Python loop over experts with torch.where + index_add_."""
    y = layer.base(x)
    weights, experts = layer.route(x)
    mask = torch.nn.functional.one_hot(experts, layer.num_experts).permute(2, 1, 0)     # (T, K, N)
    for i in range(layer.num_experts):
        slot, token = torch.where(mask[i])
        if token.numel() == 0:
            continue
        out = (x[token] @ layer.svh[i].T) @ layer.u[i].T + layer.expert_bias[i]
        y.index_add_(0, token, out * weights[token, slot, None])
    return y


def forward_bench(tokens: int, repeats: int, device: torch.device) -> None:
    torch.manual_seed(0)
    n = m = 768
    layer = SmileLinear(n, m, 8, gate_k=16, k=32, top_k=1, device=device)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(std=0.02)
    dense = nn.Linear(n, m, device=device)
    x = torch.randn(tokens, n, device=device)
    with torch.no_grad():
        torch.testing.assert_close(expert_loop_forward(layer, x), layer(x), rtol=1e-4, atol=1e-4)
        t_dense, t_smile, t_loop = timed_side_by_side(
            [lambda: dense(x), lambda: layer(x), lambda: expert_loop_forward(layer, x)], repeats, device)
    print(f"forward on {device}, {tokens} tokens, 768→768, 8 experts, gate_k 16, k 32, top_k 1 "
          f"(median of {repeats}):")
    print(f"  dense nn.Linear       {1e3 * t_dense:8.2f} ms   1.00×")
    print(f"  SmileLinear           {1e3 * t_smile:8.2f} ms   {t_smile / t_dense:.2f}× dense   (target ≤ 1.4×)")
    print(f"  per-expert loop       {1e3 * t_loop:8.2f} ms   {t_loop / t_dense:.2f}× dense   "
          f"(SmileLinear is {t_loop / t_smile:.2f}× faster)")


def full_svd(matrix: torch.Tensor, rank: int, device=None) -> svd_module.Factors:
    """What the reference computes: a full SVD (all of U and V), then the top `rank` kept."""
    u, s, vh = torch.linalg.svd(matrix.to(device or matrix.device, torch.float32), full_matrices=True)
    rank = min(rank, s.numel())
    return svd_module.Factors(u[:, :rank].cpu(), s[:rank].cpu(), vh[:rank].T.contiguous().cpu(), rank == s.numel())


def b32_pool(layers: int, experts: int) -> tuple[nn.Module, list[nn.Module]]:
    config = CLIPVisionConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=layers,
                              num_attention_heads=12, patch_size=32, image_size=224)
    torch.manual_seed(0)
    base = CLIPVisionModel(config).eval()
    pool = []
    for _ in range(experts):
        expert = copy.deepcopy(base)
        with torch.no_grad():
            for p in expert.parameters():
                p.add_(torch.randn_like(p), alpha=1e-3)
        pool.append(expert)
    return base, pool


def upscale_bench(layers: int, device: torch.device) -> None:
    base, experts = b32_pool(layers, 8)
    linears = sum(isinstance(m, nn.Linear) for m in base.modules())
    print(f"\nupscale of a CLIP-ViT-B/32-shaped pool: {layers} layers, 8 experts, {linears * 8} SVDs on {device}, "
          "gate_k 16, k 32:")
    svd_module.truncated_svd(torch.randn(64, 48), 8, device)       # warm-up: the first linalg call loads its library
    full_svd(torch.randn(64, 48), 8, device)
    start = time.perf_counter()
    upscale(base, experts, gate_k=16, k=32, device=device)
    t_truncated = time.perf_counter() - start
    truncated = svd_module.truncated_svd
    svd_module.truncated_svd = full_svd
    try:
        start = time.perf_counter()
        upscale(base, experts, gate_k=16, k=32, device=device)
        t_full = time.perf_counter() - start
    finally:
        svd_module.truncated_svd = truncated
    print(f"  truncated SVD (Gram, top r)   {t_truncated:8.1f} s   1.00×")
    print(f"  full SVD (full_matrices)      {t_full:8.1f} s   {t_full / t_truncated:.2f}× slower")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=40)
    parser.add_argument("--layers", type=int, default=12, help="transformer layers of the B/32-shaped pool")
    parser.add_argument("--skip-upscale", action="store_true")
    parser.add_argument("--device", default="cpu", help="where the forward runs: cpu or cuda (the upscale always "
                                                        "runs its SVDs there too)")
    args = parser.parse_args()
    device = torch.device(args.device)
    threads = len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{threads} CPU threads"
    print(f"torch {torch.__version__}, {where}\n")
    forward_bench(args.tokens, args.repeats, device)
    if not args.skip_upscale:
        upscale_bench(args.layers, device)


if __name__ == "__main__":
    main()
