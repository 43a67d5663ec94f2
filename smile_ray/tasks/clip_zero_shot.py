"""CLIP zero-shot classification, FusionBench's protocol (smile-facts §4.1).

A task's head is built by the *pretrained* CLIP text tower from class names × templates:
embed every filled-in template, L2-normalise, average over templates, L2-normalise again.
Logits are exp(logit_scale) · cos(image embedding, class embedding). Per task we report the accuracy
(correct / N) and the loss as FusionBench does: the mean over batches of each batch's mean cross-entropy.

Images are preprocessed in two steps that together equal the image processor's output bit for bit:
RGB conversion, resize and centre crop give uint8 pixels (cached per pool, ≈150 KB per 224² image);
rescale and normalise run per batch on the evaluation device.
"""
from __future__ import annotations

import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import datasets
import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel, PretrainedConfig

from smile_ray.errors import SmileError
from smile_ray.hub import load_pretrained
from smile_ray.report import average_metrics
from smile_ray.tasks.evaluation import EvaluatorBase, TaskDoneCallback, evaluate_each
from smile_ray.tasks.splits import load_split
from smile_ray.tasks.ta8 import ta8_tasks

if TYPE_CHECKING:
    from smile_ray.kinds.clip_zero_shot import ClipZeroShotConfig
    from smile_ray.pools.clip_vision import ClipVisionPool



@dataclass
class ClipTask:
    """One classification task: where its data is and how its classes are named."""

    name: str
    dataset: str  # hub id or a directory written by `datasets.Dataset.save_to_disk`
    classnames: list[str]
    templates: list[str]  # each contains "{c}", the class name
    split: str = "test"
    dataset_config: str | None = None
    image_column: str = "image"
    label_column: str = "label"
    extra: dict = field(default_factory=dict)


@torch.no_grad()
def zero_shot_head(clip_model, tokenizer, classnames: list[str], templates: list[str],
                   device: torch.device | str = "cpu") -> torch.Tensor:
    """(C, d) unit-norm class embeddings from the CLIP text tower (template-averaged)."""
    rows = []
    for name in classnames:
        texts = [t.format(c=name) for t in templates]
        tokens = tokenizer(texts, padding=True, return_tensors="pt").to(device)
        pooled = clip_model.text_model(input_ids=tokens["input_ids"],
                                       attention_mask=tokens["attention_mask"]).pooler_output  # (templates, h)
        emb = F.normalize(clip_model.text_projection(pooled), dim=-1)   # (templates, d)
        rows.append(F.normalize(emb.mean(dim=0), dim=-1))
    return torch.stack(rows)


class ImageScorer(nn.Module):
    """What zero-shot scoring needs of a CLIP model once the heads exist: its visual projection and logit scale
    (shared with the model, not copied)."""

    def __init__(self, clip_model: CLIPModel) -> None:
        super().__init__()
        self.visual_projection = clip_model.visual_projection
        self.logit_scale = clip_model.logit_scale


def image_embeddings(clip_model, vision_model, pixel_values: torch.Tensor) -> torch.Tensor:
    """(B, d) unit-norm image embeddings: vision pooler output → visual projection → normalise.

    `clip_model`: a CLIPModel, or anything with its `visual_projection` and `logit_scale` (an ImageScorer)."""
    pooled = vision_model(pixel_values=pixel_values).pooler_output
    projection = clip_model.visual_projection
    return F.normalize(projection(pooled.to(projection.weight.dtype)), dim=-1)


def zero_shot_logits(clip_model, vision_model, pixel_values: torch.Tensor, head: torch.Tensor) -> torch.Tensor:
    """(B, C) logits exp(logit_scale) · image_embedding · headᵀ."""
    return clip_model.logit_scale.exp() * image_embeddings(clip_model, vision_model, pixel_values) @ head.T


def load_task_dataset(task: ClipTask, *, max_samples: int | None = None) -> datasets.Dataset:
    """The task's split with only its image and label columns, cut to the first `max_samples` rows (`task.dataset`:
    a `save_to_disk` directory or a hub id loaded with `task.dataset_config`)."""
    where = f"task {task.name}: dataset {task.dataset!r}"
    loaded = load_split(task.dataset, split=task.split, config=task.dataset_config, where=where)
    return _checked(loaded, task, where, max_samples)


