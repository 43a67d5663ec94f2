"""What the sweep service buys over a serial loop, on the embedded benchmark (ratios from one run).

1. Sweep ratio: a 12-configuration SMILE sweep (`python -m smile_ray.tune`, fresh output: SVD cache filled
   once, trials in parallel) against the status quo it replaces, 12 single runs in a serial loop that each
   compute their own SVDs (`python -m smile_ray.run --no-svd-cache`). Target ≤ 1/3.
2. Ray + MLflow overhead per trial: the same 12 configurations through `run_sweep` with one trial at a time
   (Ray already started, SVD cache warm) against `run_trial` called 12 times in-process on the same pools.
   Target ≤ 2 s per trial.

With `--pool b32`, part 1 runs on a pool whose SVDs cost what real ones do: a randomly initialised CLIP with
CLIP-ViT-B/32's vision tower shape (768 wide, 3072 MLP, `--layers` of its 12 layers) and eight experts made by
perturbing it, evaluated zero-shot on the embedded benchmark's eight test sets (images resized to 224, the first
`--max-samples` per task). The accuracies mean nothing; the timings are those of a B/32 pool cut to `--layers`.

    python bench/sweep_ratio.py [--workdir DIR]
    python bench/sweep_ratio.py --pool b32 [--layers 4] [--max-samples 8]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

GRID = {"gate_k": [4, 8, 16, 32], "k": [8, 32, -1]}
SPACE = {"name": "bench12", "model_pool": {"kind": "embedded"}, "task_pool": {"kind": "embedded"},
         "method": {"name": "smile", **GRID}, "search": {"max_concurrent": 2}, "resources": {"cpu": 1},
         "tracking": {"experiment": "smile-bench12"}}


def b32_shaped_space(root: Path, layers: int, max_samples: int) -> dict:
    """SPACE on a B/32-shaped random pool written under `root` (save_pretrained directories), with the embedded
    benchmark's tokenizer and test sets."""
    import copy
    import dataclasses

    import torch
    from transformers import AutoTokenizer, CLIPConfig, CLIPImageProcessor, CLIPModel

    from smile_ray.embedded import build_embedded

    embedded = build_embedded()
    tokenizer = AutoTokenizer.from_pretrained(embedded.clip_dir)
    clip_dir, experts = root / "clip", {task.name: root / task.name for task in embedded.tasks}
    if not (clip_dir / "model.safetensors").exists():   # written last: the pool is complete
        torch.manual_seed(0)
        config = CLIPConfig(
            vision_config={"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": layers,
                           "num_attention_heads": 12, "patch_size": 32, "image_size": 224},
            text_config={"hidden_size": 512, "intermediate_size": 2048, "num_hidden_layers": layers,
                         "num_attention_heads": 8, "vocab_size": len(tokenizer), "max_position_embeddings": 77,
                         "pad_token_id": tokenizer.pad_token_id, "bos_token_id": tokenizer.bos_token_id,
                         "eos_token_id": tokenizer.eos_token_id},
            projection_dim=512)
        clip = CLIPModel(config).eval()
        for path in experts.values():
            expert = copy.deepcopy(clip.vision_model)           # a CLIPVisionModel in transformers 5
            with torch.no_grad():
                for p in expert.parameters():
                    p.add_(torch.randn_like(p), alpha=1e-3)
            expert.save_pretrained(path)
        tokenizer.save_pretrained(clip_dir)
        processor = CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224})
        processor.save_pretrained(clip_dir)
        clip.save_pretrained(clip_dir)
    tasks = [{k: v for k, v in dataclasses.asdict(task).items() if k != "extra"} for task in embedded.tasks]
    return {**SPACE, "name": "bench12_b32",
            "model_pool": {"kind": "clip_vision", "base": str(clip_dir),
                           "experts": {name: str(path) for name, path in experts.items()}},
            "task_pool": {"kind": "clip_zero_shot", "tasks": tasks, "max_samples": max_samples},
            "tracking": {"experiment": "smile-bench12-b32"}}


