"""Build the embedded benchmark: a tiny CLIP pretrained on digits and eight fine-tuned vision towers.

Layout of a build (the formats the real CLIP pools load):

    <cache>/<scale>-<hash>/clip/            CLIPModel + tokenizer + CLIPImageProcessor (save_pretrained)
    <cache>/<scale>-<hash>/experts/<task>/  CLIPVisionModel (save_pretrained)
    <cache>/<scale>-<hash>/data/<task>/     DatasetDict(train, test) with columns image (RGB), label (ClassLabel)
    <cache>/<scale>-<hash>/recipe.json      what was built, and how long it took

The hash covers the recipe, the scale, library versions and this package's source, so a build is reused while
they stay the same and rebuilt when any changes. Builds are written to a temporary directory and renamed into
place under a file lock, so readers never see half a build and concurrent builders do not collide.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
import transformers
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import (AutoImageProcessor, AutoTokenizer, CLIPConfig, CLIPImageProcessorPil, CLIPModel,
                          CLIPVisionModel, PreTrainedTokenizerFast)

from smile_ray.embedded.cache import build_environment, cached_build, default_cache_dir
from smile_ray.errors import SmileError
from smile_ray.embedded.recipe import (PRETRAIN_BACKGROUND, PRETRAIN_FOREGROUND, RECIPES, RGB, TASKS, Recipe,
                                       TaskSpec)
from smile_ray.tasks.clip_zero_shot import ClipTask, zero_shot_head, zero_shot_logits

PAD, UNK, BOS, EOS = "<|pad|>", "<|unk|>", "<|startoftext|>", "<|endoftext|>"
SPECIAL_TOKENS = (PAD, UNK, BOS, EOS)  # ids 0..3; EOS is 3, not 2, so CLIP pools at the first EOS


@dataclass
class EmbeddedBenchmark:
    """A finished build: the pretrained CLIP, one expert vision tower per task, and the tasks."""

    root: Path
    clip_dir: Path
    experts: dict[str, Path]  # task name → CLIPVisionModel directory, in task order
    tasks: list[ClipTask]


def recipe_for(scale: str) -> Recipe:
    """The recipe of a scale ("full" or "tiny")."""
    if scale not in RECIPES:
        raise SmileError(f"scale: unknown embedded benchmark scale {scale!r}; choose one of {sorted(RECIPES)}")
    return RECIPES[scale]


def recipe_hash(scale: str) -> str:
    """Hex digest over the scale's recipe, the tasks, library versions and this package's source bytes."""
    here = Path(__file__).parent
    blob = json.dumps({
        "scale": scale,
        "recipe": dataclasses.asdict(recipe_for(scale)),
        "tasks": [dataclasses.asdict(t) for t in TASKS],
        "pretrain_colours": [PRETRAIN_BACKGROUND, PRETRAIN_FOREGROUND],
        "versions": [torch.__version__, transformers.__version__, datasets.__version__],
    }, sort_keys=True).encode()
    digest = hashlib.sha256(blob)
    for name in ("recipe.py", "build.py"):
        digest.update((here / name).read_bytes())
    return digest.hexdigest()


def benchmark_dir(cache_dir: str | Path | None = None, scale: str = "full") -> Path:
    """Where the build of `scale` lives (whether or not it exists yet)."""
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return cache.expanduser() / f"{scale}-{recipe_hash(scale)[:16]}"


def build_embedded(cache_dir: str | Path | None = None, *, scale: str = "full",
                   force: bool = False) -> EmbeddedBenchmark:
    """Return the benchmark of `scale`, building it first unless a finished build is cached (or `force`)."""
    root = benchmark_dir(cache_dir, scale)
    return describe(cached_build(root, lambda out: _build_into(out, scale), force=force))


def describe(root: Path) -> EmbeddedBenchmark:
    """The `EmbeddedBenchmark` of a finished build directory."""
    root = Path(root)
    return EmbeddedBenchmark(
        root=root,
        clip_dir=root / "clip",
        experts={t.name: root / "experts" / t.name for t in TASKS},
        tasks=[ClipTask(name=t.name, dataset=str(root / "data" / t.name), classnames=list(t.classnames),
                        templates=list(t.templates), split="test") for t in TASKS],
    )


# ---------------------------------------------------------------------------------------------------------------
# Images: stroke intensity maps (N, 16, 16) in [0, 1], changed by a task's transform, then coloured.

def _blur(a: np.ndarray, recipe: Recipe, rng: np.random.Generator) -> np.ndarray:
    x = np.arange(-2, 3)
    kernel = np.exp(-x**2 / (2 * recipe.blur_sigma**2))
    kernel /= kernel.sum()
    padded = np.pad(a, ((0, 0), (2, 2), (2, 2)))
    rows = sum(kernel[i] * padded[:, i:i + a.shape[1], :] for i in range(5))
    out = sum(kernel[j] * rows[:, :, j:j + a.shape[2]] for j in range(5))
    return out / out.max(axis=(1, 2), keepdims=True)


def _corner(a: np.ndarray, recipe: Recipe, rng: np.random.Generator) -> np.ndarray:
    n, h, w = a.shape
    small = a.reshape(n, h // 2, 2, w // 2, 2).mean(axis=(2, 4))
    out = np.zeros_like(a)
    out[:, 1:1 + h // 2, w // 2 - 1:w - 1] = small  # half size, top right, off the patch grid by one pixel
    return out


TRANSFORMS = {
    "identity": lambda a, recipe, rng: a,
    "blur": _blur,
    "hflip": lambda a, recipe, rng: a[:, :, ::-1],
    "noise": lambda a, recipe, rng: np.clip(a + rng.normal(0.0, recipe.noise_std, a.shape), 0.0, 1.0),
    "corner": _corner,
    "rot90": lambda a, recipe, rng: np.rot90(a, k=1, axes=(1, 2)),
    "transpose": lambda a, recipe, rng: a.transpose(0, 2, 1),
    "invert": lambda a, recipe, rng: a,  # the inversion is in the colours: a light background, dark strokes
}


def _upsample(digits8: np.ndarray, size: int) -> np.ndarray:
    """(N, 8, 8) digits with values 0..16 → (N, size, size) intensities in [0, 1], bilinear."""
    a = torch.from_numpy(digits8.astype(np.float64) / 16.0)[:, None]
    return F.interpolate(a, size=(size, size), mode="bilinear", align_corners=False)[:, 0].clamp(0, 1).numpy()


def _colour(a: np.ndarray, background: RGB, foreground: RGB) -> list[PIL.Image.Image]:
    """Blend background (a = 0) to foreground (a = 1); RGB PIL images."""
    bg, fg = np.asarray(background, np.float64), np.asarray(foreground, np.float64)
    rgb = np.rint(bg * (1 - a[..., None]) + fg * a[..., None]).astype(np.uint8)
    return [PIL.Image.fromarray(np.ascontiguousarray(img), mode="RGB") for img in rgb]


def _render(spec: TaskSpec, digits8: np.ndarray, recipe: Recipe, rng: np.random.Generator) -> list[PIL.Image.Image]:
    a = TRANSFORMS[spec.transform](_upsample(digits8, recipe.image_size), recipe, rng)
    return _colour(np.ascontiguousarray(a), spec.background, spec.foreground)


def _split(recipe: Recipe) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Stratified train/test split of sklearn's digits: (images_train, digits_train, images_test, digits_test)."""
    digits = load_digits()
    x, y = digits.images, digits.target
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=recipe.test_fraction, random_state=recipe.seed,
                                              stratify=y)

    def per_class(x: np.ndarray, y: np.ndarray, n: int | None) -> tuple[np.ndarray, np.ndarray]:
        if n is None:
            return x, y
        keep = np.sort(np.concatenate([np.flatnonzero(y == c)[:n] for c in range(10)]))
        return x[keep], y[keep]

    x_tr, y_tr = per_class(x_tr, y_tr, recipe.train_per_class)
    x_te, y_te = per_class(x_te, y_te, recipe.test_per_class)
    return x_tr, y_tr, x_te, y_te