def _checked(ds: datasets.Dataset, task: ClipTask, where: str, max_samples: int | None) -> datasets.Dataset:
    for kind, column in (("image_column", task.image_column), ("label_column", task.label_column)):
        if column not in ds.column_names:
            raise SmileError(f"{where}: no {kind} {column!r} (columns: {', '.join(ds.column_names)})")
    ds = ds.select_columns([task.image_column, task.label_column])
    if max_samples is not None:
        ds = ds.select(range(min(max_samples, len(ds))))
    if len(ds) == 0:
        raise SmileError(f"{where}: split {task.split!r} has no samples")
    num_classes = len(task.classnames)
    feature = ds.features[task.label_column]
    if isinstance(feature, datasets.ClassLabel) and feature.num_classes != num_classes:
        raise SmileError(f"{where}: {feature.num_classes} classes in the data, {num_classes} class names in the task")
    labels = ds.select_columns([task.label_column]).with_format("numpy")[:][task.label_column]
    if not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0 or labels.max() >= num_classes:
        raise SmileError(f"{where}: labels must be integers in [0, {num_classes}), "
                         f"got {labels.dtype} in [{labels.min()}, {labels.max()}]")
    return ds


def unreadable_sample(dataset: datasets.Dataset, task: ClipTask, rows: range, error: Exception) -> SmileError:
    """The refusal of a dataset with an image that cannot be decoded, naming the first such sample among `rows`."""
    where = f"task {task.name}: dataset {task.dataset!r}"
    for row in rows:
        try:
            dataset[row][task.image_column].convert("RGB")
        except Exception as found:  # noqa: BLE001 -- whatever stops the image from decoding is the answer
            said = re.sub(r" ?<[^<>]* at 0x[0-9a-f]+>", "", str(found))      # no "<_io.BytesIO object at 0x…>"
            return SmileError(f"{where}: sample {row} ({task.image_column}) is not a readable image: "
                              f"{type(found).__name__}: {said}")
    return SmileError(f"{where}: samples {rows.start}–{rows.stop - 1} could not be read: {type(error).__name__}: {error}")


class ImageGeometry:
    """DataLoader collate: rows → (uint8 pixels (B, 3, H, W) after RGB, resize, crop; int64 labels (B,))."""

    def __init__(self, processor, image_column: str = "image", label_column: str = "label") -> None:
        self.processor = processor
        self.image_column = image_column
        self.label_column = label_column

    def __call__(self, rows: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
        images = [row[self.image_column].convert("RGB") for row in rows]
        pixels = self.processor(images=images, do_rescale=False, do_normalize=False,
                                return_tensors="np")["pixel_values"]
        if pixels.dtype != np.uint8:
            raise TypeError(f"image processor returned {pixels.dtype} pixels before rescaling, expected uint8")
        labels = torch.tensor([int(row[self.label_column]) for row in rows], dtype=torch.int64)
        return torch.from_numpy(np.ascontiguousarray(pixels)), labels


class PixelNormalizer(nn.Module):
    """uint8 pixels → pixel_values exactly as the image processor computes them (rescale in float64, then
    (x - mean) / std in float32)."""

    def __init__(self, processor) -> None:
        super().__init__()
        self.rescale_factor = float(processor.rescale_factor) if processor.do_rescale else None
        normalize = bool(processor.do_normalize)
        mean = torch.tensor(processor.image_mean if normalize else [0.0], dtype=torch.float32)
        std = torch.tensor(processor.image_std if normalize else [1.0], dtype=torch.float32)
        self.register_buffer("mean", mean.view(-1, 1, 1), persistent=False)
        self.register_buffer("std", std.view(-1, 1, 1), persistent=False)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) uint8 → (B, 3, H, W) float32."""
        x = pixels.to(torch.float64) * self.rescale_factor if self.rescale_factor is not None else pixels
        return (x.to(torch.float32) - self.mean) / self.std


@dataclass
class TaskData:
    """A task's rows and, once a full pass has run with caching on, its preprocessed pixels and labels."""

    dataset: datasets.Dataset
    pixels: np.ndarray | None = None  # (N, 3, H, W) uint8, filled by the first full pass when caching
    labels: np.ndarray | None = None  # (N,) int64


