"""Model pool, TA8 definitions and the CLIP zero-shot task pool, on a tiny CLIP built in tmp_path (no network)."""
from __future__ import annotations

import json
import os
import pickle
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import datasets
import huggingface_hub.constants
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import (AutoImageProcessor, CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPVisionModel,
                          PreTrainedTokenizerFast)

from smile_ray.errors import SmileError
from smile_ray.pools.clip_vision import ClipVisionPool, ta8_pool
from smile_ray.tasks.clip_zero_shot import ClipTask, ClipZeroShotTaskPool, PixelNormalizer, zero_shot_head
from smile_ray.tasks.ta8 import TA8_TASK_NAMES, ta8_tasks

torch.set_num_threads(1)
datasets.disable_progress_bars()

SHAPES = ["red circle", "blue square", "green triangle"]
DIGITS = ["zero", "one"]
SPECIALS = ["<pad>", "<unk>", "<bos>", "<eos>"]
EOS_ID = 3  # not 2: CLIP's text tower treats eos_token_id == 2 as "pool at the largest token id"


def _tokenizer() -> PreTrainedTokenizerFast:
    words = sorted({w for text in SHAPES + DIGITS + ["a photo of the", "an image of", "number", '"', ".", ":"]
                    for w in text.replace(".", " . ").replace('"', ' " ').replace(":", " : ").split()})
    vocab = {token: i for i, token in enumerate(SPECIALS + words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A <eos>",
                                                       special_tokens=[("<bos>", 2), ("<eos>", EOS_ID)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<bos>",
                                   eos_token="<eos>")


def _images(n: int, seed: int, mode: str = "RGB") -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    shape = (lambda h, w: (h, w, 3)) if mode == "RGB" else (lambda h, w: (h, w))
    return [Image.fromarray(rng.integers(0, 256, shape(int(rng.integers(12, 30)), int(rng.integers(12, 30))),
                                         dtype=np.uint8), mode=mode) for _ in range(n)]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    """A tiny CLIP (dir), two fine-tuned vision towers (dirs), and two tiny saved datasets."""
    root = tmp_path_factory.mktemp("clip_world")
    tokenizer = _tokenizer()
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=24, pad_token_id=0, bos_token_id=2,
                         eos_token_id=EOS_ID),
        vision_config=dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                           image_size=16, patch_size=8),
        projection_dim=16)
    torch.manual_seed(0)
    clip = CLIPModel(config).eval()
    clip_dir = root / "clip"
    clip.save_pretrained(clip_dir)
    tokenizer.save_pretrained(clip_dir)
    CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}).save_pretrained(clip_dir)

    experts = {}
    for i, name in enumerate(["shapes", "digits"]):
        expert = CLIPVisionModel(config.vision_config)
        expert.load_state_dict(clip.vision_model.state_dict())
        with torch.no_grad():
            for p in expert.parameters():
                p.add_(0.05 * torch.randn_like(p, generator=torch.Generator().manual_seed(i)))
        expert.save_pretrained(root / f"expert_{name}")
        experts[name] = str(root / f"expert_{name}")

    shapes = datasets.Dataset.from_dict(
        {"image": _images(10, 1), "label": [0, 1, 2, 0, 1, 2, 2, 1, 0, 1], "note": ["x"] * 10},
        features=datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=SHAPES),
                                    "note": datasets.Value("string")}))
    datasets.DatasetDict({"train": shapes.select(range(3)), "test": shapes}).save_to_disk(root / "shapes")
    datasets.Dataset.from_dict({"img": _images(7, 2, mode="L"), "target": [0, 1, 1, 0, 1, 0, 0]},
                               features=datasets.Features({"img": datasets.Image(),
                                                           "target": datasets.Value("int64")})
                               ).save_to_disk(root / "digits")
    tasks = [ClipTask(name="shapes", dataset=str(root / "shapes"), classnames=SHAPES,
                      templates=["a photo of the {c}.", "an image of {c}."]),
             ClipTask(name="digits", dataset=str(root / "digits"), classnames=DIGITS,
                      templates=['a photo of the number: "{c}".'], image_column="img", label_column="target")]
    return {"root": root, "clip_dir": str(clip_dir), "clip": clip, "tokenizer": tokenizer, "experts": experts,
            "tasks": tasks}


