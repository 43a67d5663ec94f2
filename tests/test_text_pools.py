"""The language-model half on the tiny embedded text build: the seq2seq pool (full experts and LoRA adapters), the
GLUE text-generation task pool (prompts, label texts, exact match and Spearman), their one-line refusals, and a
sweep of the embedded T5 space end to end."""
import json
import re
import shutil
import subprocess
import sys

import pytest
import torch
import yaml
from mlflow import MlflowClient

from smile_ray import run, tune
from smile_ray.errors import SmileError
from smile_ray.kinds import parse_pool
from smile_ray.tasks.glue import input_text, score, target_text


def test_prompts_and_label_texts_are_flan_t5s():
    assert target_text("qnli", 0) == "yes" and target_text("rte", 1) == "no"      # qnli and rte: 0 means "yes"
    assert target_text("cola", 1) == "acceptable" and target_text("stsb", 3.8) == "3.8"
    assert target_text("mnli", -1) == ""                                          # test splits' −1 labels
    assert input_text("rte", {"sentence1": "A", "sentence2": "B"}) == \
        "Does the text: 'A' entail that 'B' is true? Provide 'yes' or 'no'."


def test_exact_match_and_spearman_on_crafted_outputs():
    assert score("sst2", ["positive", "negative", "Positive", " positive"], [1, 0, 1, 1]) == \
        {"accuracy": 0.5, "unparsable": 0.5}                    # case-sensitive, no strip: as the reference scores
    stsb = score("stsb", ["1.0", "2.5", "oops", "4.0"], [1.2, 2.0, 3.0, 5.0])
    assert stsb["unparsable"] == 0.25 and stsb["spearman_rho"] == pytest.approx(0.4)   # "oops" → 0.0, ranked last
    assert score("stsb", ["2.0", "2.0"], [1.0, 3.0])["spearman_rho"] == 0.0           # constant: ρ undefined → 0


def test_a_lora_expert_is_merged_and_carries_a_task_vector_only_where_it_trained(tiny_text_bench):
    config = parse_pool({"kind": "seq2seq", "base": str(tiny_text_bench.base_dir),
                         "experts": {"rte": str(tiny_text_bench.lora["rte"])}}, "model_pool")
    pool = config.load()
    base, expert = dict(pool.load_base().named_parameters()), dict(pool.load_expert("rte").named_parameters())
    changed = {name for name in base if not torch.equal(base[name], expert[name])}
    adapter = json.loads((tiny_text_bench.lora["rte"] / "adapter_config.json").read_text())
    targets, excluded = adapter["target_modules"], adapter["exclude_modules"]      # names or paths; a pattern
    linear = {name for name in base if any(f".{name}".endswith(f".{t}.weight") for t in targets)
              and not re.fullmatch(excluded, name.removesuffix(".weight"))}
    assert any(".SelfAttention." in name for name in linear) and not any(re.fullmatch(excluded, n) for n in linear)
    assert changed == linear            # every weight the adapter targets, and nothing else (norms, embeddings, head)


def pickled(adapter) -> None:
    """The adapter's weights saved as adapter_model.bin (a pickle, as older peft wrote them) instead of safetensors."""
    from safetensors.torch import load_file

    torch.save(load_file(adapter / "adapter_model.safetensors"), adapter / "adapter_model.bin")
    (adapter / "adapter_model.safetensors").unlink()


def test_a_pickled_adapter_loads_only_when_the_pool_allows_pickles(tiny_text_bench, tmp_path):
    """Refused by the loader too (a hub adapter is not checked up front), and read as its safetensors twin when
    allowed."""
    adapter = tmp_path / "adapter"
    shutil.copytree(tiny_text_bench.lora["rte"], adapter)
    pickled(adapter)
    section = {"kind": "seq2seq", "base": str(tiny_text_bench.base_dir), "experts": {"rte": str(adapter)}}
    with pytest.raises(SmileError, match=r"^model_pool.experts.rte: .*adapter_model.bin is a pickle checkpoint"):
        parse_pool(section, "model_pool").load().load_expert("rte")
    allowed = parse_pool({**section, "allow_pickle": True}, "model_pool").load().load_expert("rte")
    twin = parse_pool({**section, "experts": {"rte": str(tiny_text_bench.lora["rte"])}}, "model_pool").load()
    assert all(torch.equal(a, b) for a, b in zip(allowed.state_dict().values(),
                                                 twin.load_expert("rte").state_dict().values()))


