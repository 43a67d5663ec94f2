"""One split of a dataset, from a local `save_to_disk` directory or a hub id, failing in one line naming the task."""
from __future__ import annotations

import os

import datasets

from smile_ray.errors import SmileError
from smile_ray.hub import is_hub_id, probe_repo, short_reason


def load_split(source: str, *, split: str, config: str | None = None, where: str) -> datasets.Dataset:
    """`split` of `source`: a directory written by `save_to_disk` (a `DatasetDict`, from which `split` is taken, or
    a `Dataset`, used as is) or a hub id loaded with `datasets.load_dataset(source, config, split=split)`. Errors
    start with `where` (e.g. "task mnli: dataset 'glue'")."""
    if os.path.isdir(source):
        try:
            loaded = datasets.load_from_disk(source)
        except Exception as exc:  # a loader boundary: report every failure in one line
            raise SmileError(f"{where}: cannot load ({short_reason(exc)})") from exc
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise SmileError(f"{where}: no split {split!r} (splits: {', '.join(loaded)})")
            loaded = loaded[split]
        return loaded
    if not is_hub_id(source):
        raise SmileError(f"{where}: no such directory")
    state, reason = probe_repo(source, repo_type="dataset")
    if state == "missing":
        raise SmileError(f"{where}: {reason}")
    if state == "unreachable":
        raise SmileError(f"{where}: {reason}; set HF_HUB_OFFLINE=1 to load it from the local cache")
    named = f" (config {config!r})" if config else ""
    try:
        return datasets.load_dataset(source, config, split=split)
    except Exception as exc:  # a loader boundary: unknown split/config, missing from the offline cache, ...
        offline = state == "offline" and isinstance(exc, ConnectionError)
        why = f"{reason}; not in the local Hugging Face cache" if offline else short_reason(exc)
        raise SmileError(f"{where}{named}: cannot load split {split!r} ({why})") from exc
