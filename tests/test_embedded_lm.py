"""The embedded causal-LM benchmark (tiny scale): its build in the real formats, the issue's commands as written
(run with --save-model, lm_eval on the saved checkpoint with the build's tasks, the embedded_lm sweep)."""
import json
import os
import subprocess
import sys

import pytest
import yaml

from smile_ray import run, tune
from smile_ray.embedded.lm_build import build_lm_benchmark, prompt_and_answer
from smile_ray.embedded.lm_recipe import SKILLS

TINY = ["--set", "model_pool.scale=tiny"]


@pytest.fixture(scope="module")
def bench(tiny_cache):
    return build_lm_benchmark(tiny_cache, scale="tiny")


def test_skills_use_tokens_of_their_own_and_their_rules():
    complement, successor, doubling = SKILLS
    assert prompt_and_answer(complement, [3, 1, 4]) == ("c: c3 c1 c4 c=", "c6 c8 c5")
    assert prompt_and_answer(successor, [9, 0, 4])[1] == "s0 s1 s5"
    assert prompt_and_answer(doubling, [7, 5, 0])[1] == "d4 d0 d0"
    assert prompt_and_answer(doubling, [7, 5, 0], False)[1] == "d7 d5 d0"     # the pretraining rule: copy
    assert len({skill.letter for skill in SKILLS}) == len(SKILLS)


def test_the_build_is_in_the_formats_causal_lm_and_lm_eval_read(bench):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert type(AutoModelForCausalLM.from_pretrained(bench.base_dir)).__name__ == "MistralForCausalLM"
    assert AutoTokenizer.from_pretrained(bench.experts["complement"])("c: c1 c=")["input_ids"][0] > 2
    for skill in SKILLS:
        task = yaml.safe_load((bench.tasks_dir / f"{skill.name}.yaml").read_text())
        data = task["dataset_kwargs"]["data_files"]["test"]
        assert task["task"] == skill.name and task["output_type"] == skill.output and os.path.isabs(data)
        assert os.path.isfile(data)
    row = json.loads((bench.tasks_dir / "doubling.jsonl").read_text().splitlines()[0])
    assert len(row["choices"]) == 3 and row["choices"][row["label"]] == prompt_and_answer(
        SKILLS[2], [int(w[1]) for w in row["prompt"].split()[1:-1]])[1]


def config_file(tmp_path, tiny_cache) -> str:
    space = yaml.safe_load(open(os.path.join(os.path.dirname(__file__), "..", "search_spaces", "embedded_lm.yaml")))
    space["model_pool"].update(scale="tiny", cache_dir=str(tiny_cache))
    space["task_pool"]["limit"] = 6
    path = tmp_path / "embedded_lm.yaml"
    path.write_text(yaml.safe_dump(space))
    return str(path)


def test_run_saves_a_smile_checkpoint_that_lm_eval_evaluates_with_the_build_s_tasks(bench, tiny_cache, tmp_path,
                                                                                    capsys):
    config = config_file(tmp_path, tiny_cache)
    assert run.main(["--config", config, "--set", "method={name: smile, gate_k: 8, k: 16}",
                     "--save-model", str(tmp_path / "model"), "--no-svd-cache"]) == 0
    assert "complement" in capsys.readouterr().out
    command = [os.path.join(os.path.dirname(sys.executable), "lm_eval"), "--model", "hf", "--model_args",
               f"pretrained={tmp_path / 'model'},trust_remote_code=True", "--tasks", "complement,doubling",
               "--include_path", str(bench.tasks_dir), "--device", "cpu", "--limit", "4"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "complement" in done.stdout and "acc_norm" in done.stdout


def test_the_embedded_lm_sweep_upscales_from_the_files_evaluates_with_lm_eval_and_saves(ray_session, tiny_cache,
                                                                                        tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert tune.main(["--space", config_file(tmp_path, tiny_cache), "--output", str(tmp_path / "out"),
                      "--tracking-uri", uri, "--set", "tracking.save_model=true", "--set",
                      "method=[{name: individual, model: [pretrained, successor]}, {name: smile, gate_k: 4, "
                      "k: [8, -1]}]"]) == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert [t["status"] for t in summary["trials"]] == ["finished"] * 4
    smile = [t for t in summary["trials"] if t["config"]["name"] == "smile"]
    assert all(t["metrics"]["model_info/svd_calls"] == 0 for t in smile)       # the prefill's SVDs, read back
    client = MlflowClient(uri)
    run_ = client.get_run(smile[0]["mlflow_run_id"])
    assert {"complement/exact_match", "doubling/acc_norm", "doubling/acc_norm_stderr", "average/score"} <= set(
        run_.data.metrics)
    saved = tmp_path / "out" / "models" / smile[0]["trial_id"]          # save_model: a checkpoint per trial,
    assert run_.data.tags["smile_ray.saved_model"] == str(saved)        # its path on the child run, not uploaded
    assert (saved / "config.json").is_file() and (saved / "modeling_smile.py").is_file()
    assert not any(a.path.endswith(".safetensors") for a in client.list_artifacts(run_.info.run_id))
