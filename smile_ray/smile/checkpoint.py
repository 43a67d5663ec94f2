"""Save a merged or upscaled model as a Hugging Face directory (safetensors) and load it back.

A merged model without SMILE layers is a plain `save_pretrained` directory. A SMILE model is its
config (`save_pretrained`), `model.safetensors` (its state dict, named as the module names them) and
`smile_layers.json`, the shape of every SmileLinear (experts, gate_k, k, top_k, bias). Loading
rebuilds the base architecture from the config, swaps in empty SmileLinear layers of those shapes
and loads the weights strictly.
"""
from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
import transformers
from safetensors.torch import load_model as load_safetensors_model
from safetensors.torch import save_model as save_safetensors_model
from torch import nn

from smile_ray.errors import SmileError
from smile_ray.report import default_dir_mode, default_file_mode
from smile_ray.smile.layer import SmileLinear

LAYOUT_FILE = "smile_layers.json"
WEIGHTS_FILE = "model.safetensors"


def smile_layout(model: nn.Module) -> dict[str, dict]:
    """name → constructor arguments of every SmileLinear in `model`."""
    return {name: {"in_features": m.in_features, "out_features": m.out_features, "num_experts": m.num_experts,
                   "gate_k": m.gate_k, "k": m.k, "top_k": m.top_k, "bias": m.expert_bias is not None}
            for name, m in model.named_modules() if isinstance(m, SmileLinear)}


def apply_layout(model: nn.Module, layout: dict[str, dict]) -> nn.Module:
    """Swap the named nn.Linear layers of `model` for uninitialised SmileLinear layers (in place)."""
    for name, spec in layout.items():
        linear = model.get_submodule(name)
        if not isinstance(linear, nn.Linear) or (linear.out_features, linear.in_features) != (
                spec["out_features"], spec["in_features"]):
            raise SmileError(f"{name}: {LAYOUT_FILE} describes a {spec['out_features']}×{spec['in_features']} "
                             f"linear layer that this architecture does not have")
        spec = {key: value for key, value in spec.items() if key not in ("in_features", "out_features")}
        layer = SmileLinear(linear.in_features, linear.out_features, spec.pop("num_experts"), **spec,
                            device=linear.weight.device, dtype=linear.weight.dtype)
        model.set_submodule(name, layer)
    return model


def save_model(model: nn.Module, directory: str | os.PathLike) -> Path:
    """Write `model` (a transformers PreTrainedModel) to `directory` atomically; returns the directory."""
    directory = Path(directory)
    if not isinstance(model, transformers.PreTrainedModel):
        raise SmileError(f"--save-model: only Hugging Face models can be saved, not {type(model).__name__}")
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}."))
    try:
        layout = smile_layout(model)
        if layout:
            config = copy.deepcopy(model.config)
            config.architectures = [type(model).__name__]
            config.save_pretrained(tmp)
            save_safetensors_model(model, str(tmp / WEIGHTS_FILE))
            (tmp / LAYOUT_FILE).write_text(json.dumps(layout, indent=1))
        else:
            transformers.utils.logging.disable_progress_bar()
            model.save_pretrained(tmp, safe_serialization=True)
        _default_permissions(tmp)
        if directory.exists():
            shutil.rmtree(directory)
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
    """Load a directory written by `save_model` (or any plain save_pretrained directory)."""
    directory = Path(directory)
    layout_path = directory / LAYOUT_FILE
    layout = json.loads(layout_path.read_text()) if layout_path.exists() else {}
    config = transformers.AutoConfig.from_pretrained(directory)
    model_class = getattr(transformers, (config.architectures or [""])[0], None)
    if model_class is None:
        raise SmileError(f"{directory}/config.json: unknown architecture {config.architectures}")
    if not layout:
        return model_class.from_pretrained(directory, dtype=dtype)
    model = apply_layout(model_class(config), layout)
    load_safetensors_model(model, str(directory / WEIGHTS_FILE), strict=True)
    return model.to(dtype) if dtype is not None else model
