"""The embedded benchmark builds loadable, cached, deterministic artefacts (tiny scale, in tmp_path)."""
from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel, CLIPVisionModel

from smile_ray.embedded import RECIPES, TASKS, benchmark_dir, build_embedded, default_cache_dir
from smile_ray.embedded import build as build_module
from smile_ray.embedded.__main__ import main as cli_main
from smile_ray.errors import SmileError
from smile_ray.tasks.clip_zero_shot import zero_shot_head

LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory):
    return build_embedded(tmp_path_factory.mktemp("cache"), scale="tiny")


def _entries(cache: Path) -> list[str]:
    return sorted(p.name for p in cache.iterdir() if not p.name.endswith(".lock"))


def test_build_is_loadable_in_the_real_formats(tiny) -> None:
    clip = CLIPModel.from_pretrained(tiny.clip_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny.clip_dir)
    processor = AutoImageProcessor.from_pretrained(tiny.clip_dir)
    assert (tiny.clip_dir / "model.safetensors").is_file()
    assert list(tiny.experts) == [t.name for t in TASKS]
    for name, path in tiny.experts.items():
        assert (path / "model.safetensors").is_file()
        expert = CLIPVisionModel.from_pretrained(path)
        assert expert.config.hidden_size == clip.config.vision_config.hidden_size
    for spec, task in zip(TASKS, tiny.tasks):
        assert (task.name, task.split, task.classnames, task.templates) == (
            spec.name, "test", list(spec.classnames), list(spec.templates))
        data = datasets.load_from_disk(task.dataset)
        assert set(data) == {"train", "test"}
        for split in data.values():
            assert split.column_names == ["image", "label"]
            assert isinstance(split.features["image"], datasets.Image)
            assert split.features["label"].names == list(spec.classnames)
            assert set(split["label"]) == set(range(len(spec.classnames)))
        image = data["test"][0]["image"]
        assert image.mode == "RGB" and image.size == (RECIPES["tiny"].image_size,) * 2
        pixels = processor(images=[image], return_tensors="pt")["pixel_values"]
        head = zero_shot_head(clip, tokenizer, task.classnames, task.templates)
        assert pixels.shape == (1, 3, clip.config.vision_config.image_size, clip.config.vision_config.image_size)
        assert head.shape == (len(spec.classnames), clip.config.projection_dim)


def test_processor_maps_stored_images_to_exact_pixels(tiny) -> None:
    processor = AutoImageProcessor.from_pretrained(tiny.clip_dir)
    recipe = RECIPES["tiny"]
    images = list(datasets.load_from_disk(tiny.tasks[0].dataset)["test"]["image"][:4])
    expected = torch.from_numpy(np.stack([np.asarray(im, np.float32) for im in images])).permute(0, 3, 1, 2)
    expected = (expected / 255.0 - recipe.pixel_mean) / recipe.pixel_std
    pixels = processor(images=images, return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(pixels, expected, rtol=0, atol=1e-6)


def test_tokenizer_knows_every_caption_and_pools_at_eos(tiny) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny.clip_dir)
    clip = CLIPModel.from_pretrained(tiny.clip_dir)
    assert clip.config.text_config.eos_token_id == tokenizer.eos_token_id != 2  # 2 selects the legacy argmax pooling
    for task in tiny.tasks:
        for template in task.templates:
            ids = tokenizer([template.format(c=c) for c in task.classnames])["input_ids"]
            assert all(tokenizer.unk_token_id not in row and row[-1] == tokenizer.eos_token_id for row in ids)
        head = zero_shot_head(clip, tokenizer, task.classnames, task.templates)
        assert torch.unique(head.round(decimals=5), dim=0).shape[0] == len(task.classnames)


def test_eight_tasks_differ_in_domain_and_labels(tiny) -> None:
    assert len(tiny.tasks) == 8 == len({t.name for t in tiny.tasks})
    assert len({tuple(t.classnames) for t in tiny.tasks}) == 8
    assert len({spec.transform for spec in TASKS}) == 8
    assert len({spec.background for spec in TASKS}) == 8
    for spec, task in zip(TASKS, tiny.tasks):  # the most common colour of an image is its task's background
        image = np.asarray(datasets.load_from_disk(task.dataset)["test"][0]["image"]).reshape(-1, 3)
        colours, counts = np.unique(image, axis=0, return_counts=True)
        assert tuple(colours[counts.argmax()]) == spec.background