def busy_core_seconds() -> float | None:
    """CPU time the whole machine has spent busy since boot, in core-seconds (Linux /proc/stat; None elsewhere).
    Every process counts, Ray's workers and daemons included, so the bench needs a quiet machine."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + fields[4]                                   # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")    # user … steal; guest time is inside user


def timed_command(command: list[str], env: dict[str, str]) -> tuple[float, float | None]:
    """(wall seconds, busy core-seconds of the machine meanwhile) of one command."""
    busy, start = busy_core_seconds(), time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    wall, busy_after = time.perf_counter() - start, busy_core_seconds()
    return wall, None if busy is None or busy_after is None else busy_after - busy


def load(wall: float, busy: float | None) -> str:
    cores = os.cpu_count() or 1
    return "" if busy is None else f"   cores busy {100 * busy / (wall * cores):3.0f}% ({busy:5.1f} core-s)"


def sweep_ratio(work: Path, env: dict[str, str], space_document: dict) -> None:
    space = work / f"{space_document['name']}.yaml"
    space.write_text(yaml.safe_dump(space_document))
    singles, singles_busy, single_timings = 0.0, 0.0, []
    for gate_k in GRID["gate_k"]:
        for k in GRID["k"]:
            report = work / f"single_{gate_k}_{k}.json"
            wall, busy = timed_command([sys.executable, "-m", "smile_ray.run", "--no-svd-cache",    # all CPUs
                                        "--config", str(space), "--set", f"method.gate_k={gate_k}",
                                        "--set", f"method.k={k}", "--report", str(report)], env)
            singles += wall
            singles_busy = None if busy is None or singles_busy is None else singles_busy + busy
            single_timings.append(json.loads(report.read_text())["timings"])
    shutil.rmtree(work / "sweep", ignore_errors=True)       # a fresh sweep: its SVD cache starts empty
    sweep, sweep_busy = timed_command([sys.executable, "-m", "smile_ray.tune", "--space", str(space),
                                       "--output", str(work / "sweep")], env)
    summary = json.loads((work / "sweep" / "summary.json").read_text())
    trials = summary["trials"]
    imports, _ = timed_command([sys.executable, "-c", "import smile_ray.trial"], env)
    print(f"1. 12 SMILE configurations on {space_document['name']} (wall time, whole commands):")
    print(f"   12 × python -m smile_ray.run --no-svd-cache (serial)  {singles:7.1f} s{load(singles, singles_busy)}")
    print(f"   python -m smile_ray.tune (one sweep)                 {sweep:7.1f} s{load(sweep, sweep_busy)}")
    print(f"   ratio {sweep / singles:.2f} (target ≤ 0.33)")
    print("   where the time goes:")
    for name, timings in (("serial runs", single_timings),
                          ("sweep trials", [{k.removeprefix("timings/"): v for k, v in t["metrics"].items()
                                             if k.startswith("timings/")} for t in trials])):
        totals = {key: sum(t[key] for t in timings) for key in ("load_seconds", "svd_seconds", "eval_seconds")}
        print(f"     {name:<13} " + ", ".join(f"{key.removesuffix('_seconds')} {value:5.1f} s"
                                            for key, value in totals.items()) + " (summed over 12)")
    prefill = summary["svd_prefill"]
    print(f"     sweep prefill {sum(p['svd_computed'] for p in prefill)} SVDs in "
          f"{sum(p['svd_seconds'] for p in prefill):.1f} s (summed over {len(prefill)} Ray tasks, one CPU each)")
    print(f"     one process importing torch + transformers (python -c 'import smile_ray.trial'): {imports:.1f} s")


def overhead(work: Path) -> None:
    import ray
    import torch

    from smile_ray.hub import quiet_transformers
    from smile_ray.spec import parse_space
    from smile_ray.trial import load_pools, run_trial
    from smile_ray.sweep.driver import run_sweep
    from smile_ray.sweep.record import SVD_CACHE_DIR, SweepOptions

    quiet_transformers()
    torch.set_num_threads(1)
    spec = parse_space({**SPACE, "search": {"max_concurrent": 1}}, "bench12")
    svd_cache = work / "overhead" / SVD_CACHE_DIR
    pools = load_pools(spec.model_pool, spec.task_pool)
    points = spec.grid_points()
    for _, largest, _ in spec.prefill_plan():    # warm the SVD cache at the ranks every point slices, as a prefill does
        run_trial({"method": {**points[0], **largest}}, pools=pools, svd_cache=svd_cache)
    start = time.perf_counter()
    for point in points:
        run_trial({"method": point}, pools=pools, svd_cache=svd_cache)
    direct = time.perf_counter() - start

    ray.init(num_cpus=2, include_dashboard=False)
    options = SweepOptions(output=work / "overhead", tracking_uri=f"sqlite:///{work / 'overhead' / 'mlflow.db'}",
                           experiment="smile-bench12-overhead", verbose=0)
    start = time.perf_counter()
    run_sweep(spec, options)
    tuned = time.perf_counter() - start
    ray.shutdown()
    print("\n2. the same 12 configurations one at a time, SVD cache warm:")
    print(f"   run_trial in-process              {direct:7.1f} s")
    print(f"   run_sweep (Ray Tune + MLflow)     {tuned:7.1f} s   overhead per trial "
          f"{(tuned - direct) / len(points):.2f} s (target ≤ 2 s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", help="where sweeps write (default: a temporary directory)")
    parser.add_argument("--pool", choices=("embedded", "b32"), default="embedded",
                        help="b32: part 1 only, on a B/32-shaped random pool (see above)")
    parser.add_argument("--layers", type=int, default=4, help="--pool b32: vision and text layers")
    parser.add_argument("--max-samples", type=int, default=8, help="--pool b32: test images per task")
    args = parser.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="smile_bench_"))
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "HF_HUB_OFFLINE": "1",
           "SMILE_RAY_CACHE": os.environ.get("SMILE_RAY_CACHE", str(Path.home() / ".cache" / "smile_ray"))}
    os.environ.update({k: env[k] for k in ("RAY_AUTH_MODE", "RAY_USAGE_STATS_ENABLED", "HF_HUB_OFFLINE",
                                            "SMILE_RAY_CACHE")})
    from smile_ray.embedded import build_embedded

    build_embedded()          # built (or found) before anything is timed: a first build would land in one run
    print(f"{os.cpu_count()} CPUs; output in {work}\n")
    if args.pool == "b32":
        sweep_ratio(work, env, b32_shaped_space(work / f"b32_pool_{args.layers}", args.layers, args.max_samples))
        return
    sweep_ratio(work, env, SPACE)
    overhead(work)


if __name__ == "__main__":
    main()