def _task_dataset(spec: TaskSpec, index: int, split: tuple[np.ndarray, ...], recipe: Recipe) -> datasets.DatasetDict:
    x_tr, y_tr, x_te, y_te = split
    rng = np.random.default_rng([recipe.seed, index])
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=list(spec.classnames))})
    parts = {}
    for name, x, y in (("train", x_tr, y_tr), ("test", x_te, y_te)):
        labels = [spec.label_of_digit[int(d)] for d in y]
        parts[name] = datasets.Dataset.from_dict({"image": _render(spec, x, recipe, rng), "label": labels},
                                                 features=features)
    return datasets.DatasetDict(parts)


# ---------------------------------------------------------------------------------------------------------------
# Text: every caption the benchmark uses is a task template filled with a class name.

def _captions_of_digit(d: int) -> list[str]:
    """All captions that describe digit d, over every task's templates and label names."""
    return [tpl.format(c=t.classnames[t.label_of_digit[d]]) for t in TASKS for tpl in t.templates]


def _make_tokenizer(recipe: Recipe) -> PreTrainedTokenizerFast:
    """A word-level tokenizer (lowercased, punctuation split) whose vocabulary is every word of every caption."""
    normalizer = normalizers.Lowercase()
    pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    words: dict[str, None] = {}
    for d in range(10):
        for caption in _captions_of_digit(d):
            for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(caption)):
                words.setdefault(word)
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for word in sorted(words):
        vocab[word] = len(vocab)
    core = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    core.normalizer = normalizer
    core.pre_tokenizer = pre_tokenizer
    core.post_processor = processors.TemplateProcessing(single=f"{BOS} $A {EOS}", pair=f"{BOS} $A {EOS} $B {EOS}",
                                                        special_tokens=[(BOS, vocab[BOS]), (EOS, vocab[EOS])])
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                   unk_token=UNK, model_max_length=recipe.max_text_len)


