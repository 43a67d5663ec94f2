"""Where upscale and the merges read a model's weights: a model in memory, or a checkpoint directory read one tensor
at a time, so that no expert is ever a whole model in memory.

    base = CheckpointWeights("/models/mistral-7b", dtype=torch.float16)      # reads config.json and the headers
    base.shapes()                  # parameter name → shape, from the safetensors headers
    base.linear("model.layers.0.self_attn.q_proj")      # an nn.Linear read from disk
    model = base.instantiate(without=[...])             # every other weight loaded; the named layers left to fill

`ModuleWeights` gives an nn.Module the same interface, so upscale and the baselines have one code path for both.
Either way the linear layers SMILE may upscale are the model's nn.Linear layers except its output embeddings (a
language model's lm_head), which, like the input embeddings and the norms, stay the base's.
"""
from __future__ import annotations

import copy
import ctypes
import math
from collections.abc import Collection
from functools import cache, cached_property
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from smile_ray.errors import SmileError

SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}


class ModelWeights(Protocol):
    """A model's weights by parameter name, however they are stored."""

    lazy: bool                      # modules are read afresh on each call (they may go straight into a new model)

    def shapes(self) -> dict[str, tuple[int, ...]]: ...

    def tensor(self, name: str) -> torch.Tensor: ...

    def linear_names(self) -> list[str]: ...

    def linear(self, name: str) -> nn.Module: ...

    def instantiate(self, without: Collection[str] = ()) -> nn.Module: ...

    def parameter_count(self) -> int: ...


class ModuleWeights:
    """An nn.Module's own weights (never modified: `instantiate` returns a deep copy)."""

    lazy = False

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.params = dict(module.named_parameters())

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: tuple(p.shape) for name, p in self.params.items()}

    def tensor(self, name: str) -> torch.Tensor:
        return self.params[name].detach()

    def linear_names(self) -> list[str]:
        return linear_layers(self.module)

    def linear(self, name: str) -> nn.Module:
        return self.module.get_submodule(name)

    def instantiate(self, without: Collection[str] = ()) -> nn.Module:
        return copy.deepcopy(self.module)

    def parameter_count(self) -> int:
        return sum(p.numel() for p in self.params.values())