@pytest.fixture(scope="module")
def task_pool(world) -> ClipZeroShotTaskPool:
    return ClipZeroShotTaskPool(world["clip_dir"], world["tasks"], batch_size=4, device="cpu")


# ---- model pool -------------------------------------------------------------------------------------------------

def test_pool_loads_base_and_experts_from_local_dirs(world):
    pool = ClipVisionPool(base=world["clip_dir"], experts=world["experts"])
    base = pool.load_base()
    assert isinstance(base, CLIPVisionModel) and not base.training
    for key, value in world["clip"].vision_model.state_dict().items():
        torch.testing.assert_close(base.state_dict()[key], value, rtol=0, atol=0)
    experts = pool.load_experts()
    assert list(experts) == ["shapes", "digits"] == pool.expert_names
    assert not torch.equal(experts["shapes"].post_layernorm.weight,
                           experts["digits"].post_layernorm.weight)
    assert pool.load_expert("digits").embeddings.patch_embedding.weight.dtype == torch.float32


def test_pool_dtype_and_torch_dtype_alias(world):
    from smile_ray.kinds import parse_pool

    config = parse_pool({"kind": "clip_vision", "base": world["clip_dir"], "experts": {"a": world["clip_dir"]},
                         "torch_dtype": "bf16"}, "model_pool")
    pool = config.load()
    assert config.dtype == "bfloat16" and pool.torch_dtype == torch.bfloat16
    assert next(pool.load_base().parameters()).dtype == torch.bfloat16
    with pytest.raises(SmileError, match=r"^model_pool\.dtype: unknown dtype 'float8'"):
        ClipVisionPool(base=world["clip_dir"], experts={}, dtype="float8")
    with pytest.raises(SmileError, match=r"^model_pool\.dtype: unknown dtype 'float8'"):
        parse_pool({"kind": "clip_vision", "base": "x", "experts": {"a": "y"}, "dtype": "float8"}, "model_pool")
    with pytest.raises(SmileError, match=r"^model_pool\.colour: unknown key"):
        parse_pool({"kind": "clip_vision", "base": "x", "experts": {"a": "y"}, "colour": 1}, "model_pool")


def _one_line(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


def test_missing_expert_dir_is_one_line_error(world, tmp_path):
    missing = str(tmp_path / "no" / "such_model")
    pool = ClipVisionPool(base=world["clip_dir"], experts={"mnist": missing})
    with pytest.raises(SmileError) as excinfo:
        pool.load_expert("mnist")
    assert _one_line(excinfo) == f"model_pool.experts.mnist: cannot load {missing!r} (no such directory)"
    with pytest.raises(SmileError, match=r"^model_pool\.experts: no expert 'svhn' \(have: mnist\)$"):
        pool.load_expert("svhn")


def test_hub_id_offline_fails_fast_naming_the_field(world, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    pool = ClipVisionPool(base="openai/clip-vit-base-patch32",
                          experts={"mnist": "tanganke/clip-vit-base-patch32_mnist"})
    start = time.perf_counter()
    with pytest.raises(SmileError) as excinfo:
        pool.load_expert("mnist")
    assert time.perf_counter() - start < 5
    assert _one_line(excinfo) == ("model_pool.experts.mnist: cannot load 'tanganke/clip-vit-base-patch32_mnist' "
                                  "(HF_HUB_OFFLINE is set; not in the local Hugging Face cache)")


def test_unreachable_hub_fails_fast_without_retries(world, monkeypatch, tmp_path):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    pool = ClipVisionPool(base="someone/clip-that-is-nowhere", experts={})
    start = time.perf_counter()
    with pytest.raises(SmileError) as excinfo:
        pool.load_base()
    assert time.perf_counter() - start < 10
    message = _one_line(excinfo)
    assert message.startswith("model_pool.base: cannot load 'someone/clip-that-is-nowhere' (hub unreachable: ")
    assert message.endswith("; not in the local Hugging Face cache)")


def test_wrong_architecture_is_rejected(world, tmp_path):
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 32}))
    pool = ClipVisionPool(base=world["clip_dir"], experts={"odd": str(bert)})
    with pytest.raises(SmileError) as excinfo:
        pool.load_expert("odd")
    assert _one_line(excinfo).startswith(f"model_pool.experts.odd: cannot load {str(bert)!r} (ValueError: "
                                         "model_type is 'bert', not a CLIP vision model")


