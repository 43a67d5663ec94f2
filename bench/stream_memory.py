"""Peak memory of a causal-LM upscale read from the checkpoint files (streamed) against loading every model whole,
side by side in one run, each in its own child process, on a synthetic wide pool written to disk first.

    python bench/stream_memory.py                          # Mistral config: hidden 1024, 8 layers, 3 experts, fp16
    python bench/stream_memory.py --hidden 2048 --layers 8 --experts 3 --dtype bfloat16 --device cuda

Prints, per way of upscaling, the peak resident memory it added (peak RSS minus the RSS before it started, both
read from /proc) as a multiple of one model's bytes, its time, and whether the two SMILE models give identical
logits. The issue's target: streamed ≤ 1.5× one model; loading whole costs about T + 2.
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import tempfile
import time
from pathlib import Path

import torch

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def rss_bytes(field: str = "VmRSS") -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def make_pool(root: Path, args) -> dict:
    """A random base and experts that differ from it in every projection, saved as sharded safetensors."""
    from transformers import MistralConfig, MistralForCausalLM

    config = MistralConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 7 // 2,
                           num_hidden_layers=args.layers, num_attention_heads=args.hidden // 128,
                           num_key_value_heads=max(1, args.hidden // 512), tie_word_embeddings=False)
    torch.manual_seed(0)
    model = MistralForCausalLM(config).to(getattr(torch, args.dtype)).eval()
    model.save_pretrained(root / "base", max_shard_size="200MB")
    originals = {name: p.detach().clone() for name, p in model.named_parameters() if name.endswith("_proj.weight")}
    for i in range(args.experts):
        generator = torch.Generator().manual_seed(i + 1)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name in originals:
                    noise = torch.randn(param.shape, generator=generator, dtype=torch.float32)
                    param.copy_(originals[name] + (0.02 * noise).to(param.dtype))
        model.save_pretrained(root / f"expert{i}", max_shard_size="200MB")
        print(f"  expert{i} written", flush=True)
    bytes_per_model = sum(p.numel() * p.element_size() for p in model.parameters())
    return {"base": root / "base", "experts": [root / f"expert{i}" for i in range(args.experts)],
            "bytes": bytes_per_model}


def upscale_child(way: str, pool: dict, args, queue) -> None:
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM

    from smile_ray.smile import upscale
    from smile_ray.smile.weights import CheckpointWeights

    dtype = getattr(torch, args.dtype)
    warm_up(pool, dtype)
    before = rss_bytes()
    start = time.perf_counter()
    if way == "streamed":
        base = CheckpointWeights(pool["base"], dtype=dtype)
        experts = [CheckpointWeights(d, dtype=dtype) for d in pool["experts"]]
    else:
        base = AutoModelForCausalLM.from_pretrained(pool["base"], dtype=dtype)
        experts = [AutoModelForCausalLM.from_pretrained(d, dtype=dtype) for d in pool["experts"]]
    model = upscale(base, experts, gate_k=args.gate_k, k=args.k, targets=PROJECTIONS, device=args.device)
    seconds = time.perf_counter() - start
    peak = rss_bytes("VmHWM")
    with torch.no_grad():
        ids = torch.arange(16).reshape(2, 8) % args.vocab
        logits = model(input_ids=ids).logits.float().numpy()     # (a tensor would be shared, not copied)
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    queue.put({"added": peak - before, "seconds": seconds, "logits": logits, "smile_bytes": model_bytes})


def warm_up(pool: dict, dtype: torch.dtype) -> None:
    """What any upscale pays once per process, not per model: the architecture's modules imported, the linear
    algebra libraries loaded."""
    from torch import nn

    from smile_ray.smile import upscale
    from smile_ray.smile.weights import CheckpointWeights

    CheckpointWeights(pool["base"], dtype=dtype).skeleton()
    upscale(nn.Linear(64, 64), [nn.Linear(64, 64)], gate_k=4, k=4)


def measure(way: str, pool: dict, args) -> dict:
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    child = context.Process(target=upscale_child, args=(way, pool, args, queue))
    child.start()
    result = queue.get()
    child.join()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--experts", type=int, default=3)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    parser.add_argument("--gate-k", type=int, default=8)
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--device", default="cpu", help="where the SVDs run (cpu, cuda)")
    parser.add_argument("--dir", default=None, help="where to write the pool (default: a temporary directory)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        start = time.perf_counter()
        pool = make_pool(Path(tmp), args)
        mib = pool["bytes"] / 2**20
        print(f"pool: Mistral config, hidden {args.hidden}, {args.layers} layers, {args.experts} experts, "
              f"{args.dtype}: {mib:,.0f} MiB per model, written in {time.perf_counter() - start:.0f} s")
        results = {way: measure(way, pool, args) for way in ("streamed", "whole")}
    print(f"SMILE model (gate_k {args.gate_k}, k {args.k}): {results['streamed']['smile_bytes'] / 2**20:,.0f} MiB")
    print(f"{'upscale':<22} {'peak RSS added':>15} {'× one model':>12} {'seconds':>8}")
    for way, label in (("streamed", "streamed (this PR)"), ("whole", "every model loaded")):
        r = results[way]
        print(f"{label:<22} {r['added'] / 2**20:>11,.0f} MiB {r['added'] / pool['bytes']:>12.2f} {r['seconds']:>8.1f}")
    same = bool((results["streamed"]["logits"] == results["whole"]["logits"]).all())
    print(f"logits identical: {same}")
    print(f"streamed / whole peak: {results['streamed']['added'] / results['whole']['added']:.2f}")


if __name__ == "__main__":
    main()