def test_experts_differ_from_base_only_in_vision_linear_layers(tiny) -> None:
    base = dict(CLIPVisionModel.from_pretrained(tiny.clip_dir).named_parameters())
    for name, path in tiny.experts.items():
        expert = dict(CLIPVisionModel.from_pretrained(path).named_parameters())
        assert expert.keys() == base.keys()
        changed = {key for key in base if not torch.equal(base[key], expert[key])}
        assert changed, f"expert {name} equals the base"
        assert all(key.split(".")[-2] in LINEAR_NAMES for key in changed), sorted(changed)
        assert any(key.endswith(".weight") for key in changed)


def test_second_call_reuses_the_cache(tiny, monkeypatch: pytest.MonkeyPatch) -> None:
    stamp = (tiny.root / "recipe.json").stat().st_mtime_ns

    def no_rebuild(out: Path, scale: str) -> None:
        raise AssertionError("rebuilt a cached benchmark")

    monkeypatch.setattr(build_module, "_build_into", no_rebuild)
    again = build_embedded(tiny.root.parent, scale="tiny")
    assert again.root == tiny.root
    assert (tiny.root / "recipe.json").stat().st_mtime_ns == stamp


def test_scale_or_recipe_change_gives_another_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tiny_dir = benchmark_dir(tmp_path, "tiny")
    assert tiny_dir != benchmark_dir(tmp_path, "full")
    assert tiny_dir == benchmark_dir(tmp_path, "tiny")
    monkeypatch.setitem(RECIPES, "tiny", dataclasses.replace(RECIPES["tiny"], seed=1))
    assert benchmark_dir(tmp_path, "tiny") != tiny_dir
    with pytest.raises(SmileError, match="scale"):
        build_embedded(tmp_path, scale="huge")


def test_default_cache_dir_follows_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SMILE_RAY_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path / "embedded"
    assert benchmark_dir(None, "tiny").parent == tmp_path / "embedded"
    monkeypatch.delenv("SMILE_RAY_CACHE")
    assert default_cache_dir() == Path.home() / ".cache" / "smile_ray" / "embedded"


def test_build_is_deterministic_and_restores_torch_state(tiny, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    build_threads = []
    real_split = build_module._split
    monkeypatch.setattr(build_module, "_split", lambda recipe: build_threads.append(torch.get_num_threads())
                        or real_split(recipe))
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(2)               # the caller's thread count does not reach the build
    rng_state = torch.get_rng_state()
    try:
        other = build_embedded(tmp_path, scale="tiny")
        assert (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()) == (2, deterministic)
    finally:
        torch.set_num_threads(threads)
    assert build_threads == [1]
    assert torch.equal(torch.get_rng_state(), rng_state)
    assert other.root.name == tiny.root.name and other.root != tiny.root
    for rel in ["clip", *(f"experts/{name}" for name in tiny.experts)]:
        ours, theirs = load_file(tiny.root / rel / "model.safetensors"), load_file(other.root / rel / "model.safetensors")
        assert ours.keys() == theirs.keys()
        assert all(torch.equal(ours[key], theirs[key]) for key in ours), rel


def test_failed_build_leaves_nothing_and_force_rebuilds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_build = build_module._build_into

    def crash(out: Path, scale: str) -> None:
        (out / "clip").mkdir(parents=True)
        raise KeyboardInterrupt

    monkeypatch.setattr(build_module, "_build_into", crash)
    with pytest.raises(KeyboardInterrupt):
        build_embedded(tmp_path, scale="tiny")
    assert _entries(tmp_path) == []

    monkeypatch.setattr(build_module, "_build_into", real_build)
    first = build_embedded(tmp_path, scale="tiny")
    stamp = (first.root / "recipe.json").stat().st_mtime_ns
    second = build_embedded(tmp_path, scale="tiny", force=True)
    assert second.root == first.root and (second.root / "recipe.json").stat().st_mtime_ns != stamp
    assert _entries(tmp_path) == [first.root.name]


def test_concurrent_builders_agree(tmp_path: Path) -> None:
    code = ("import torch; torch.set_num_threads(1)\n"
            "from smile_ray.embedded import build_embedded\n"
            f"print(build_embedded({str(tmp_path)!r}, scale='tiny').root)\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                              text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in outputs]
    roots = {out.strip().splitlines()[-1] for out, _ in outputs}
    assert roots == {str(benchmark_dir(tmp_path, "tiny"))}
    assert _entries(tmp_path) == [benchmark_dir(tmp_path, "tiny").name]


def test_module_entry_point_prints_where_it_is(tiny, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["--scale", "tiny", "--cache-dir", str(tiny.root.parent)]) == 0
    out = capsys.readouterr().out
    assert str(tiny.root) in out and all(name in out for name in tiny.experts)
