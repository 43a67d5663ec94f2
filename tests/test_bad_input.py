"""Bad models and data are refused the same way by `python -m smile_ray.run` and by a sweep: one line naming the
field, exit status 2, nothing written, before Ray starts or any weight loads."""
import json
import re
import shutil
import struct

import pytest
import yaml

from smile_ray import run, tune
from smile_ray.errors import SmileError, user_message
from smile_ray.sources import Source, check_sources, common_names, safetensors_shapes


def saved_bert(path):
    from transformers import BertConfig, BertModel

    BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                         vocab_size=100)).save_pretrained(path)


def narrower_clip(path, clip_dir):
    from transformers import CLIPVisionConfig, CLIPVisionModel

    config = CLIPVisionConfig.from_pretrained(clip_dir)
    config.intermediate_size *= 2
    CLIPVisionModel(config).save_pretrained(path)


def truncated(path, expert):
    shutil.copytree(expert, path)
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])


def without_weights(path, expert):
    shutil.copytree(expert, path)
    (path / "model.safetensors").unlink()


def with_weight(path, expert, value, layer):
    """A copy of `expert` whose first weight named like `layer` starts with `value`."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(expert, path)
    tensors = load_file(path / "model.safetensors")
    name = next(name for name in sorted(tensors) if layer in name)
    tensors[name].view(-1)[0] = value
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


def resaved(path, expert, *, half: bool = False, pickled: bool = False):
    """`expert` saved again: in float16, or as a pickle checkpoint (pytorch_model.bin, which transformers 5 no
    longer writes)."""
    import torch
    from transformers import CLIPVisionModel

    model = CLIPVisionModel.from_pretrained(expert)
    if pickled:
        model.config.save_pretrained(path)
        torch.save(model.state_dict(), path / "pytorch_model.bin")
    else:
        (model.half() if half else model).save_pretrained(path)


BAD_EXPERTS = {   # what the "bad" expert is → what the one line says
    "another_architecture": (lambda p, b: saved_bert(p), "holds a bert model, not clip or clip_vision_model"),
    "truncated_safetensors": (lambda p, b: truncated(p, b.experts["digit"]), "model.safetensors: truncated"),
    "other_shapes": (lambda p, b: narrower_clip(p, b.clip_dir), "does not fit the base model: encoder.layers.0"),
    "no_weights": (lambda p, b: without_weights(p, b.experts["digit"]), "no weights (model.safetensors"),
    "nan_in_a_norm": (lambda p, b: with_weight(p, b.experts["digit"], float("nan"), "layer_norm"),
                      "holds NaN or inf"),
    "other_dtype": (lambda p, b: resaved(p, b.experts["digit"], half=True),
                    "is stored as F16, the base model's as F32"),
    "pickle_only": (lambda p, b: resaved(p, b.experts["digit"], pickled=True),
                    "pytorch_model.bin is a pickle checkpoint, which can run code when it loads: save it as "
                    "safetensors (save_pretrained), or set model_pool.allow_pickle: true"),
}


def configuration(bench, bad_dir) -> dict:
    task = bench.tasks[0]
    return {"model_pool": {"kind": "clip_vision", "base": str(bench.clip_dir),
                           "experts": {"digit": str(bench.experts["digit"]), "bad": str(bad_dir)}},
            "task_pool": {"kind": "clip_zero_shot", "max_samples": 10,
                          "tasks": [{"name": task.name, "dataset": task.dataset, "classnames": task.classnames,
                                     "templates": task.templates}]},
            "method": {"name": "simple_average"}}


@pytest.mark.parametrize("case", list(BAD_EXPERTS))
def test_bad_expert_is_refused_alike_by_run_and_by_a_sweep(case, tiny_bench, tmp_path, capsys, ray_session):
    make, message = BAD_EXPERTS[case]
    make(tmp_path / "bad", tiny_bench)
    capsys.readouterr()                                 # save_pretrained's progress bars
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(configuration(tiny_bench, tmp_path / "bad")))
    said = {}
    assert run.main(["--config", str(config), "--report", str(tmp_path / "r.json"), "--no-svd-cache"]) == 2
    said["run"] = capsys.readouterr().err.strip()
    assert tune.main(["--space", str(config), "--output", str(tmp_path / "out"),       # on the session's Ray: NaN
                      "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",       # weights are found once it runs
                      "--address", ray_session.get_runtime_context().gcs_address]) == 2
    said["sweep"] = capsys.readouterr().err.strip()
    assert said["run"] == said["sweep"], said
    assert said["run"].startswith("error: model_pool.experts.bad: ") and message in said["run"]
    assert "\n" not in said["run"]
    assert not any(p.exists() for p in (tmp_path / "r.json", tmp_path / "out", tmp_path / "mlflow.db"))


def test_safetensors_header_is_read_without_the_weights(tiny_bench):
    shapes = safetensors_shapes(tiny_bench.experts["digit"] / "model.safetensors")
    dtype, shape = shapes["encoder.layers.0.mlp.fc1.weight"]
    assert dtype == "F32" and len(shape) == 2


@pytest.mark.parametrize("content, message", [
    (b"", "not a safetensors file (0 bytes)"),
    (struct.pack("<Q", 1 << 40) + b"{}", "its header claims"),
    (struct.pack("<Q", 4) + b"nope", "its header is not JSON"),
])
def test_what_is_not_a_safetensors_file_is_named(tmp_path, content, message):
    path = tmp_path / "model.safetensors"
    path.write_bytes(content)
    with pytest.raises(SmileError, match=re.escape(message)):
        safetensors_shapes(path)


def test_weight_names_are_matched_across_a_full_clip_and_a_vision_tower():
    base = {"text_model.embeddings.position_embedding.weight": 0,
            "vision_model.embeddings.position_embedding.weight": 0,
            "vision_model.embeddings.class_embedding": 0, "vision_model.encoder.layers.0.mlp.fc1.weight": 0}
    expert = {"embeddings.position_embedding.weight": 0, "embeddings.class_embedding": 0,
              "encoder.layers.0.mlp.fc1.weight": 0}
    assert common_names(base, expert) == {name: f"vision_model.{name}" for name in expert}
    assert common_names(expert, base) == {f"vision_model.{name}": name for name in expert}


def test_missing_sources_are_all_named_in_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    sources = [Source("model_pool.base", str(tmp_path), role="base"),
               Source("model_pool.experts.a", str(tmp_path / "a"), role="expert"),
               Source("model_pool.experts.b", "org/b", role="expert"),
               Source("model_pool.experts.c", str(tmp_path / "c"), role="expert")]
    with pytest.raises(SmileError) as missing:
        check_sources(sources)
    message = str(missing.value)                  # the Hub is asked until its first refusal, then no more
    assert message.startswith("model_pool.base: ") and "is not a save_pretrained directory (no config.json)" in message
    assert message.endswith("(also: model_pool.experts.a, model_pool.experts.b)") and "\n" not in message


def test_an_error_raised_in_a_ray_task_reaches_the_user_as_its_own_line(ray_session):
    @ray_session.remote
    def fails():
        raise SmileError("model_pool.experts.x: broken")

    with pytest.raises(SmileError) as raised:
        ray_session.get(fails.remote())
    assert "\x1b[" in str(raised.value) or "Traceback" in str(raised.value)       # what Ray's wrapper says
    assert user_message(raised.value) == "model_pool.experts.x: broken"
    assert json.dumps(user_message(raised.value)).isascii()


def test_a_message_is_shown_by_its_own_line():
    class Wrapped(Exception):
        cause = SmileError("task_pool.tasks[0] (mnist): no such directory")

    assert user_message(Wrapped("\x1b[36mray::smile_svd_prefill()\x1b[39m\nTraceback …")) == \
        "task_pool.tasks[0] (mnist): no such directory"
    traceback = RuntimeError("Traceback (most recent call last):\n  File …\nValueError: bad")
    assert user_message(traceback) == "ValueError: bad"
    sqlalchemy = RuntimeError("(sqlite3.OperationalError) database is locked\n(Background on this error at: …)")
    assert user_message(sqlalchemy) == "(sqlite3.OperationalError) database is locked"


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_a_non_finite_weight_is_named(value):
    import torch

    from smile_ray.smile.weights import check_finite_weights

    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.LayerNorm(2))
    check_finite_weights(model, "model_pool.experts.x")
    with torch.no_grad():
        model[0].weight[1, 2] = value
    with pytest.raises(SmileError, match=r"^model_pool.experts.x: weight 0.weight holds NaN or inf$"):
        check_finite_weights(model, "model_pool.experts.x")


def test_an_unreadable_image_is_refused_alike_by_run_and_by_a_sweep(tiny_bench, tmp_path, capsys, ray_session):
    """A dataset with one image whose bytes do not decode: one line naming the task, the dataset and the sample."""
    import datasets

    task = tiny_bench.tasks[0]
    data = datasets.load_from_disk(task.dataset)
    split = data[task.split] if isinstance(data, datasets.DatasetDict) else data
    raw = split.cast_column("image", datasets.Image(decode=False))
    damaged = raw.map(lambda row, i: {"image": {"bytes": b"not an image" if i == 3 else row["image"]["bytes"],
                                                "path": None}}, with_indices=True)
    damaged = damaged.cast_column("image", datasets.Image())
    damaged_dir = tmp_path / "damaged"
    (datasets.DatasetDict({task.split: damaged}) if isinstance(data, datasets.DatasetDict) else damaged) \
        .save_to_disk(str(damaged_dir))
    config = configuration(tiny_bench, tiny_bench.experts["word"])
    config["task_pool"]["tasks"][0]["dataset"] = str(damaged_dir)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    capsys.readouterr()
    assert run.main(["--config", str(tmp_path / "config.yaml"), "--report", str(tmp_path / "r.json"),
                     "--no-svd-cache"]) == 2
    said_run = capsys.readouterr().err.strip()
    assert tune.main(["--space", str(tmp_path / "config.yaml"), "--output", str(tmp_path / "out"),
                      "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
                      "--address", ray_session.get_runtime_context().gcs_address]) == 2
    said_sweep = capsys.readouterr().err.strip()
    assert said_run == said_sweep and "\n" not in said_run and "0x" not in said_run, (said_run, said_sweep)
    assert said_run.startswith(f"error: task {task.name}: dataset {str(damaged_dir)!r}: sample 3 (image) is not a "
                               "readable image: UnidentifiedImageError: cannot identify image file"), said_run
    assert not any(p.exists() for p in (tmp_path / "r.json", tmp_path / "out", tmp_path / "mlflow.db"))
