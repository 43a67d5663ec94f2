"""Where a configuration's models and datasets are, checked before anything loads or starts.

`smile_ray.run` and a sweep's driver call `check_sources` first, so both refuse the same inputs with the same
line: a missing directory, one that `save_pretrained` / `save_to_disk` did not write, a hub id that cannot be
fetched, a model of another architecture (config.json's `model_type`), a truncated or corrupt safetensors file,
or an expert whose weights do not have the base model's shapes. Only config.json and the safetensors headers are
read: no weights are loaded.
"""
from __future__ import annotations

import json
import os
import struct
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from smile_ray.errors import SmileError

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_FILE = "model.safetensors"
PICKLE_FILES = ("pytorch_model.bin", "pytorch_model.bin.index.json")
ADAPTER_SAFETENSORS, ADAPTER_PICKLE = "adapter_model.safetensors", "adapter_model.bin"     # a PEFT adapter's weights
MAX_HEADER_BYTES = 100 << 20          # safetensors' own limit on the JSON header

Shapes = dict[str, tuple[str, list[int]]]      # weight name → (dtype, shape), from a safetensors header


@dataclass(frozen=True)
class Source:
    """One model or dataset a configuration names, and what it must be."""

    field: str                                   # how errors name it, e.g. "model_pool.experts.mnist"
    location: str                                # a hub id or a local directory
    repo_type: str = "model"                     # "model" or "dataset"
    revision: str | None = None
    model_types: tuple[str, ...] = ()            # accepted config.json model_type values (empty: the base's)
    role: str = ""                               # "base", "expert" (the base's architecture and shapes), "tokenizer"
    adapter: bool = False                        # an expert may be a PEFT adapter directory for the base
    allow_pickle: bool | None = False            # a pickle-only checkpoint: refused (False), loaded (True: the user
                                                 # trusts it), or refused by a kind that reads safetensors only (None)

    @property
    def local_kind(self) -> str:
        """What a local directory of this source must be (hub.LOCAL_MARKERS)."""
        if self.role == "tokenizer" or self.repo_type == "dataset":
            return "tokenizer" if self.role == "tokenizer" else "dataset"
        return "model or adapter" if self.adapter else "model"


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a safetensors file: its dtype, shape and byte range in the file."""

    dtype: str
    shape: list[int]
    start: int
    end: int


def safetensors_entries(path: Path) -> dict[str, TensorEntry]:
    """name → TensorEntry from a safetensors file's header, after checking that the file holds every byte the
    header describes (a truncated copy fails here, not halfway through a load)."""
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise SmileError(f"{path}: not a safetensors file ({size} bytes)")
            (header_size,) = struct.unpack("<Q", prefix)
            if header_size > min(MAX_HEADER_BYTES, size - 8):
                raise SmileError(f"{path}: not a safetensors file, or truncated (its header claims {header_size:,} "
                                 f"bytes of {size:,})")
            header = json.loads(f.read(header_size))
    except OSError as error:
        raise SmileError(f"{path}: cannot read ({error.strerror or error})") from None
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise SmileError(f"{path}: not a safetensors file (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise SmileError(f"{path}: not a safetensors file (its header is not a mapping)")
    entries, end, data_start = {}, 0, 8 + header_size
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, stop = (int(offset) for offset in entry["data_offsets"])
            entries[name] = TensorEntry(entry["dtype"], [int(n) for n in entry["shape"]], data_start + begin,
                                        data_start + stop)
            end = max(end, stop)
        except (TypeError, KeyError, IndexError, ValueError):
            raise SmileError(f"{path}: not a safetensors file (bad header entry {name!r})") from None
    if data_start + end > size:
        raise SmileError(f"{path}: truncated ({size:,} bytes; its header describes {data_start + end:,})")
    return entries


def safetensors_shapes(path: Path) -> Shapes:
    """name → (dtype, shape) from a safetensors file's header (checked as in `safetensors_entries`)."""
    return {name: (entry.dtype, entry.shape) for name, entry in safetensors_entries(path).items()}


