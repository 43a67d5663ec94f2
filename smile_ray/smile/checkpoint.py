"""Save a merged or upscaled model as a Hugging Face directory (safetensors) and load it back.

A merged model without SMILE layers is a plain `save_pretrained` directory of its architecture. A SMILE model is
saved as the SMILE variant of its architecture (`modeling_smile.py`): config.json with `smile_layers` and an
`auto_map`, the weights as safetensors, and the variant's code (modeling_smile.py, layer.py), so that
`AutoModel.from_pretrained(DIR, trust_remote_code=True)` loads it with nothing but torch and transformers.
`load_model` here loads either kind with this package's own classes (no code is run from the directory).
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import huggingface_hub
import torch
import transformers
from torch import nn

from smile_ray.errors import SmileError
from smile_ray.files import check_new_directory, default_dir_mode, default_file_mode
from smile_ray.smile.modeling_smile import VARIANTS, smile_layout


def as_smile_variant(model: transformers.PreTrainedModel) -> transformers.PreTrainedModel:
    """The same weights, as an instance of the SMILE variant of `model`'s architecture (sharing its tensors)."""
    variant = VARIANTS.get(type(model).__name__)
    if variant is None:
        raise SmileError(f"--save-model: SMILE models of {type(model).__name__} cannot be saved yet (supported: "
                         f"{', '.join(VARIANTS)})")
    from accelerate import init_empty_weights

    settings = {key: value for key, value in model.config.to_dict().items()
                if key not in ("model_type", "architectures", "auto_map", "transformers_version")}
    layout = smile_layout(model)
    info = getattr(model, "smile_info", None)
    config = variant.config_class(**settings, smile_layers=layout, **reference_fields(layout),
                                  smile_skipped_layers=info.skipped_layers if info else [])
    with init_empty_weights(include_buffers=False):        # buffers the model computes (rotary frequencies) stay real
        smile = variant(config)
    smile.load_state_dict(model.state_dict(), strict=True, assign=True)
    smile.tie_weights()
    return smile.eval()


def reference_fields(layout: dict[str, dict]) -> dict[str, int]:
    """The reference implementation's config fields, from the layers' shapes: the ranks asked for (the largest any
    layer holds; a dense layer makes rank_of_expert −1)."""
    shapes = list(layout.values())
    ks = [shape["k"] for shape in shapes]
    return {"num_local_experts": shapes[0]["num_experts"], "num_experts_per_tok": shapes[0]["top_k"],
            "rank_of_router": max(shape["gate_k"] for shape in shapes),
            "rank_of_expert": -1 if min(ks) < 0 else max(ks)}


def save_model(model: nn.Module, directory: str | os.PathLike, tokenizer=None, max_shard_size: str = "5GB") -> Path:
    """Write `model` (a transformers PreTrainedModel), and its tokenizer or processor if given, to `directory`
    atomically, as safetensors shards of at most `max_shard_size`; returns the directory."""
    directory = Path(directory)
    check_new_directory(directory, "--save-model")
    if not isinstance(model, transformers.PreTrainedModel):
        raise SmileError(f"--save-model: only Hugging Face models can be saved, not {type(model).__name__}")
    if smile_layout(model):
        model = as_smile_variant(model)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}."))
    try:
        transformers.utils.logging.disable_progress_bar()
        huggingface_hub.utils.disable_progress_bars()
        model.save_pretrained(tmp, safe_serialization=True, max_shard_size=max_shard_size)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        _default_permissions(tmp)
        if directory.exists():
            directory.rmdir()                            # empty (checked above)
        os.replace(tmp, directory)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return directory


def _default_permissions(tree: Path) -> None:
    """Give `tree` and everything in it the modes of a plain mkdir / open(..., "w") under the current umask:
    mkdtemp makes the directory 0o700 and safetensors writes its file 0o600, unreadable to the other users of a
    shared filesystem."""
    file_mode, dir_mode = default_file_mode(), default_dir_mode()
    for root, dirs, files in os.walk(tree):
        os.chmod(root, dir_mode)
        for name in files:
            os.chmod(os.path.join(root, name), file_mode)


def load_model(directory: str | os.PathLike, dtype: torch.dtype | None = None) -> nn.Module:
    """Load a directory written by `save_model` (or any plain save_pretrained directory), with this package's
    classes: no code from the directory is run."""
    directory = Path(directory)
    architecture = (transformers.PretrainedConfig.get_config_dict(directory)[0].get("architectures") or [""])[0]
    variants = {variant.__name__: variant for variant in VARIANTS.values()}
    model_class = variants.get(architecture) or getattr(transformers, architecture, None)
    if model_class is None:
        raise SmileError(f"{directory}/config.json: unknown architecture {architecture!r}")
    return model_class.from_pretrained(directory, dtype=dtype).eval()
