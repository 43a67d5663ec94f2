"""An embedded benchmark's result table and its three targets, through the product's own code path.

    python bench/embedded_targets.py [--benchmark clip|t5|t5_lora|lm] [--scale S] [--configs 8:16,16:32]
                                     [--threads 1] [--json PATH]

Every row is `run_trial` (pools loaded once; each task's primary metric in %: accuracy, Spearman ρ for the text
benchmark's stsb, exact match or acc_norm for the LM benchmark's lm-eval tasks): the pretrained model, each expert
on its own task ("individual"), simple average, task arithmetic (λ = 0.3), SMILE at each gate_k:k with top_k = 1
(k = -1: dense experts). Targets:
  1. individual average ≥ pretrained average + 30 points (CLIP, LM) / + 25 points (T5)
  2. simple average ≤ individual average − 10 points (LM: − 20)
  3. SMILE at a good (gate_k, k) ≥ 95% of the individual average (LM: 90%)
`--scale` picks another build of the benchmark (the LM benchmark's full_seed1: its second seed).
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from smile_ray.hub import quiet_transformers
from smile_ray.report import task_names
from smile_ray.trial import build_pools, run_trial

BENCHMARKS = {   # name → (pools, default SMILE configurations, targets: the experts' margin over the pretrained
    #              model, simple averaging's gap below the experts, SMILE's share of the experts)
    "clip": ({"model_pool": {"kind": "embedded"}, "task_pool": {"kind": "embedded"}},
             "8:16,16:16,16:32,16:64,32:32,32:64,32:-1", (30, 10, 0.95)),
    "t5": ({"model_pool": {"kind": "embedded_t5"}, "task_pool": {"kind": "embedded_glue"}},
           "1:4,2:4,4:8,8:16,16:32,16:64,32:-1", (25, 10, 0.95)),
    "t5_lora": ({"model_pool": {"kind": "embedded_t5", "experts": "lora"}, "task_pool": {"kind": "embedded_glue"}},
                "1:4,2:4,4:8,8:16,16:16", (25, 10, 0.95)),
    "lm": ({"model_pool": {"kind": "embedded_lm"}, "task_pool": {"kind": "embedded_lm_tasks"}},
           "4:8,8:8,8:32,16:16,16:32,32:32,32:-1", (30, 20, 0.90)),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--benchmark", default="clip", choices=sorted(BENCHMARKS))
    parser.add_argument("--scale", help="the benchmark's build (default: full)")
    parser.add_argument("--configs", help="SMILE gate_k:k pairs, comma-separated (default: the benchmark's)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", help="also write the rows as JSON here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    quiet_transformers()

    sections, configs, (margin, gap, share) = BENCHMARKS[args.benchmark]
    if args.scale:
        sections = {**sections, "model_pool": {**sections["model_pool"], "scale": args.scale}}
    start = time.perf_counter()
    pools = build_pools(sections)
    print(f"embedded benchmark ({args.benchmark}) ready in {time.perf_counter() - start:.1f} s")
    tasks = pools.tasks.task_names

    def accuracies(method: dict) -> list[float]:
        report = run_trial({"method": method}, pools=pools)
        return [100 * report[t][pools.primary[t]] for t in task_names(report)]

    rows = {"pretrained": accuracies({"name": "individual", "model": "pretrained"})}
    rows["individual (own task)"] = [accuracies({"name": "individual", "model": t})[i] for i, t in enumerate(tasks)]
    rows["simple average"] = accuracies({"name": "simple_average"})
    rows["task arithmetic λ=0.3"] = accuracies({"name": "task_arithmetic", "scaling": 0.3})
    smile = {}
    for pair in (args.configs or configs).split(","):
        gate_k, k = (int(v) for v in pair.split(":"))
        label = f"SMILE gate_k={gate_k} k={'dense' if k < 0 else k}"
        rows[label] = smile[label] = accuracies({"name": "smile", "gate_k": gate_k, "k": k, "top_k": 1})

    average = {name: sum(values) / len(values) for name, values in rows.items()}
    print(f"\n{'model':<26}" + "".join(f"{t:>10}" for t in tasks) + f"{'average':>10}")
    for name, values in rows.items():
        print(f"{name:<26}" + "".join(f"{v:10.1f}" for v in values) + f"{average[name]:10.1f}")

    individual, pretrained = average["individual (own task)"], average["pretrained"]
    best = max(smile, key=average.get)
    checks = [
        (individual >= pretrained + margin, f"individual {individual:.1f} ≥ pretrained {pretrained:.1f} + {margin}"),
        (average["simple average"] <= individual - gap,
         f"simple average {average['simple average']:.1f} ≤ individual {individual:.1f} − {gap}"),
        (average[best] >= share * individual, f"best SMILE ({best}) {average[best]:.1f} = "
                                              f"{100 * average[best] / individual:.1f}% of individual ≥ {share:.0%}"),
    ]
    print()
    for ok, text in checks:
        print(f"{'PASS' if ok else 'FAIL'}  {text}")
    print(f"\ntotal {time.perf_counter() - start:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"tasks": tasks, "rows": rows, "average": average}, f, indent=1)


if __name__ == "__main__":
    main()