def weight_files(directory: Path) -> list[Path]:
    """The safetensors files of a save_pretrained directory (one file, or the shards its index names); [] for a
    pickle-only checkpoint (pytorch_model.bin), which transformers loads on its own terms; a SmileError for a
    directory without weights."""
    index = directory / SAFETENSORS_INDEX
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            raise SmileError(f"{index}: not a safetensors index (no weight_map)") from None
        missing = [shard for shard in shards if not (directory / shard).is_file()]
        if missing:
            raise SmileError(f"{index}: names {missing[0]}, which is not in {directory}")
        return [directory / shard for shard in shards]
    if (directory / SAFETENSORS_FILE).is_file():
        return [directory / SAFETENSORS_FILE]
    if any((directory / name).is_file() for name in PICKLE_FILES):
        return []
    raise SmileError(f"{directory}: no weights ({SAFETENSORS_FILE}, {SAFETENSORS_INDEX} or {PICKLE_FILES[0]})")


def model_type(directory: Path) -> str | None:
    """config.json's model_type."""
    path = directory / "config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError):
        raise SmileError(f"{path}: not a JSON config") from None
    return config.get("model_type") if isinstance(config, dict) else None


def pickle_refused(path: Path | str, allow_pickle: bool | None) -> SmileError:
    """The refusal of a pickle checkpoint (`Source.allow_pickle` False: the pool may allow it; None: it may not)."""
    advice = ("save it as safetensors (save_pretrained), or set model_pool.allow_pickle: true if you trust its author"
              if allow_pickle is False else "save it as safetensors (save_pretrained): this pool reads safetensors only")
    return SmileError(f"{path} is a pickle checkpoint, which can run code when it loads: {advice}")


def check_local_model(source: Source, base_type: str | None = None) -> tuple[str | None, Shapes]:
    """A local save_pretrained directory of an accepted architecture (`source.model_types`, else `base_type`) whose
    safetensors are whole, and not a pickle-only checkpoint unless the user allowed those; returns its model_type
    and the shapes of its weights (none for an allowed pickle checkpoint)."""
    directory = Path(source.location)
    accepted = source.model_types or ((base_type,) if base_type else ())
    try:
        kind = model_type(directory)
        if accepted and kind not in accepted:
            raise SmileError(f"{source.location!r} holds a {kind or 'model without a model_type'} model, not "
                             f"{' or '.join(accepted)}{' like the base model' if not source.model_types else ''}")
        shapes: dict[str, tuple[str, list[int]]] = {}
        files = weight_files(directory)
        if not files and not source.allow_pickle:
            pickled = next(directory / name for name in PICKLE_FILES if (directory / name).is_file())
            raise pickle_refused(pickled, source.allow_pickle)
        for path in files:
            shapes.update(safetensors_shapes(path))
    except SmileError as error:
        raise SmileError(f"{source.field}: {error}") from None
    return kind, shapes


def same_model(name: str, location: str) -> bool:
    """Whether an adapter's `base_model_name_or_path` names the pool's base: the same hub id or path, or a local copy
    under the same last name (`/data/flan-t5-base` for `google/flan-t5-base`)."""
    name, location = name.rstrip("/"), location.rstrip("/")
    return (name == location or Path(name).name == Path(location).name
            or (os.path.exists(name) and os.path.exists(location) and os.path.samefile(name, location)))


def check_adapter(source: Source, base: Source | None, base_shapes: Shapes | None) -> None:
    """A PEFT adapter directory made for the base model: its `base_model_name_or_path` names the base, and every
    layer it targets exists in the base with the input and output sizes of its low-rank factors."""
    directory = Path(source.location)
    try:
        config = json.loads((directory / "adapter_config.json").read_text())
    except (OSError, ValueError):
        raise SmileError(f"{source.field}: {directory / 'adapter_config.json'} is not JSON") from None
    named = config.get("base_model_name_or_path") if isinstance(config, dict) else None
    if base is not None and named and not same_model(str(named), base.location):
        raise SmileError(f"{source.field}: the adapter in {source.location!r} was made for {named!r}, not the pool's "
                         f"base {base.location!r}")
    weights = directory / ADAPTER_SAFETENSORS
    if not weights.is_file() and (directory / ADAPTER_PICKLE).is_file() and not source.allow_pickle:
        raise SmileError(f"{source.field}: {pickle_refused(directory / ADAPTER_PICKLE, source.allow_pickle)}")
    if not weights.is_file() or not base_shapes:
        return
    try:
        shapes = safetensors_shapes(weights)
    except SmileError as error:
        raise SmileError(f"{source.field}: {error}") from None
    for key, (_, shape) in shapes.items():
        for factor, axis in ((".lora_A.", 1), (".lora_B.", 0)):          # A: (r, in), B: (out, r)
            if factor not in key:
                continue
            layer = key.removeprefix("base_model.model.").split(factor)[0]
            target = base_shapes.get(f"{layer}.weight")
            if target is None:
                raise SmileError(f"{source.field}: the adapter targets {layer}, which the base model does not have")
            if len(shape) != 2 or len(target[1]) != 2 or shape[axis] != target[1][axis]:
                raise SmileError(f"{source.field}: the adapter's {key} has shape {shape}, which does not fit "
                                 f"{layer} of the base model, shape {target[1]}")