class ClipZeroShotTaskPool(EvaluatorBase):
    """Evaluates CLIP vision towers on zero-shot classification tasks, FusionBench-style.

    The full `CLIPModel` at `clip_model` (hub id or directory) provides the frozen text tower, projections and
    logit scale; its tokenizer and image processor are loaded from the same place. Datasets, preprocessed pixels
    and heads are built once per pool object and reused by every `evaluate` call (call `prepare()` to do it
    ahead of time). Once every task's head is built the pool lets go of the CLIP towers and the tokenizer, keeping
    only the visual projection and logit scale, so a prepared pool sent to sweep trials carries no second model.
    `max_samples` keeps the first N rows of each split (in dataset order, not a random subset).
    `cache_images=False` re-runs resize/crop on every evaluation instead of holding uint8 pixels in memory.
    """

    def __init__(self, clip_model: str, tasks: Sequence[ClipTask], *, batch_size: int = 128, num_workers: int = 0,
                 max_samples: int | None = None, device: str | torch.device | None = None,
                 cache_images: bool = True, image_backend: str = "pil", revision: str | None = None) -> None:
        _check_int("task_pool.batch_size", batch_size, 1)
        _check_int("task_pool.num_workers", num_workers, 0)
        if max_samples is not None:
            _check_int("task_pool.max_samples", max_samples, 1)
        self.tasks = _checked_tasks(tasks)
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.max_samples = max_samples
        self.device = torch.device(device) if device is not None else None
        self.cache_images = cache_images
        field_name = "task_pool.clip_model"
        self.clip_model: CLIPModel | None = load_pretrained(_load_clip_model, clip_model, field=field_name,
                                                            revision=revision)
        self.scorer = ImageScorer(self.clip_model)
        self.tokenizer = load_pretrained(AutoTokenizer.from_pretrained, clip_model, field=field_name,
                                         revision=revision)
        # FusionBench's CLIPProcessor used the PIL implementation; the torchvision one resizes differently
        self.processor = load_pretrained(AutoImageProcessor.from_pretrained, clip_model, field=field_name,
                                         revision=revision, backend=image_backend)
        self.normalizer = PixelNormalizer(self.processor)
        self._heads: dict[str, torch.Tensor] = {}
        self._data: dict[str, TaskData] = {}

    def head(self, task: ClipTask) -> torch.Tensor:
        """(C, d) zero-shot head of `task` (float32, on cpu), built once per pool."""
        if task.name not in self._heads:
            device = self.resolved_device()
            self.clip_model.to(device)
            head = zero_shot_head(self.clip_model, self.tokenizer, task.classnames, task.templates, device=device)
            self._heads[task.name] = head.float().cpu()
            if len(self._heads) == len(self.tasks):      # the text side has done its work
                self.clip_model = self.tokenizer = None
        return self._heads[task.name]

    def task_data(self, task: ClipTask) -> TaskData:
        """The task's dataset (loaded once per pool) and, after a first full pass, its cached pixels."""
        if task.name not in self._data:
            self._data[task.name] = TaskData(load_task_dataset(task, max_samples=self.max_samples))
        return self._data[task.name]

    def prepare(self) -> None:
        """Load every dataset, preprocess and cache its pixels, and build every head, before any evaluation."""
        for task in self.tasks:
            self.head(task)
            for _ in self._batches(task):
                pass

    def sample_counts(self) -> dict[str, int]:
        """Task name → its number of samples (after max_samples)."""
        return {task.name: len(self.task_data(task).dataset) for task in self.tasks}

    def _batches(self, task: ClipTask, rows: slice | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(uint8 pixels (B, 3, H, W), labels (B,)) batches of the task's samples (or of `rows` of them), in dataset
        order."""
        data = self.task_data(task)
        start, stop, _ = (rows or slice(None)).indices(len(data.dataset))
        if data.pixels is not None:
            for first in range(start, stop, self.batch_size):
                last = min(first + self.batch_size, stop)
                yield torch.from_numpy(data.pixels[first:last].copy()), torch.from_numpy(data.labels[first:last].copy())
            return
        whole = (start, stop) == (0, len(data.dataset))
        loader = DataLoader(data.dataset if whole else data.dataset.select(range(start, max(start, stop))),
                            batch_size=self.batch_size, shuffle=False, drop_last=False, num_workers=self.num_workers,
                            collate_fn=ImageGeometry(self.processor, task.image_column, task.label_column))
        chunks: list[tuple[torch.Tensor, torch.Tensor]] = []
        caching = self.cache_images and whole
        try:
            for pixels, labels in loader:
                if caching:
                    chunks.append((pixels, labels))
                yield pixels, labels
        except (OSError, PIL.Image.DecompressionBombError) as error:      # PIL's UnidentifiedImageError is an OSError
            raise unreadable_sample(data.dataset, task, range(start, stop), error) from None
        if caching:
            data.pixels = torch.cat([p for p, _ in chunks]).numpy()
            data.labels = torch.cat([y for _, y in chunks]).numpy()

    @torch.no_grad()
    def evaluate_task(self, vision_model: nn.Module, task: ClipTask, rows: slice | None = None) -> dict[str, float]:
        """{"accuracy", "loss", "samples"} of `vision_model` (already on the device, in eval mode) on `task` (or on
        `rows` of its samples; {"samples": 0} when there are none)."""
        device = self.resolved_device()
        dtype = next(vision_model.parameters(), torch.empty(0)).dtype
        head = self.head(task).to(device)
        self.scorer.to(device)
        self.normalizer.to(device)
        correct = torch.zeros((), dtype=torch.int64, device=device)
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        batches = samples = 0
        for pixels, labels in self._batches(task, rows):
            pixel_values = self.normalizer(pixels.to(device)).to(dtype)
            labels = labels.to(device)
            logits = zero_shot_logits(self.scorer, vision_model, pixel_values, head).float()  # (B, C)
            loss_sum += F.cross_entropy(logits, labels)
            correct += (logits.argmax(dim=-1) == labels).sum()
            batches += 1
            samples += len(labels)
        if not samples:
            return {"samples": 0}
        return {"accuracy": correct.item() / samples, "loss": loss_sum.item() / batches, "samples": samples}

    def evaluate(self, vision_model: nn.Module, *, on_task_done: TaskDoneCallback | None = None,
                 rows: slice | None = None) -> dict[str, dict[str, float]]:
        """Accuracy (in [0, 1]) and loss per task (of `rows` of its samples, when given), plus their unweighted mean
        under "average".

        `vision_model` (a `CLIPVisionModel` or anything with its call signature and `pooler_output`) is moved
        to the device and run in its own dtype under `torch.no_grad()`. After each task,
        `on_task_done(task_name, {"accuracy", "loss", "samples", "seconds"}, results so far)` is called.
        """
        results = evaluate_each(vision_model, self.tasks, self.evaluate_task, device=self.resolved_device(),
                                on_task_done=on_task_done, rows=rows)
        return {**results, "average": average_metrics(results)}


def task_list(entries: Sequence[str | Mapping]) -> list[ClipTask]:
    """ClipTasks from TA8 names or mappings of ClipTask fields (entries checked by smile_ray.kinds.clip_zero_shot)."""
    return [ta8_tasks([entry])[0] if isinstance(entry, str) else ClipTask(**entry) for entry in entries]


def load_pool(config: ClipZeroShotConfig, models: ClipVisionPool,
              device: torch.device | str | None = None) -> ClipZeroShotTaskPool:
    """The task pool a `task_pool: {kind: clip_zero_shot}` section describes; its text side is `clip_model`, else
    the model pool's base (a full CLIP checkpoint) at the revision its vision tower came from."""
    clip_model, revision = (config.clip_model, None) if config.clip_model else (models.base, models.revision)
    return ClipZeroShotTaskPool(clip_model, task_list(config.tasks), batch_size=config.batch_size,
                                num_workers=config.num_workers, max_samples=config.max_samples, device=device,
                                revision=revision)


def _load_clip_model(source: str, **hub_kwargs) -> CLIPModel:
    config, _ = PretrainedConfig.get_config_dict(source, **hub_kwargs)
    if config.get("model_type") != "clip":
        raise ValueError(f"model_type is {config.get('model_type')!r}; a full CLIP model (text and vision) is needed")
    return CLIPModel.from_pretrained(source, dtype=torch.float32, **hub_kwargs).eval()


def _check_int(name: str, value: object, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise SmileError(f"{name}: expected an integer >= {minimum}, got {value!r}")


def _checked_tasks(tasks: Sequence[ClipTask]) -> list[ClipTask]:
    tasks = list(tasks)
    if not tasks:
        raise SmileError("task_pool.tasks: no tasks")
    names = [task.name for task in tasks]
    if len(set(names)) != len(names):
        raise SmileError(f"task_pool.tasks: a task name is listed twice in {names}")
    for task in tasks:
        if not task.classnames:
            raise SmileError(f"task {task.name}: classnames is empty")
        if not task.templates:
            raise SmileError(f"task {task.name}: templates is empty")
        for template in task.templates:
            if "{c}" not in template:
                raise SmileError(f"task {task.name}: template {template!r} has no {{c}}")
    return tasks
