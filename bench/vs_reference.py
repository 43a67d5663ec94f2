"""smile_ray against the reference implementation, FusionBench's SMILE (PyPI fusion-bench 0.2.33), side by side.

The project never depends on fusion-bench: the bench runs in a venv of its own, with the checkout on PYTHONPATH.

    python -m venv /tmp/ref && /tmp/ref/bin/pip install torch==2.13.0 fusion-bench==0.2.33
    PYTHONPATH=. /tmp/ref/bin/python bench/vs_reference.py                      # B/32-shaped, 12 layers, 8 experts
    PYTHONPATH=. /tmp/ref/bin/python bench/vs_reference.py --layers 4 --threads 1
    PYTHONPATH=. /tmp/ref/bin/python bench/vs_reference.py --only svd --device cuda

The pool: a randomly initialised vision tower (or one Mistral-7B decoder layer) and T experts W0 + ΔWᵢ for every
parameter. A linear layer's task vector is ΔW = G₁ diag(j^-decay) G₂ᵀ (Gaussian G, scaled to 5% of ‖W0‖): a
spectrum that falls off like fine-tuned task vectors' (`--decay 0` gives i.i.d. noise, the worst case for a
randomized SVD). Both implementations get the same pool; everything is printed as ratios of one run:

  agreement   relative difference of one layer's output and of the whole model's, and the share of tokens whose
              top-1 expert is the same (smile_ray exact and randomized against the reference)
  upscale     cold (no SVD cache) and warm (cache filled) upscale time, peak RSS added by the upscale and the bytes
              of storage the returned model keeps alive; each upscale in a child process of its own
  forward     one layer at 800 and 4096 tokens, top-1 and top-2; the whole model at batch 16 and 128
  svd         one 4096 × 14336 matrix at rank 8, 64 and 512: exact, randomized, torch.linalg.svd; the randomized
              factors' errors against the exact ones
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from timing import timed_side_by_side      # bench/timing.py

SHAPES = {   # config of each pool shape: (model family, config keyword arguments)
    "b32": ("clip", dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, image_size=224,
                         patch_size=32)),
    "l14": ("clip", dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=16, image_size=224,
                         patch_size=14)),
    "mistral-layer": ("mistral", dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                                      num_key_value_heads=8, vocab_size=128)),
}
TASK_VECTOR_SCALE = 0.05


# ---------------------------------------------------------------------------------------------------------------
# The pool, built once and kept on disk (safetensors) for the child processes

def make_model(shape: str, layers: int) -> nn.Module:
    from transformers import CLIPVisionConfig, CLIPVisionModel, MistralConfig, MistralModel

    family, kwargs = SHAPES[shape]
    if family == "clip":
        return CLIPVisionModel(CLIPVisionConfig(num_hidden_layers=layers, **kwargs)).eval()
    return MistralModel(MistralConfig(num_hidden_layers=layers, **kwargs)).eval()


def task_vector(weight: torch.Tensor, decay: float, generator: torch.Generator) -> torch.Tensor:
    """ΔW = G₁ diag(j^-decay) G₂ᵀ scaled to TASK_VECTOR_SCALE · ‖W‖ (Gaussian noise for a parameter that is not a
    matrix: biases, norms, the patch embedding's convolution)."""
    if weight.dim() != 2:
        delta = torch.randn(weight.shape, generator=generator)
    else:
        m, n = weight.shape
        q = min(m, n)
        spectrum = torch.arange(1, q + 1, dtype=torch.float32) ** -decay
        delta = (torch.randn(m, q, generator=generator) * spectrum) @ torch.randn(q, n, generator=generator)
    return delta * (TASK_VECTOR_SCALE * weight.norm() / delta.norm().clamp_min(1e-12))


def build_pool(args) -> Path:
    """Write base.safetensors and expert<i>.safetensors under the work directory (once per pool)."""
    pool = Path(args.work) / f"{args.shape}-L{args.layers}-T{args.experts}-decay{args.decay:g}"
    if (pool / "done").exists():
        return pool
    pool.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    base = make_model(args.shape, args.layers)
    weights = {name: t.detach().contiguous() for name, t in base.state_dict().items()}
    save_file(weights, pool / "base.safetensors")
    for i in range(args.experts):
        generator = torch.Generator().manual_seed(1000 + i)
        save_file({name: (w + task_vector(w, args.decay, generator)).contiguous() if w.is_floating_point() else w
                   for name, w in weights.items()}, pool / f"expert{i}.safetensors")
    (pool / "done").touch()
    return pool


def load_pool(args, pool: Path) -> tuple[nn.Module, list[nn.Module]]:
    def load(file: str) -> nn.Module:
        model = make_model(args.shape, args.layers)
        model.load_state_dict(load_file(pool / file))
        return model

    return load("base.safetensors"), [load(f"expert{i}.safetensors") for i in range(args.experts)]


# ---------------------------------------------------------------------------------------------------------------
# The two implementations

def upscale_with(impl: str, base: nn.Module, experts: list[nn.Module], args, svd_cache: str | None = None):
    if impl == "reference":
        from fusion_bench.method.smile_upscaling.smile_upscaling import SmileUpscalingAlgorithm

        algorithm = SmileUpscalingAlgorithm(device="cpu", full_matrices=False, gate_k=args.gate_k, k=args.k,
                                            top_k=args.top_k)
        # the reference empties the experts it read: it gets copies
        return algorithm.merge(base, [copy.deepcopy(e) for e in experts], in_place=False)
    from smile_ray import upscale

    return upscale(base, experts, gate_k=args.gate_k, k=args.k, top_k=args.top_k, svd_cache=svd_cache,
                   svd_solver=impl)


def reference_layer(base: nn.Linear, experts: list[nn.Linear], args, top_k: int) -> nn.Module:
    from fusion_bench.models.smile_moe.linear_from_module import SmileMoELinear

    # the reference overwrites its experts' weights with their task vectors: it gets copies
    return SmileMoELinear(copy.deepcopy(base), [copy.deepcopy(e) for e in experts], gate_k=args.gate_k, k=args.k,
                          top_k=top_k, full_matrices=False)


def model_input(args, batch: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(batch)
    if SHAPES[args.shape][0] == "clip":
        return {"pixel_values": torch.randn(batch, 3, 224, 224, generator=generator)}
    return {"input_ids": torch.randint(0, SHAPES[args.shape][1]["vocab_size"], (batch, 64), generator=generator)}


def forward(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).last_hidden_state


# ---------------------------------------------------------------------------------------------------------------
# Measuring

def rss_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def storage_bytes(model: nn.Module) -> tuple[int, int]:
    """(bytes of the model's tensors, bytes of the storages they keep alive)."""
    tensors = [*model.parameters(), *model.buffers()]
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(t.nbytes for t in tensors), sum(storages.values())


def child_upscale(args) -> None:
    """One upscale in this (fresh) process; prints a JSON line. With --save, the model is saved for the parent."""
    torch.set_num_threads(args.threads[0])
    base, experts = load_pool(args, Path(args.pool))
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")          # peak RSS from here on
    before = rss_bytes("VmRSS")
    cache = tempfile.mkdtemp(prefix="svd-") if args.impl != "reference" else None
    start = time.perf_counter()
    model = upscale_with(args.impl, base, experts, args, cache)
    cold = time.perf_counter() - start
    peak = rss_bytes("VmHWM") - before
    own, alive = storage_bytes(model)
    result = {"impl": args.impl, "threads": args.threads[0], "cold_s": cold, "peak_rss_added": peak,
              "model_bytes": own, "storage_alive": alive}
    if cache is not None:
        start = time.perf_counter()
        upscale_with(args.impl, base, experts, args, cache)
        result["warm_s"] = time.perf_counter() - start
    if args.save:
        torch.save(model, args.save)
    print("RESULT " + json.dumps(result), flush=True)


def run_child(args, impl: str, threads: int, save: Path | None) -> dict:
    command = [sys.executable, __file__, "--child", "--impl", impl, "--pool", args.pool, "--threads", str(threads),
               "--shape", args.shape, "--layers", str(args.layers), "--experts", str(args.experts),
               "--gate-k", str(args.gate_k), "--k", str(args.k), "--top-k", str(args.top_k),
               *(["--save", str(save)] if save else [])]
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode or not lines:
        sys.exit(f"child upscale ({impl}, {threads} threads) failed:\n{done.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


# ---------------------------------------------------------------------------------------------------------------
# The sections

IMPLS = ("reference", "exact", "randomized")


def section_upscale(args, work: Path) -> dict[str, Path]:
    """Cold/warm upscale, RSS and storage, each implementation in a child process, interleaved per thread count.
    The first thread count's models are saved for the agreement and forward sections."""
    print(f"\n## upscale: {args.shape}-shaped, {args.layers} layers, {args.experts} experts, gate_k {args.gate_k}, "
          f"k {args.k}, top-{args.top_k} (cold: no SVD cache; warm: the cache filled by the cold run)")
    saved = {impl: work / f"{impl}.pt" for impl in IMPLS}
    for threads in args.threads:
        rows = {impl: run_child(args, impl, threads, saved[impl] if threads == args.threads[0] else None)
                for impl in IMPLS}
        ref = rows["reference"]
        print(f"\n{threads} thread(s)        cold s   vs ref    warm s   peak RSS added   × model   storage alive")
        for impl, row in rows.items():
            print(f"  {impl:12s} {row['cold_s']:9.1f}  {ref['cold_s'] / row['cold_s']:6.2f}×  "
                  f"{row.get('warm_s', float('nan')):8.2f}   {row['peak_rss_added'] / 2**20:9.0f} MiB  "
                  f"{row['peak_rss_added'] / row['model_bytes']:6.2f}×   {row['storage_alive'] / 2**20:7.0f} MiB "
                  f"(model {row['model_bytes'] / 2**20:.0f} MiB)")
    return saved


def first_linear(model: nn.Module) -> tuple[str, nn.Linear]:
    return next((name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear))


def section_agreement_and_forward(args, saved: dict[str, Path]) -> None:
    models = {impl: torch.load(path, weights_only=False).eval() for impl, path in saved.items()}
    base, experts = load_pool(args, Path(args.pool))
    inputs = {batch: model_input(args, batch) for batch in (16, 128)}
    torch.set_num_threads(args.threads[0])
    outputs = {impl: forward(m, inputs[16]) for impl, m in models.items()}
    print(f"\n## agreement with the reference (batch 16): whole model output, relative difference")
    for impl in ("exact", "randomized"):
        print(f"  {impl:12s} {relative(outputs[impl], outputs['reference']):.1e}")

    name, base_linear = first_linear(base)
    expert_linears = [e.get_submodule(name) for e in experts]
    tokens_in = torch.randn(4096, base_linear.in_features, generator=torch.Generator().manual_seed(1))
    from smile_ray import upscale

    print(f"\n## one layer ({name}, {base_linear.in_features}→{base_linear.out_features}): agreement and forward "
          f"(median of {args.repeats}, interleaved)")
    for top_k in (1, 2):
        layers = {"reference": reference_layer(base_linear, expert_linears, args, top_k)}
        for solver in ("exact", "randomized"):
            layers[solver] = upscale(base_linear, expert_linears, gate_k=args.gate_k, k=args.k, top_k=top_k,
                                     svd_solver=solver)
        with torch.no_grad():
            ys = {impl: layer(tokens_in) for impl, layer in layers.items()}
            picks = {impl: layer.route(tokens_in)[1][:, 0] for impl, layer in layers.items() if impl != "reference"}
            ref_logits = layers["reference"].gate(tokens_in)
            ref_pick = ref_logits.topk(1, dim=-1).indices[:, 0]
        for impl in ("exact", "randomized"):
            print(f"  top-{top_k} {impl:12s} output rel. diff {relative(ys[impl], ys['reference']):.1e}, "
                  f"same top-1 expert for {100 * (picks[impl] == ref_pick).float().mean():.2f}% of tokens")
        for threads in args.threads:
            torch.set_num_threads(threads)
            for count in (800, 4096):
                x = tokens_in[:count]
                with torch.no_grad():
                    t_dense, t_ref, t_ours = timed_side_by_side(
                        [lambda: base_linear(x), lambda: layers["reference"](x), lambda: layers["exact"](x)],
                        args.repeats, torch.device("cpu"))
                print(f"  top-{top_k} {threads} thread(s) {count:5d} tokens: dense {1e3 * t_dense:7.2f} ms, "
                      f"reference {t_ref / t_dense:5.2f}× dense, smile_ray {t_ours / t_dense:5.2f}× dense "
                      f"→ smile_ray {t_ref / t_ours:5.2f}× faster")

    print(f"\n## whole model forward (median of {args.repeats}, interleaved)")
    for threads in args.threads:
        torch.set_num_threads(threads)
        for batch, x in inputs.items():
            t_base, t_ref, t_ours = timed_side_by_side(
                [lambda: forward(base, x), lambda: forward(models["reference"], x),
                 lambda: forward(models["exact"], x)], max(3, args.repeats // 4), torch.device("cpu"))
            print(f"  {threads} thread(s) batch {batch:4d}: base {t_base:6.2f} s, reference {t_ref / t_base:5.2f}× "
                  f"base, smile_ray {t_ours / t_base:5.2f}× base → smile_ray {t_ref / t_ours:5.2f}× faster")


def section_svd(args) -> None:
    """One 4096 × 14336 matrix with the pool's spectrum: exact, randomized and torch.linalg.svd."""
    from smile_ray.smile.svd import truncated_svd

    device = torch.device(args.device)
    torch.set_num_threads(max(args.threads))
    m, n = 4096, 14336
    generator = torch.Generator().manual_seed(7)
    spectrum = torch.arange(1, m + 1, dtype=torch.float32) ** -args.decay
    matrix = (torch.randn(m, m, generator=generator) * spectrum) @ torch.randn(m, n, generator=generator)
    matrix = (matrix / matrix.norm()).to(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def timed(fn):
        sync()
        start = time.perf_counter()
        out = fn()
        sync()
        return time.perf_counter() - start, out

    print(f"\n## one {m} × {n} SVD on {device}, {max(args.threads)} thread(s), spectrum j^-{args.decay:g}")
    t_full, _ = timed(lambda: torch.linalg.svd(matrix, full_matrices=False))
    print(f"  torch.linalg.svd(full_matrices=False), every rank: {t_full:.1f} s")
    for rank in args.svd_ranks:
        t_exact, exact = timed(lambda: truncated_svd(matrix, rank, device))
        t_fast, fast = timed(lambda: truncated_svd(matrix, rank, device, "randomized"))
        router = min(rank, args.gate_k)
        # sin of the largest principal angle between the two top-`router` right singular subspaces
        v, w = exact.v[:, :router].double(), fast.v[:, :router].double()
        sin = torch.linalg.matrix_norm(w - v @ (v.T @ w), ord=2).item()
        recon = relative((fast.u * fast.s) @ fast.v.T, (exact.u * exact.s) @ exact.v.T)
        print(f"  rank {rank:4d}: exact {t_exact:7.1f} s ({t_full / t_exact:5.2f}× svd), randomized {t_fast:7.1f} s "
              f"({t_full / t_fast:5.2f}× svd, {t_exact / t_fast:5.2f}× exact); randomized vs exact: "
              f"σ rel. err {((fast.s - exact.s).abs().max() / exact.s[0]).item():.1e}, rank-{rank} reconstruction "
              f"{recon:.1e}, top-{router} subspace sin θ {sin:.1e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="b32")
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--gate-k", type=int, default=16)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--top-k", type=int, default=1)
    parser.add_argument("--decay", type=float, default=1.0, help="task vectors' spectrum j^-decay (0: flat)")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--only", choices=["upscale", "svd"], help="one section (upscale also measures agreement "
                        "and forward)")
    parser.add_argument("--svd-ranks", type=int, nargs="+", default=[8, 64, 512])
    parser.add_argument("--device", default="cpu", help="where the svd section runs (cpu or cuda)")
    parser.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "smile_vs_reference"))
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--impl", choices=IMPLS, help=argparse.SUPPRESS)
    parser.add_argument("--pool", help=argparse.SUPPRESS)
    parser.add_argument("--save", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child_upscale(args)
    from importlib.metadata import version

    print(f"fusion-bench {version('fusion-bench')}, torch {torch.__version__}, {os.cpu_count()} CPUs")
    if args.only != "svd":
        args.pool = str(build_pool(args))
        with tempfile.TemporaryDirectory(dir=args.work) as work:
            section_agreement_and_forward(args, section_upscale(args, Path(work)))
    if args.only != "upscale":
        section_svd(args)


if __name__ == "__main__":
    main()