def common_names(base: Mapping[str, object], expert: Mapping[str, object]) -> dict[str, str]:
    """expert weight name → the base's name for the same weight. One side's names may carry a prefix the other's
    lack (a full CLIPModel names `vision_model.embeddings…` what a CLIPVisionModel names `embeddings…`): the
    prefix under which most names agree is used."""
    votes: Counter[tuple[str, str]] = Counter()         # (prefix added to expert names, prefix removed from them)
    for name in expert:
        for key in base:
            if key == name:
                votes["", ""] += 1
            elif key.endswith("." + name):
                votes[key[:-len(name)], ""] += 1
            elif name.endswith("." + key):
                votes["", name[:-len(key)]] += 1
    if not votes:
        return {}
    (added, removed), _ = votes.most_common(1)[0]
    names = {name: added + name[len(removed):] for name in expert if name.startswith(removed)}
    return {name: key for name, key in names.items() if key in base}


FLOAT_DTYPES = ("F64", "F32", "BF16", "F16", "F8_E4M3", "F8_E5M2")


def shape_mismatch(base: dict[str, tuple[str, list[int]]], expert: dict[str, tuple[str, list[int]]]) -> str | None:
    """The first weight both hold with different shapes or floating-point dtypes, described; or that they share no
    weight name at all. (An expert stored in another dtype than the base would carry that dtype's rounding error,
    about 1e-3 of every weight in F16, into its task vector: often as large as the fine-tuning's change.)"""
    shared = common_names(base, expert)
    if base and expert and not shared:
        return "none of its weight names is in the base model (another architecture)"
    for name, key in shared.items():
        if base[key][1] != expert[name][1]:
            return f"{name} has shape {expert[name][1]}, the base model {base[key][1]}"
    for name, key in shared.items():
        ours, theirs = expert[name][0], base[key][0]
        if ours != theirs and ours in FLOAT_DTYPES and theirs in FLOAT_DTYPES:
            return (f"{name} is stored as {ours}, the base model's as {theirs} (its task vector would carry {ours}'s "
                    f"rounding error); save the expert in the base's dtype")
    return None


def check_sources(sources: Sequence[Source]) -> None:
    """Every source is a local directory of its kind or fetchable from the Hub, every expert has the base's
    architecture and shapes (an adapter: was made for the base and fits it), every tokenizer directory holds one:
    one SmileError naming the first that is not, and which others are not either (every local one is checked; the
    Hub is asked until its first refusal, since an unreachable Hub would make each further question wait for its
    timeout)."""
    from smile_ray.hub import check_source, is_hub_id

    problems: list[SmileError] = []
    fields: list[str] = []
    base: Source | None = None
    base_type: str | None = None
    base_shapes: Shapes | None = None
    for source in sources:
        try:
            check_source(source.location, field=source.field, repo_type=source.repo_type, revision=source.revision,
                         local_kind=source.local_kind)
            local = os.path.isdir(source.location)
            if not local or source.repo_type != "model" or source.role == "tokenizer":
                continue
            if source.adapter and (Path(source.location) / "adapter_config.json").is_file():
                check_adapter(source, base, base_shapes)
                continue
            kind, shapes = check_local_model(source, base_type if source.role == "expert" else None)
            if source.role == "base":
                base, base_type, base_shapes = source, kind, shapes
            elif source.role == "expert" and base_shapes is not None:
                mismatch = shape_mismatch(base_shapes, shapes)
                if mismatch:
                    raise SmileError(f"{source.field}: {source.location!r} does not fit the base model: {mismatch}")
        except SmileError as error:
            problems.append(error)
            fields.append(source.field)
            if is_hub_id(source.location) and not os.path.isdir(source.location):
                break
    if problems:
        more = fields[1:]
        raise SmileError(str(problems[0]) + (f" (also: {', '.join(more)})" if more else ""))


def check_pools(models, tasks) -> None:
    """What `smile_ray.run` and a sweep's driver check before anything loads: every model and dataset the pools name
    (`check_sources`), then each pool kind's own checks."""
    check_sources(models.sources() + tasks.sources())
    models.check()
    tasks.check()
