"""Measure the embedded benchmark against its targets (zero-shot protocol, test splits, accuracy in %).

    python bench/embedded_targets.py [--scale full] [--configs 16:32,32:-1] [--threads 1]

Prints one row per model (pretrained, each expert on its own task, simple average, task arithmetic, SMILE at
each gate_k:k with top_k=1) and the three target checks:
  1. individual average ≥ pretrained zero-shot average + 30 points
  2. simple average ≤ individual average − 10 points
  3. best SMILE ≥ 95% of the individual average (also reported for low-rank experts alone)
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass

import datasets
import torch
import transformers
from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel, CLIPVisionModel

from smile_ray import simple_average, task_arithmetic, upscale
from smile_ray.embedded import EmbeddedBenchmark, build_embedded
from smile_ray.tasks.clip_zero_shot import zero_shot_head, zero_shot_logits

DEFAULT_CONFIGS = "8:16,16:16,16:32,16:64,32:32,32:64,32:-1"


@dataclass
class EvalTask:
    """A task's test split as tensors, with its zero-shot head."""

    name: str
    pixels: torch.Tensor
    labels: torch.Tensor
    head: torch.Tensor


def load_eval_tasks(bench: EmbeddedBenchmark, clip: CLIPModel) -> list[EvalTask]:
    """Test splits through the stored processor; heads from the pretrained text tower."""
    tokenizer = AutoTokenizer.from_pretrained(bench.clip_dir)
    processor = AutoImageProcessor.from_pretrained(bench.clip_dir)
    out = []
    for task in bench.tasks:
        split = datasets.load_from_disk(task.dataset)[task.split]
        pixels = processor(images=list(split[task.image_column]), return_tensors="pt")["pixel_values"]
        head = zero_shot_head(clip, tokenizer, task.classnames, task.templates)
        out.append(EvalTask(task.name, pixels, torch.tensor(split[task.label_column]), head))
    return out


@torch.no_grad()
def accuracy(clip: CLIPModel, vision: torch.nn.Module, task: EvalTask, batch_size: int = 256) -> float:
    """Top-1 accuracy in % of `vision` on one task."""
    vision.eval()
    correct = 0
    for start in range(0, len(task.labels), batch_size):
        logits = zero_shot_logits(clip, vision, task.pixels[start:start + batch_size], task.head)
        correct += int((logits.argmax(dim=-1) == task.labels[start:start + batch_size]).sum())
    return 100.0 * correct / len(task.labels)


def parse_configs(text: str) -> list[tuple[int, int]]:
    """'16:32,32:-1' → [(16, 32), (32, -1)]."""
    return [(int(g), int(k)) for g, k in (item.split(":") for item in text.split(",") if item)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", default="full")
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--force", action="store_true", help="rebuild the benchmark first")
    parser.add_argument("--configs", default=DEFAULT_CONFIGS, help="SMILE gate_k:k pairs (k < 0: dense)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()

    started = time.perf_counter()
    bench = build_embedded(args.cache_dir, scale=args.scale, force=args.force)
    built = json.loads((bench.root / "recipe.json").read_text())
    print(f"benchmark {bench.root} ready in {time.perf_counter() - started:.1f} s "
          f"(its build took {built['build_seconds']} s with {built['torch_threads']} torch thread(s))")
    clip = CLIPModel.from_pretrained(bench.clip_dir).eval()
    tasks = load_eval_tasks(bench, clip)
    names = [t.name for t in tasks]
    base = CLIPVisionModel.from_pretrained(bench.clip_dir).eval()

    def experts() -> dict[str, CLIPVisionModel]:
        return {name: CLIPVisionModel.from_pretrained(path).eval() for name, path in bench.experts.items()}

    rows: dict[str, list[float]] = {}
    rows["pretrained (zero-shot)"] = [accuracy(clip, base, t) for t in tasks]
    pool = experts()
    rows["individual"] = [accuracy(clip, pool[t.name], t) for t in tasks]
    rows["simple average"] = [accuracy(clip, simple_average(base, pool), t) for t in tasks]
    rows["task arithmetic λ=0.3"] = [accuracy(clip, task_arithmetic(base, pool, scaling=0.3), t) for t in tasks]
    smile_rows: dict[tuple[int, int], str] = {}
    for gate_k, k in parse_configs(args.configs):
        model = upscale(base, experts(), gate_k=gate_k, k=k, top_k=1)
        label = f"SMILE gate_k={gate_k} k={'dense' if k < 0 else k}"
        rows[label] = [accuracy(clip, model, t) for t in tasks]
        smile_rows[(gate_k, k)] = label

    def avg(label: str) -> float:
        return sum(rows[label]) / len(rows[label])

    width = max(len(label) for label in rows)
    print(f"\n{'model':<{width}} " + " ".join(f"{n[:9]:>9}" for n in names) + f" {'average':>9}")
    for label, accs in rows.items():
        print(f"{label:<{width}} " + " ".join(f"{a:9.1f}" for a in accs) + f" {avg(label):9.1f}")

    ind, pre, sa = avg("individual"), avg("pretrained (zero-shot)"), avg("simple average")
    checks = [(f"individual {ind:.1f} >= pretrained {pre:.1f} + 30", ind >= pre + 30),
              (f"simple average {sa:.1f} <= individual {ind:.1f} - 10", sa <= ind - 10)]
    if smile_rows:
        best = max(smile_rows.values(), key=avg)
        checks.append((f"best SMILE ({best}) {avg(best):.1f} = {100 * avg(best) / ind:.1f}% of individual >= 95%",
                       avg(best) >= 0.95 * ind))
        low_rank = [label for (g, k), label in smile_rows.items() if k > 0]
        if low_rank:
            best_lr = max(low_rank, key=avg)
            print(f"\nbest low-rank SMILE: {best_lr}: {avg(best_lr):.1f} = {100 * avg(best_lr) / ind:.1f}% "
                  "of individual")
    print()
    for text, ok in checks:
        print(f"{'PASS' if ok else 'FAIL'}  {text}")
    print(f"\ntotal {time.perf_counter() - started:.1f} s")
    return 0 if all(ok for _, ok in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