def _make_image_processor(recipe: Recipe) -> CLIPImageProcessorPil:
    """Rescale to [0, 1] and normalise; no resize or crop, the stored images already have the model's size."""
    return CLIPImageProcessorPil(do_resize=False, do_center_crop=False, do_rescale=True, do_normalize=True,
                                 do_convert_rgb=True, size={"shortest_edge": recipe.image_size},
                                 crop_size={"height": recipe.image_size, "width": recipe.image_size},
                                 image_mean=[recipe.pixel_mean] * 3, image_std=[recipe.pixel_std] * 3)


def _make_clip(recipe: Recipe, tokenizer: PreTrainedTokenizerFast) -> CLIPModel:
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=recipe.text_hidden,
                         intermediate_size=recipe.text_mlp, num_hidden_layers=recipe.text_layers,
                         num_attention_heads=recipe.text_heads, max_position_embeddings=recipe.max_text_len,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id),
        vision_config=dict(hidden_size=recipe.vision_hidden, intermediate_size=recipe.vision_mlp,
                           num_hidden_layers=recipe.vision_layers, num_attention_heads=recipe.vision_heads,
                           image_size=recipe.image_size, patch_size=recipe.patch_size, num_channels=3),
        projection_dim=recipe.projection_dim,
    )
    return CLIPModel(config)


def _pixels(processor, images: list[PIL.Image.Image]) -> torch.Tensor:
    return processor(images=images, return_tensors="pt")["pixel_values"]


# ---------------------------------------------------------------------------------------------------------------
# Training.

