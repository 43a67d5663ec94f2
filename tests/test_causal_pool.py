"""`model_pool: {kind: causal_lm}` with `task_pool: {kind: dummy}`: upscale and save from local directories, and the
bad inputs it refuses alike in `run` and a sweep (one line, exit 2, nothing written)."""
import json
import shutil

import pytest
import torch
import yaml

from smile_ray import run, tune
from smile_ray.smile.checkpoint import load_model
from tests.lm_fixtures import save_causal_pool


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    return save_causal_pool(tmp_path_factory.mktemp("causal"))


def space(pool, method=None, **experts) -> dict:
    return {"model_pool": {"kind": "causal_lm", "base": str(pool["base"]),
                           "experts": {**{n: str(d) for n, d in pool["experts"].items()}, **experts}},
            "task_pool": {"kind": "dummy"},
            "method": method or {"name": "smile", "gate_k": 4, "k": 8}}


def write(tmp_path, config) -> str:
    path = tmp_path / "pool.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def test_run_upscales_and_saves_a_causal_pool(pool, tmp_path, capsys):
    config = write(tmp_path, space(pool))
    assert run.main(["--config", config, "--save-model", str(tmp_path / "model"), "--report",
                     str(tmp_path / "report.json"), "--no-svd-cache"]) == 0
    out = capsys.readouterr().out
    assert "parameters: " in out and f"model: {tmp_path / 'model'}" in out
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["average"] == {} and report["model_info"]["svd_calls"] == 13 * 3
    model = load_model(tmp_path / "model")
    assert type(model).__name__ == "SmileMistralForCausalLM"
    with torch.no_grad():
        assert model(input_ids=torch.tensor([[1, 5, 6]])).logits.shape == (1, 3, 96)


def test_save_model_refuses_a_non_empty_directory_before_loading(pool, tmp_path, capsys):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "notes.txt").write_text("mine")
    assert run.main(["--config", write(tmp_path, space(pool)), "--save-model", str(tmp_path / "model")]) == 2
    said = capsys.readouterr().err.strip()
    assert said == f"error: --save-model {tmp_path / 'model'}: is not empty; give a new or empty directory"
    assert (tmp_path / "model" / "notes.txt").read_text() == "mine"


def t5_model(path, pool):
    from transformers import T5Config, T5ForConditionalGeneration

    T5ForConditionalGeneration(T5Config(vocab_size=96, d_model=32, d_kv=8, d_ff=64, num_layers=1,
                                        num_heads=2)).save_pretrained(path)


def wider_vocabulary(path, pool):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(pool["experts"]["expert0"])
    model.resize_token_embeddings(128)
    model.save_pretrained(path)


def missing_shard(path, pool):
    shutil.copytree(pool["experts"]["expert0"], path)
    next(path.glob("model-00002-*.safetensors")).unlink()


def pickle_only(path, pool):
    from transformers import AutoModelForCausalLM

    path.mkdir()
    model = AutoModelForCausalLM.from_pretrained(pool["experts"]["expert0"])
    model.config.save_pretrained(path)
    torch.save(model.state_dict(), path / "pytorch_model.bin")


BAD = {   # the bad expert → what the one line says
    "another_architecture": (t5_model, "holds a t5 model, not mistral like the base model"),
    "another_vocabulary": (wider_vocabulary, "shape [128, 64], the base model [96, 64]"),
    "missing_shard": (missing_shard, "names model-00002-of-"),
    "pickle_only": (pickle_only,
                    "pytorch_model.bin is a pickle checkpoint, which can run code when it loads: save it as "
                    "safetensors (save_pretrained): this pool reads safetensors only"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_a_bad_expert_is_refused_alike_by_run_and_by_a_sweep(case, pool, tmp_path, capsys):
    make, message = BAD[case]
    make(tmp_path / "bad", pool)
    capsys.readouterr()
    config = write(tmp_path, space(pool, bad=str(tmp_path / "bad")))
    said = {}
    assert run.main(["--config", config, "--save-model", str(tmp_path / "model")]) == 2
    said["run"] = capsys.readouterr().err.strip()
    assert tune.main(["--space", config, "--output", str(tmp_path / "out"),
                      "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"]) == 2
    said["sweep"] = capsys.readouterr().err.strip()
    assert said["run"] == said["sweep"], said
    assert said["run"].startswith("error: model_pool.experts.bad: ") and message in said["run"], said["run"]
    assert "\n" not in said["run"]
    assert not any(p.exists() for p in (tmp_path / "model", tmp_path / "out", tmp_path / "mlflow.db"))


def test_a_base_that_is_not_a_causal_lm_is_refused(pool, tmp_path, capsys):
    t5_model(tmp_path / "t5", pool)
    config = space(pool)
    config["model_pool"]["base"] = str(tmp_path / "t5")
    assert run.main(["--config", write(tmp_path, config)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: model_pool.base: ") and "holds a t5 model, not mistral or llama or qwen2" in err


def nan_in_the_final_norm(path, pool):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(pool["experts"]["expert0"])
    with torch.no_grad():
        model.model.norm.weight[0] = float("nan")
    model.save_pretrained(path)


def test_nan_outside_the_linear_layers_is_refused_before_the_first_trial(pool, tmp_path, capsys, ray_session):
    """The SVD prefill reads only linear layers; the same task reads what is left of every model, so a sweep refuses
    a damaged model up front (one line, exit 2, --output removed), as `run` does when its method reads that weight
    (averaging reads every weight). A SMILE sweep refuses it too: every model of the pool is read once before the
    first trial, though SMILE keeps the base's norms."""
    nan_in_the_final_norm(tmp_path / "bad", pool)
    capsys.readouterr()
    said = {}
    for method in ("simple_average", "smile"):
        config = write(tmp_path, space(pool, {"name": "simple_average"} if method == "simple_average" else None,
                                       bad=str(tmp_path / "bad")))
        if method == "simple_average":
            assert run.main(["--config", config, "--no-svd-cache"]) == 2
            said["run"] = capsys.readouterr().err.strip()
        assert tune.main(["--space", config, "--output", str(tmp_path / "out"),
                          "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
                          "--address", ray_session.get_runtime_context().gcs_address]) == 2
        said[method] = capsys.readouterr().err.strip()
        assert not any(p.exists() for p in (tmp_path / "out", tmp_path / "mlflow.db"))
    assert said["run"] == said["simple_average"] == said["smile"] and "\n" not in said["run"], said
    assert said["run"].startswith("error: model_pool.experts.bad: ") and "weight model.norm.weight holds NaN or inf" \
        in said["run"], said["run"]