def test_ta8_pools_match_fusionbench():
    b32 = ta8_pool()
    assert b32.base == "openai/clip-vit-base-patch32"
    assert list(b32.experts) == list(TA8_TASK_NAMES) == ["sun397", "stanford-cars", "resisc45", "eurosat", "svhn",
                                                         "gtsrb", "mnist", "dtd"]
    assert b32.experts["stanford-cars"] == "tanganke/clip-vit-base-patch32_stanford-cars"
    l14 = ta8_pool("ViT-L/14", ["mnist", "dtd"])
    assert l14.base == "openai/clip-vit-large-patch14"
    assert l14.experts == {"mnist": "tanganke/clip-vit-large-patch14_mnist",
                           "dtd": "tanganke/clip-vit-large-patch14_dtd"}
    assert ta8_pool("clip-vit-large-patch14").base == l14.base
    with pytest.raises(SmileError, match=r"^tasks: unknown TA8 task 'cifar10' \(valid: sun397, stanford-cars"):
        ta8_pool(tasks=["cifar10"])
    with pytest.raises(SmileError, match=r"^architecture: unknown CLIP architecture 'ViT-H/14'"):
        ta8_pool("ViT-H/14")


# ---- TA8 tasks --------------------------------------------------------------------------------------------------

def test_ta8_tasks_hub_ids_classes_and_templates():
    tasks = {t.name: t for t in ta8_tasks()}
    assert list(tasks) == list(TA8_TASK_NAMES)
    expected = {"sun397": ("tanganke/sun397", 397, 2), "stanford-cars": ("tanganke/stanford_cars", 196, 8),
                "resisc45": ("tanganke/resisc45", 45, 18), "eurosat": ("tanganke/eurosat", 10, 3),
                "svhn": ("ufldl-stanford/svhn", 10, 1), "gtsrb": ("tanganke/gtsrb", 43, 3),
                "mnist": ("ylecun/mnist", 10, 1), "dtd": ("tanganke/dtd", 47, 8)}
    for name, (hub_id, classes, templates) in expected.items():
        task = tasks[name]
        assert (task.dataset, len(task.classnames), len(task.templates), task.split) == (hub_id, classes, templates,
                                                                                           "test")
        assert all("{c}" in t for t in task.templates)
    assert tasks["svhn"].dataset_config == "cropped_digits"
    assert tasks["mnist"].templates == ['a photo of the number: "{c}".']


def test_ta8_tasks_overrides_and_errors(tmp_path):
    (mnist,) = ta8_tasks("mnist", overrides={"mnist": {"dataset": str(tmp_path), "image_column": "img"}})
    assert (mnist.dataset, mnist.image_column, len(mnist.classnames)) == (str(tmp_path), "img", 10)
    with pytest.raises(SmileError, match=r"^tasks: unknown TA8 task 'imagenet' \(valid: sun397, "):
        ta8_tasks(["mnist", "imagenet"])
    with pytest.raises(SmileError, match=r"^overrides\.mnist\.colour: not a ClipTask field"):
        ta8_tasks(["mnist"], overrides={"mnist": {"colour": "red"}})