@pytest.mark.parametrize("case, message", [
    ("another_base", "was made for '/elsewhere/t5-small', not the pool's base"),
    ("wider_targets", "does not fit"),
    ("no_tokenizer", "model_pool.base (its tokenizer): "),
    ("pickled_adapter", "adapter_model.bin is a pickle checkpoint, which can run code when it loads: save it as "
                        "safetensors (save_pretrained), or set model_pool.allow_pickle: true"),
])
def test_pool_mismatches_are_one_line_in_run_and_in_a_sweep(case, message, tiny_text_bench, tmp_path, capsys):
    base, adapter = tmp_path / "base", tmp_path / "adapter"
    shutil.copytree(tiny_text_bench.base_dir, base)
    shutil.copytree(tiny_text_bench.lora["rte"], adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    if case == "another_base":
        config["base_model_name_or_path"] = "/elsewhere/t5-small"
    else:
        config["base_model_name_or_path"] = str(base)
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    if case == "wider_targets":                                 # an adapter of a wider model: factors of other sizes
        from safetensors.torch import load_file, save_file

        weights = load_file(adapter / "adapter_model.safetensors")
        save_file({k: torch.zeros(v.shape[0], v.shape[1] * 2) if "lora_A" in k else v for k, v in weights.items()},
                  adapter / "adapter_model.safetensors")
    if case == "no_tokenizer":
        for name in ("tokenizer.json", "tokenizer_config.json"):
            (base / name).unlink()
    if case == "pickled_adapter":
        pickled(adapter)
    space = {"model_pool": {"kind": "seq2seq", "base": str(base), "experts": {"rte": str(adapter)}},
             "task_pool": {"kind": "glue_text_generation", "max_samples": 4,
                           "tasks": [{"name": "rte", "dataset": str(tiny_text_bench.data["rte"])}]},
             "method": {"name": "simple_average"}}
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(space))
    assert run.main(["--config", str(tmp_path / "space.yaml"), "--no-svd-cache"]) == 2
    said_run = capsys.readouterr().err.strip()
    assert tune.main(["--space", str(tmp_path / "space.yaml"), "--output", str(tmp_path / "out"),
                      "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"]) == 2
    said_sweep = capsys.readouterr().err.strip()
    assert said_run == said_sweep and "\n" not in said_run and message in said_run, said_run
    assert not (tmp_path / "out").exists()


def test_unknown_glue_task_and_metric_are_refused_naming_the_key():
    with pytest.raises(SmileError, match=r"^task_pool.tasks\[1\]: unknown task 'wnli'"):
        parse_pool({"kind": "glue_text_generation", "tasks": ["cola", "wnli"]}, "task_pool")
    from smile_ray.spec import parse_space

    with pytest.raises(SmileError, match="search.metric: unknown metric 'average/accuracy'"):
        parse_space({"model_pool": {"kind": "embedded_t5"}, "task_pool": {"kind": "embedded_glue"},
                     "method": {"name": "simple_average"}, "search": {"metric": "average/accuracy"}}, "t")