def _pretrain(clip: CLIPModel, tokenizer, pixels: torch.Tensor, digits: np.ndarray, recipe: Recipe) -> None:
    """CLIP contrastive pretraining on captioned original digits.

    Each image gets a caption drawn from all tasks' templates and label names. Identical captions in a batch
    count as positives of each other (soft targets), so "an odd number" twice is not a false negative.
    """
    captions = sorted({c for d in range(10) for c in _captions_of_digit(d)})
    caption_id = {c: i for i, c in enumerate(captions)}
    tokens = tokenizer(captions, padding=True, return_tensors="pt")
    choices = [torch.tensor([caption_id[c] for c in _captions_of_digit(d)]) for d in range(10)]
    digit = torch.from_numpy(digits).long()
    generator = torch.Generator().manual_seed(recipe.seed)
    optimiser = torch.optim.AdamW(clip.parameters(), lr=recipe.pretrain_lr,
                                  weight_decay=recipe.pretrain_weight_decay)
    clip.train()
    for _ in range(recipe.pretrain_epochs):
        order = torch.randperm(len(pixels), generator=generator)
        pick = torch.randint(0, 1 << 30, (len(pixels),), generator=generator)
        for start in range(0, len(order), recipe.batch_size):
            idx = order[start:start + recipe.batch_size]
            cap = torch.stack([choices[int(digit[i])][int(pick[i]) % len(choices[int(digit[i])])] for i in idx])
            image = F.normalize(clip.get_image_features(pixel_values=pixels[idx]).pooler_output, dim=-1)
            text = F.normalize(clip.get_text_features(input_ids=tokens["input_ids"][cap],
                                                      attention_mask=tokens["attention_mask"][cap]).pooler_output,
                               dim=-1)
            logits = clip.logit_scale.exp() * image @ text.T
            same = (cap[:, None] == cap[None, :]).float()
            targets = same / same.sum(dim=1, keepdim=True)
            loss = (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            with torch.no_grad():
                clip.logit_scale.clamp_(0, np.log(100.0))
    clip.eval()


def _finetune(clip: CLIPModel, vision: CLIPVisionModel, head: torch.Tensor, pixels: torch.Tensor,
              labels: torch.Tensor, recipe: Recipe, seed: int) -> None:
    """Fit `vision` to the frozen zero-shot head, training only the vision tower's nn.Linear layers."""
    for p in vision.parameters():
        p.requires_grad_(False)
    trainable = [p for m in vision.modules() if isinstance(m, torch.nn.Linear) for p in m.parameters()]
    for p in trainable:
        p.requires_grad_(True)
    optimiser = torch.optim.SGD(trainable, lr=recipe.finetune_lr, momentum=recipe.finetune_momentum)
    generator = torch.Generator().manual_seed(seed)
    vision.train()
    for _ in range(recipe.finetune_epochs):
        order = torch.randperm(len(pixels), generator=generator)
        for start in range(0, len(order), recipe.batch_size):
            idx = order[start:start + recipe.batch_size]
            loss = F.cross_entropy(zero_shot_logits(clip, vision, pixels[idx], head), labels[idx])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
    vision.eval()
    for p in vision.parameters():
        p.requires_grad_(True)


def _build_into(out: Path, scale: str) -> None:
    """Write a complete build of `scale` into the (new) directory `out`."""
    recipe = recipe_for(scale)
    started = time.perf_counter()
    with build_environment(recipe.seed):
        threads = torch.get_num_threads()
        split = _split(recipe)
        for index, spec in enumerate(TASKS):
            _task_dataset(spec, index, split, recipe).save_to_disk(str(out / "data" / spec.name))

        clip_dir = out / "clip"
        _make_tokenizer(recipe).save_pretrained(clip_dir)
        _make_image_processor(recipe).save_pretrained(clip_dir)
        # From here on, text and images go through what a consumer loads back from disk.
        tokenizer = AutoTokenizer.from_pretrained(clip_dir)
        processor = AutoImageProcessor.from_pretrained(clip_dir)

        x_tr, y_tr, _, _ = split
        images = _colour(_upsample(x_tr, recipe.image_size), PRETRAIN_BACKGROUND, PRETRAIN_FOREGROUND)
        clip = _make_clip(recipe, tokenizer)
        _pretrain(clip, tokenizer, _pixels(processor, images), y_tr, recipe)
        for p in clip.parameters():
            p.requires_grad_(False)
        clip.save_pretrained(clip_dir)

        for index, spec in enumerate(TASKS):
            train = datasets.load_from_disk(str(out / "data" / spec.name))["train"]
            head = zero_shot_head(clip, tokenizer, list(spec.classnames), list(spec.templates))
            vision = copy.deepcopy(clip.vision_model)  # a CLIPVisionModel in transformers 5
            _finetune(clip, vision, head, _pixels(processor, list(train["image"])),
                      torch.tensor(train["label"]), recipe, seed=recipe.seed * 1000 + index + 1)
            vision.save_pretrained(out / "experts" / spec.name)

    (out / "recipe.json").write_text(json.dumps({
        "scale": scale,
        "hash": recipe_hash(scale),
        "recipe": dataclasses.asdict(recipe),
        "tasks": [dataclasses.asdict(t) for t in TASKS],
        "build_seconds": round(time.perf_counter() - started, 1),
        "torch_threads": threads,
    }, indent=2))