# ---- zero-shot task pool ----------------------------------------------------------------------------------------

@torch.no_grad()
def _manual_head(clip: CLIPModel, tokenizer, classnames: list[str], templates: list[str]) -> torch.Tensor:
    """Per class: pool each template at its eos token, project, unit-normalise, average, unit-normalise again."""
    rows = []
    for name in classnames:
        tokens = tokenizer([t.replace("{c}", name) for t in templates], padding=True, return_tensors="pt")
        hidden = clip.text_model(input_ids=tokens["input_ids"],
                                 attention_mask=tokens["attention_mask"]).last_hidden_state  # (T, L, h)
        eos = (tokens["input_ids"] == EOS_ID).int().argmax(dim=-1)
        emb = hidden[torch.arange(len(templates)), eos] @ clip.text_projection.weight.T  # (T, d)
        emb = emb / emb.norm(dim=-1, keepdim=True)
        mean = emb.mean(dim=0)
        rows.append(mean / mean.norm())
    return torch.stack(rows)


@torch.no_grad()
def _manual_metrics(world, vision: CLIPVisionModel, task: ClipTask, batch_size: int,
                    limit: int | None = None) -> dict[str, float]:
    """Accuracy and mean-of-batch-means cross-entropy, straight from the processor and the CLIP parts."""
    clip = world["clip"]
    processor = AutoImageProcessor.from_pretrained(world["clip_dir"], backend="pil")
    ds = datasets.load_from_disk(task.dataset)
    ds = ds["test"] if isinstance(ds, datasets.DatasetDict) else ds
    rows = list(ds)[:limit]
    head = _manual_head(clip, world["tokenizer"], task.classnames, task.templates)
    correct, losses = 0, []
    for start in range(0, len(rows), batch_size):
        batch = rows[start:start + batch_size]
        pixels = processor(images=[r[task.image_column].convert("RGB") for r in batch],
                           return_tensors="pt")["pixel_values"]
        labels = torch.tensor([r[task.label_column] for r in batch])
        image = vision(pixel_values=pixels).pooler_output @ clip.visual_projection.weight.T
        image = image / image.norm(dim=-1, keepdim=True)
        logits = clip.logit_scale.exp() * image @ head.T
        losses.append(F.cross_entropy(logits, labels).item())
        correct += int((logits.argmax(dim=-1) == labels).sum())
    return {"accuracy": correct / len(rows), "loss": sum(losses) / len(losses)}