def test_the_embedded_t5_sweep_runs_end_to_end(ray_session, tiny_text_bench, tiny_cache, tmp_path):
    space = yaml.safe_load(open(tune.__file__.replace("tune.py", "../search_spaces/embedded_t5.yaml")))
    space["model_pool"].update(scale="tiny", cache_dir=str(tiny_cache))
    space["task_pool"].update(max_samples=6, tasks=["cola", "rte", "stsb"])
    space["method"] = [{"name": "individual", "model": ["pretrained", "stsb"]}, {"name": "smile", "gate_k": [2, 4],
                                                                              "k": 4}]
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(space))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert tune.main(["--space", str(tmp_path / "space.yaml"), "--output", str(tmp_path / "out"),
                      "--tracking-uri", uri]) == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["metric"] == "average/score" and summary["mode"] == "max"
    assert len(summary["trials"]) == 4 and all(t["status"] == "finished" for t in summary["trials"])
    metrics = summary["trials"][0]["metrics"]
    assert {"cola/accuracy", "stsb/spearman_rho", "rte/unparsable", "average/score"} <= set(metrics)
    client = MlflowClient(uri)
    parent = client.get_run(summary["mlflow"]["parent_run_id"])
    assert parent.info.status == "FINISHED" and "best/average/score" in parent.data.metrics
    plots = {a.path for a in client.list_artifacts(parent.info.run_id, "plots")}
    assert plots == {"plots/heatmap.png", "plots/pareto.png", "plots/per_task.png"}      # per task: each one's score
    smile = next(t for t in summary["trials"] if t["config"]["name"] == "smile")
    columns = json.loads(open(client.download_artifacts(smile["mlflow_run_id"], "per_task.json", str(tmp_path)))
                         .read())["columns"]
    assert columns == ["task", "accuracy", "unparsable", "spearman_rho"]
    artifacts = {a.path for a in client.list_artifacts(smile["mlflow_run_id"])}
    assert {"routing.json", "routing.png"} <= artifacts
    assert 0 <= client.get_run(smile["mlflow_run_id"]).data.metrics["routing/own_expert_share"] <= 1


def test_the_text_build_is_the_same_whether_its_experts_train_in_one_process_or_two(tiny_text_bench, tmp_path,
                                                                                      monkeypatch):
    """The full scale trains its experts in two processes (spawned, each on one thread, seeded by its task); the
    tiny scale, built by the session's fixture, in one. Built with two here, every weight file is bit-identical."""
    import dataclasses

    from safetensors.torch import load_file

    from smile_ray.embedded import text_build

    tiny = text_build.TEXT_RECIPES["tiny"]
    monkeypatch.setitem(text_build.TEXT_RECIPES, "tiny", dataclasses.replace(tiny, build_processes=2))
    monkeypatch.setattr(text_build, "usable_cpus", lambda: 2)      # two CPUs, even in a 1-CPU CI
    other = text_build.build_text_benchmark(tmp_path, scale="tiny")
    files = ["base/model.safetensors", *(f"experts/{task}/model.safetensors" for task in tiny_text_bench.experts),
             *(f"lora/{task}/adapter_model.safetensors" for task in tiny_text_bench.lora)]
    for rel in files:
        ours, theirs = load_file(tiny_text_bench.root / rel), load_file(other.root / rel)
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours), rel


def test_a_script_without_a_main_guard_is_told_so_and_the_build_does_not_hang(tmp_path):
    """The build's spawned processes import the caller's main script; one that builds the benchmark at import
    would wait forever on the build lock its parent holds. It stops with the fix in one line instead."""
    script = tmp_path / "unguarded.py"
    script.write_text("import dataclasses, sys\n"
                      "from smile_ray.embedded import text_build\n"
                      "tiny = text_build.TEXT_RECIPES['tiny']\n"
                      "text_build.TEXT_RECIPES['tiny'] = dataclasses.replace(tiny, build_processes=2)\n"
                      "text_build.usable_cpus = lambda: 2\n"
                      "text_build.build_text_benchmark(sys.argv[1], scale='tiny')\n")
    done = subprocess.run([sys.executable, str(script), str(tmp_path / "cache")], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode != 0
    assert "build processes stopped" in done.stderr and "if __name__ == '__main__':" in done.stderr
    assert not [p for p in (tmp_path / "cache").iterdir() if p.is_dir()]       # no build, no half of one
