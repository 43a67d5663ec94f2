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
MAX_HEADER_BYTES = 100 << 20          # safetensors' own limit on the JSON header


@dataclass(frozen=True)
class Source:
    """One model or dataset a configuration names, and what it must be."""

    field: str                                   # how errors name it, e.g. "model_pool.experts.mnist"
    location: str                                # a hub id or a local directory
    repo_type: str = "model"                     # "model" or "dataset"
    revision: str | None = None
    model_types: tuple[str, ...] = ()            # accepted config.json model_type values (models; empty: any)
    role: str = ""                               # "base" or "expert": experts must have the base's shapes


def safetensors_shapes(path: Path) -> dict[str, tuple[str, list[int]]]:
    """name → (dtype, shape) from a safetensors file's header, after checking that the file holds every byte the
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
    shapes, end = {}, 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            shapes[name] = (entry["dtype"], list(entry["shape"]))
            end = max(end, int(entry["data_offsets"][1]))
        except (TypeError, KeyError, IndexError, ValueError):
            raise SmileError(f"{path}: not a safetensors file (bad header entry {name!r})") from None
    if 8 + header_size + end > size:
        raise SmileError(f"{path}: truncated ({size:,} bytes; its header describes {8 + header_size + end:,})")
    return shapes


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


def check_local_model(source: Source) -> dict[str, tuple[str, list[int]]]:
    """A local save_pretrained directory of an accepted architecture whose safetensors are whole; returns the
    shapes of its weights (empty for a pickle-only checkpoint)."""
    directory = Path(source.location)
    try:
        kind = model_type(directory)
        if source.model_types and kind not in source.model_types:
            raise SmileError(f"{source.location!r} holds a {kind or 'model without a model_type'} model, not "
                             f"{' or '.join(source.model_types)}")
        shapes: dict[str, tuple[str, list[int]]] = {}
        for path in weight_files(directory):
            shapes.update(safetensors_shapes(path))
    except SmileError as error:
        raise SmileError(f"{source.field}: {error}") from None
    return shapes


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


def shape_mismatch(base: dict[str, tuple[str, list[int]]], expert: dict[str, tuple[str, list[int]]]) -> str | None:
    """The first weight both hold with different shapes, described; or that they share no weight name at all."""
    shared = common_names(base, expert)
    if base and expert and not shared:
        return "none of its weight names is in the base model (another architecture)"
    for name, key in shared.items():
        if base[key][1] != expert[name][1]:
            return f"{name} has shape {expert[name][1]}, the base model {base[key][1]}"
    return None


def check_sources(sources: Sequence[Source]) -> None:
    """Every source is a local directory of its kind or fetchable from the Hub, and every expert has the base's
    shapes: one SmileError naming the first that is not, and which others are not either (every local one is
    checked; the Hub is asked until its first refusal, since an unreachable Hub would make each further question
    wait for its timeout)."""
    from smile_ray.hub import check_source, is_hub_id

    problems: list[SmileError] = []
    fields: list[str] = []
    base_shapes: dict[str, tuple[str, list[int]]] | None = None
    for source in sources:
        try:
            check_source(source.location, field=source.field, repo_type=source.repo_type, revision=source.revision)
            if source.repo_type == "model" and os.path.isdir(source.location):
                shapes = check_local_model(source)
                if source.role == "base":
                    base_shapes = shapes
                elif source.role == "expert" and base_shapes is not None:
                    mismatch = shape_mismatch(base_shapes, shapes)
                    if mismatch:
                        raise SmileError(f"{source.field}: {source.location!r} does not fit the base model: "
                                         f"{mismatch}")
        except SmileError as error:
            problems.append(error)
            fields.append(source.field)
            if is_hub_id(source.location) and not os.path.isdir(source.location):
                break
    if problems:
        more = fields[1:]
        raise SmileError(str(problems[0]) + (f" (also: {', '.join(more)})" if more else ""))