def test_head_is_template_average_with_double_normalisation(world, task_pool):
    shapes = world["tasks"][0]
    head = zero_shot_head(world["clip"], world["tokenizer"], shapes.classnames, shapes.templates)
    manual = _manual_head(world["clip"], world["tokenizer"], shapes.classnames, shapes.templates)
    torch.testing.assert_close(head, manual, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(task_pool.head(shapes), manual, rtol=1e-5, atol=1e-6)
    assert task_pool.head(shapes) is task_pool.head(shapes)  # built once per pool
    single = F.normalize(world["clip"].get_text_features(
        **world["tokenizer"]([shapes.templates[0].format(c=c) for c in SHAPES], padding=True,
                             return_tensors="pt")).pooler_output, dim=-1)
    assert not torch.allclose(head, single, atol=1e-3)  # both templates matter


def test_pixels_equal_the_image_processor_output(world):
    processor = AutoImageProcessor.from_pretrained(world["clip_dir"], backend="pil")
    images = _images(5, 3) + _images(2, 4, mode="L")
    expected = processor(images=[im.convert("RGB") for im in images], return_tensors="pt")["pixel_values"]
    raw = processor(images=[im.convert("RGB") for im in images], do_rescale=False, do_normalize=False,
                    return_tensors="pt")["pixel_values"]
    assert raw.dtype == torch.uint8
    assert torch.equal(PixelNormalizer(processor)(raw), expected)


def test_accuracy_and_loss_match_a_manual_computation(world, task_pool):
    pool = ClipVisionPool(base=world["clip_dir"], experts=world["experts"])
    vision = pool.load_expert("shapes")
    calls = []
    results = task_pool.evaluate(vision, on_task_done=lambda *args: calls.append(args))
    for task in world["tasks"]:
        manual = _manual_metrics(world, vision, task, batch_size=4)
        assert results[task.name]["accuracy"] == pytest.approx(manual["accuracy"], abs=1e-12)
        assert results[task.name]["loss"] == pytest.approx(manual["loss"], rel=1e-5)
    assert set(results) == {"shapes", "digits", "average"}
    assert results["average"]["accuracy"] == pytest.approx(
        (results["shapes"]["accuracy"] + results["digits"]["accuracy"]) / 2)
    assert results["average"]["loss"] == pytest.approx((results["shapes"]["loss"] + results["digits"]["loss"]) / 2)

    assert [c[0] for c in calls] == ["shapes", "digits"]
    first, second = calls
    assert set(first[1]) == {"accuracy", "loss", "samples", "seconds"}
    assert (first[1]["samples"], second[1]["samples"]) == (10, 7)
    assert first[2] == {"shapes": results["shapes"]}                   # the results so far
    assert second[2] == {task: results[task] for task in ("shapes", "digits")}

    again = task_pool.evaluate(vision)  # from the cached pixels now
    assert task_pool.task_data(world["tasks"][0]).pixels.shape == (10, 3, 16, 16)
    assert again == results


def test_mean_of_batch_means_differs_from_sample_mean(world, task_pool):
    """10 samples in batches of 4, 4, 2: FusionBench's loss weights the last batch like the others."""
    vision = ClipVisionPool(base=world["clip_dir"], experts=world["experts"]).load_base()
    shapes = world["tasks"][0]
    result = task_pool.evaluate_task(vision, shapes)
    sample_mean = _manual_metrics(world, vision, shapes, batch_size=10)["loss"]
    assert result["loss"] == pytest.approx(_manual_metrics(world, vision, shapes, batch_size=4)["loss"], rel=1e-5)
    assert result["loss"] != pytest.approx(sample_mean, rel=1e-6)


def test_max_samples_takes_the_first_rows_and_no_cache_gives_the_same(world):
    vision = ClipVisionPool(base=world["clip_dir"], experts=world["experts"]).load_expert("digits")
    pool = ClipZeroShotTaskPool(world["clip_dir"], world["tasks"], batch_size=3, max_samples=5, device="cpu",
                                cache_images=False)
    results = pool.evaluate(vision)
    for task in world["tasks"]:
        manual = _manual_metrics(world, vision, task, batch_size=3, limit=5)
        assert results[task.name]["accuracy"] == pytest.approx(manual["accuracy"], abs=1e-12)
        assert results[task.name]["loss"] == pytest.approx(manual["loss"], rel=1e-5)
        assert pool.task_data(task).pixels is None
    pool.cache_images = True
    pool.prepare()
    assert pool.task_data(world["tasks"][1]).labels.tolist() == [0, 1, 1, 0, 1]
    assert pool.evaluate(vision) == results


def test_prepared_pool_lets_go_of_the_clip_towers(world):
    vision = ClipVisionPool(base=world["clip_dir"], experts=world["experts"]).load_expert("digits")
    fresh = ClipZeroShotTaskPool(world["clip_dir"], world["tasks"], batch_size=3, device="cpu")
    clip_bytes = sum(p.numel() * p.element_size() for p in fresh.clip_model.parameters())
    expected = fresh.evaluate(vision)                   # heads built lazily while evaluating
    assert fresh.clip_model is None and fresh.tokenizer is None
    prepared = ClipZeroShotTaskPool(world["clip_dir"], world["tasks"], batch_size=3, device="cpu")
    prepared.prepare()
    shipped = pickle.dumps(prepared)                    # what a sweep puts in Ray's object store
    pixel_bytes = sum(prepared.task_data(t).pixels.nbytes for t in world["tasks"])
    assert len(shipped) < pixel_bytes + clip_bytes / 2
    results = pickle.loads(shipped).evaluate(vision)
    for name, metrics in expected.items():
        assert results[name]["accuracy"] == metrics["accuracy"]
        assert results[name]["loss"] == pytest.approx(metrics["loss"], rel=1e-6)


def test_evaluates_in_the_model_dtype(world, task_pool):
    vision = ClipVisionPool(base=world["clip_dir"], experts=world["experts"], dtype="bfloat16").load_expert("shapes")
    results = task_pool.evaluate(vision)
    reference = task_pool.evaluate(vision.float())
    assert 0 <= results["average"]["accuracy"] <= 1
    assert results["shapes"]["loss"] == pytest.approx(reference["shapes"]["loss"], rel=0.1)


def _task(world, **changes) -> ClipTask:
    base = world["tasks"][0]
    return ClipTask(**{**base.__dict__, **changes})


@pytest.mark.parametrize("changes, message", [
    ({"dataset": "/no/such/dir"}, r"^task shapes: dataset '/no/such/dir': no such directory$"),
    ({"split": "validation"}, r"^task shapes: dataset '.*shapes': no split 'validation' \(splits: train, test\)$"),
    ({"image_column": "img"}, r"^task shapes: dataset '.*shapes': no image_column 'img' \(columns: image, label, note\)$"),
    ({"classnames": ["a", "b"]}, r"^task shapes: dataset '.*shapes': 3 classes in the data, 2 class names in the task$"),
])
def test_dataset_errors_name_the_task_and_the_dataset(world, changes, message):
    pool = ClipZeroShotTaskPool(world["clip_dir"], [_task(world, **changes)], device="cpu")
    with pytest.raises(SmileError, match=message):
        pool.prepare()


def test_label_out_of_range_and_offline_hub_dataset(world, task_pool, monkeypatch):
    from smile_ray.tasks.clip_zero_shot import load_task_dataset

    digits = world["tasks"][1]
    with pytest.raises(SmileError, match=r"^task digits: dataset '.*digits': labels must be integers in \[0, 1\)"):
        load_task_dataset(ClipTask(**{**digits.__dict__, "classnames": ["zero"]}))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    start = time.perf_counter()
    with pytest.raises(SmileError) as excinfo:
        load_task_dataset(ta8_tasks("mnist")[0])
    assert time.perf_counter() - start < 5
    assert _one_line(excinfo) == ("task mnist: dataset 'ylecun/mnist': cannot load split 'test' "
                                  "(HF_HUB_OFFLINE is set; not in the local Hugging Face cache)")


def test_task_pool_field_errors(world, tmp_path):
    with pytest.raises(SmileError, match=r"^task_pool\.batch_size: expected an integer >= 1, got 0$"):
        ClipZeroShotTaskPool(world["clip_dir"], world["tasks"], batch_size=0)
    with pytest.raises(SmileError, match=r"^task_pool\.clip_model: cannot load '.*nothing' \(no such directory\)$"):
        ClipZeroShotTaskPool(str(tmp_path / "nothing"), world["tasks"])
    with pytest.raises(SmileError, match=r"^task_pool\.clip_model: cannot load '.*expert_shapes' \(ValueError: "
                                         r"model_type is 'clip_vision_model'; a full CLIP model"):
        ClipZeroShotTaskPool(world["experts"]["shapes"], world["tasks"])
    with pytest.raises(SmileError, match=r"^task shapes: template 'a photo' has no \{c\}$"):
        ClipZeroShotTaskPool(world["clip_dir"], [_task(world, templates=["a photo"])])