class CheckpointWeights:
    """A `save_pretrained` directory (config.json and safetensors, one file or shards) read tensor by tensor with
    plain file reads (no memory map, so pages read once do not stay resident), cast to `dtype`.

    The model is built from config.json by `model_class` (default: the AutoModelForCausalLM class of its config)
    on the meta device; `instantiate` fills it from the files."""

    lazy = True

    def __init__(self, directory: str | Path, *, dtype: torch.dtype = torch.float32, model_class: type | None = None,
                 field: str | None = None) -> None:
        from transformers import AutoConfig

        from smile_ray.sources import safetensors_entries, weight_files

        self.directory, self.dtype = Path(directory), dtype
        self.field = field or str(directory)
        self.config = AutoConfig.from_pretrained(self.directory)
        files = weight_files(self.directory)
        if not files:
            raise SmileError(f"{self.field}: {self.directory} holds only a pickle checkpoint (pytorch_model.bin); "
                             "streamed upscaling reads safetensors")
        self.entries = {name: (path, entry) for path in files for name, entry in safetensors_entries(path).items()}
        self.model_class = model_class or causal_lm_class(self.config)
        self._read: set[str] = set()

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: tuple(entry.shape) for name, (_, entry) in self.entries.items()}

    def tensor(self, name: str) -> torch.Tensor:
        if name not in self.entries:
            raise SmileError(f"{self.field}: no weight {name!r} in {self.directory}")
        path, entry = self.entries[name]
        data = bytearray(entry.end - entry.start)
        with open(path, "rb") as f:
            f.seek(entry.start)
            if f.readinto(data) != len(data):
                raise SmileError(f"{path}: truncated while reading {name!r}")
        dtype = SAFETENSORS_DTYPES.get(entry.dtype)
        if dtype is None:
            raise SmileError(f"{path}: {name!r} has dtype {entry.dtype}, which smile_ray does not read")
        tensor = (torch.frombuffer(data, dtype=dtype) if data else torch.empty(0, dtype=dtype)).reshape(entry.shape)
        if not is_finite(tensor):
            raise SmileError(f"{self.field}: {path}: weight {name} holds NaN or inf")
        self._read.add(name)
        return tensor.to(self.dtype) if tensor.is_floating_point() else tensor

    def check_unread(self) -> None:
        """Read every weight not read yet, one at a time, and let it go: each is checked as it is read (NaN, inf,
        a short file), so a damaged checkpoint is refused before a trial would read it."""
        for name in self.entries:
            if name not in self._read:
                self.tensor(name)

    def skeleton(self) -> nn.Module:
        """The architecture with every parameter on the meta device (buffers real, as the model computes them)."""
        from accelerate import init_empty_weights

        with init_empty_weights(include_buffers=False):
            return self.model_class._from_config(copy.deepcopy(self.config), dtype=self.dtype).eval()

    @cached_property
    def _layout(self) -> tuple[list[str], int]:
        """(linear layer names, parameter count), read once from a skeleton."""
        skeleton = self.skeleton()
        return linear_layers(skeleton), sum(p.numel() for p in skeleton.parameters())

    def linear_names(self) -> list[str]:
        return list(self._layout[0])

    def linear(self, name: str) -> nn.Linear:
        weight = self.tensor(f"{name}.weight")
        bias = self.tensor(f"{name}.bias") if f"{name}.bias" in self.entries else None
        layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
        layer.weight = nn.Parameter(weight, requires_grad=False)
        if bias is not None:
            layer.bias = nn.Parameter(bias, requires_grad=False)
        return layer

    def instantiate(self, without: Collection[str] = ()) -> nn.Module:
        """The model with every weight read from the files, except the modules named in `without`, which stay on
        the meta device for the caller to replace. Tied weights (an lm_head tied to the embeddings) are tied again."""
        model = self.skeleton()
        skipped = tuple(f"{name}." for name in without)
        for name, param in list(model.named_parameters(remove_duplicate=False)):
            if name.startswith(skipped) or name not in self.entries:
                continue
            owner, _, attr = name.rpartition(".")
            setattr(model.get_submodule(owner), attr, nn.Parameter(self.tensor(name), requires_grad=False))
        model.tie_weights()
        missing = [name for name, p in model.named_parameters() if p.is_meta and not name.startswith(skipped)]
        if missing:
            raise SmileError(f"{self.field}: no weight {missing[0]!r} in {self.directory} "
                             f"({len(missing)} of the model's weights missing)")
        return model

    def parameter_count(self) -> int:
        return self._layout[1]


def value_range(tensor: torch.Tensor) -> tuple[float, float]:
    """(min, max) of a tensor in one pass without temporaries (NaN when it holds a NaN); (0, 0) when empty."""
    if tensor.numel() == 0:
        return 0.0, 0.0
    low, high = torch.aminmax(tensor.detach())
    return low.item(), high.item()


def is_finite(tensor: torch.Tensor) -> bool:
    """No NaN or inf in a floating-point tensor (both show in its extremes); other tensors are finite."""
    return not tensor.is_floating_point() or all(map(math.isfinite, value_range(tensor)))


def check_finite_weights(model: nn.Module, where: str) -> nn.Module:
    """`model`, once every weight and buffer is checked for NaN and inf (a damaged or diverged checkpoint): else a
    SmileError naming `where` and the first such weight."""
    for name, tensor in model.state_dict().items():
        if not is_finite(tensor):
            raise SmileError(f"{where}: weight {name} holds NaN or inf")
    return model


def linear_layers(model: nn.Module) -> list[str]:
    """Names of the nn.Linear layers of `model` that are not its output embeddings."""
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return [name for name, m in model.named_modules() if isinstance(m, nn.Linear) and m is not output]


def causal_lm_class(config) -> type:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    try:
        return MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    except KeyError:
        raise SmileError(f"{config.model_type}: not a causal language model architecture") from None


def return_freed_memory() -> None:
    """Give memory freed since the last call back to the operating system (glibc's `malloc_trim`; elsewhere a no-op).
    glibc keeps freed blocks up to 32 MiB in its heaps for reuse; a streamed upscale frees one layer's temporaries
    (an expert's copy, a float32 task vector, the SVD's workspace) per layer, and without this its resident memory
    grows by their fragments layer after layer (bench/stream_memory.py measures the peak)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@cache
def _malloc_trim():
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def as_weights(model: nn.Module | ModelWeights) -> ModelWeights:
    return ModuleWeights(model) if isinstance(model, nn.Module) else model
