"""The contract every registered model-pool and task-pool kind keeps, checked on tiny fixtures of each: its section
is validated without torch, its sources and experts are named up front, and what it loads behaves as the sweep
and `smile_ray.run` expect. A kind registered without a fixture here fails the test."""
import json
import subprocess
import sys

import pytest
from torch import nn

from smile_ray.errors import SmileError
from smile_ray.kinds import (ModelPoolConfig, TaskPoolConfig, TaskScores, model_pool_kinds, parse_pool,
                             task_pool_kinds)
from smile_ray.smile.weights import as_weights
from smile_ray.sources import Source
from tests.lm_fixtures import save_causal_pool, save_lm_eval_tasks


@pytest.fixture(scope="module")
def benches(tiny_bench, tiny_text_bench, tiny_cache, tmp_path_factory):
    causal = tmp_path_factory.mktemp("causal")
    return tiny_bench, tiny_text_bench, tiny_cache, {**save_causal_pool(causal / "pool", experts=2),
                                                     "tasks": save_lm_eval_tasks(causal / "tasks")}


def model_sections(benches) -> dict:
    """kind → a tiny model_pool section."""
    bench, text, cache, causal = benches
    return {"clip_vision": {"kind": "clip_vision", "base": str(bench.clip_dir),
                            "experts": {name: str(bench.experts[name]) for name in ("digit", "parity")}},
            "embedded": {"kind": "embedded", "scale": "tiny", "cache_dir": str(cache)},
            "seq2seq": {"kind": "seq2seq", "base": str(text.base_dir),          # a full expert and a LoRA adapter
                        "experts": {"cola": str(text.experts["cola"]), "rte": str(text.lora["rte"])}},
            "embedded_t5": {"kind": "embedded_t5", "experts": "lora", "scale": "tiny", "cache_dir": str(cache)},
            "embedded_lm": {"kind": "embedded_lm", "scale": "tiny", "cache_dir": str(cache)},
            "causal_lm": {"kind": "causal_lm", "base": str(causal["base"]),
                          "experts": {name: str(d) for name, d in causal["experts"].items()}}}


def task_sections(benches) -> dict:
    """kind → a tiny task_pool section (and the model-pool kind it is paired with)."""
    bench, text, _, causal = benches
    task = bench.tasks[0]
    return {"clip_zero_shot": ({"kind": "clip_zero_shot", "max_samples": 8, "batch_size": 4,
                                "tasks": [{"name": task.name, "dataset": task.dataset, "classnames": task.classnames,
                                           "templates": task.templates}]}, "clip_vision"),
            "embedded": ({"kind": "embedded", "max_samples": 8, "tasks": ["digit", "word"]}, "embedded"),
            "glue_text_generation": ({"kind": "glue_text_generation", "max_samples": 8,
                                      "tasks": [{"name": "cola", "dataset": str(text.data["cola"])},
                                                {"name": "stsb", "dataset": str(text.data["stsb"])}]}, "seq2seq"),
            "embedded_glue": ({"kind": "embedded_glue", "max_samples": 8, "tasks": ["rte", "stsb"]}, "embedded_t5"),
            "dummy": ({"kind": "dummy"}, "causal_lm"),
            "embedded_lm_tasks": ({"kind": "embedded_lm_tasks", "limit": 4, "tasks": ["complement", "doubling"]},
                                  "embedded_lm"),
            "lm_eval": ({"kind": "lm_eval", "include_path": str(causal["tasks"]), "limit": 4,
                         "tasks": [{"name": "tiny_mc", "metric": "acc_norm"}]}, "causal_lm")}


def test_every_registered_kind_has_a_fixture_here(benches):
    assert set(model_sections(benches)) == set(model_pool_kinds())
    assert set(task_sections(benches)) == set(task_pool_kinds())


@pytest.mark.parametrize("kind", sorted(model_pool_kinds()))
def test_model_pool_kind_contract(kind, benches):
    section = model_sections(benches)[kind]
    config = parse_pool(section, "model_pool")
    assert isinstance(config, ModelPoolConfig) and config.kind == kind
    names = config.expert_names()
    assert names and all(isinstance(name, str) for name in names)
    assert all(isinstance(source, Source) and source.field.startswith("model_pool") for source in config.sources())
    with pytest.raises(SmileError, match=r"^model_pool\.colour: unknown key"):
        parse_pool({**section, "colour": "red"}, "model_pool")
    pool = config.load()
    assert list(pool.expert_names) == names
    base, expert = pool.load_base(), pool.load_expert(names[0])      # nn.Modules, or weights read from disk
    assert isinstance(base, nn.Module) or base.lazy
    assert list(as_weights(base).shapes()) == list(as_weights(expert).shapes())


@pytest.mark.parametrize("kind", sorted(task_pool_kinds()))
def test_task_pool_kind_contract(kind, benches):
    section, model_kind = task_sections(benches)[kind]
    models = parse_pool(model_sections(benches)[model_kind], "model_pool")
    config = parse_pool(section, "task_pool").with_models(models)
    assert isinstance(config, TaskPoolConfig) and config.kind == kind
    scores = config.scores()                               # (dummy declares no task)
    assert all(isinstance(s, TaskScores) and s.primary in s.names for s in scores.values())
    assert all(source.field.startswith("task_pool") for source in config.sources())
    with pytest.raises(SmileError, match=r"^task_pool\.colour: unknown key"):
        parse_pool({**section, "colour": "red"}, "task_pool")
    model_pool = models.load()
    tasks = config.load(model_pool)
    results = tasks.evaluate(as_weights(model_pool.load_base()).instantiate())
    assert set(results) - {"average"} == set(scores)
    for task, declared in scores.items():                  # every task reports what its kind declares
        assert set(declared.names) <= set(results[task]), (task, results[task])


def test_every_section_is_validated_without_torch(benches):
    sections = [*(("model_pool", s) for s in model_sections(benches).values()),
                *(("task_pool", s) for s, _ in task_sections(benches).values())]
    code = ("import json, sys\nfrom smile_ray.kinds import parse_pool\n"
            f"for path, section in json.loads({json.dumps(json.dumps(sections))}):\n"
            "    config = parse_pool(section, path)\n"
            "    config.sources()\n"
            "heavy = sorted({'torch', 'transformers', 'datasets'} & set(sys.modules))\n"
            "assert not heavy, heavy\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
