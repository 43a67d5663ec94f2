"""A pool of causal language models read from their checkpoint files (smile_ray.kinds.causal_lm names `load_pool`):
`load_base()` and `load_expert(name)` return CheckpointWeights, which upscale and the baselines read tensor by
tensor; a hub id is first fetched to the Hugging Face cache (config, safetensors and tokenizer files only)."""
from __future__ import annotations

import os

import torch

from smile_ray.hub import load_pretrained
from smile_ray.kinds.causal_lm import CausalLMConfig
from smile_ray.pools import load_tokenizer
from smile_ray.smile.weights import CheckpointWeights

CHECKPOINT_FILES = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.tiktoken", "*.txt"]


class CausalLMPool:
    def __init__(self, config: CausalLMConfig) -> None:
        self.config = config
        self.expert_names = list(config.experts)
        self.torch_dtype = getattr(torch, config.dtype)

    def weights(self, source: str, field: str) -> CheckpointWeights:
        directory = source if os.path.isdir(source) else load_pretrained(
            download, source, field=field, revision=self.config.revision)
        return CheckpointWeights(directory, dtype=self.torch_dtype, field=field)

    def load_base(self) -> CheckpointWeights:
        return self.weights(self.config.base, "model_pool.base")

    def load_expert(self, name: str) -> CheckpointWeights:
        return self.weights(self.config.experts[name], f"model_pool.experts.{name}")

    def load_tokenizer(self):
        return load_tokenizer(self.config)


def download(repo_id: str, *, revision: str | None = None, local_files_only: bool = False) -> str:
    """A hub model's checkpoint files in the local cache (fetched unless `local_files_only`); its directory."""
    from huggingface_hub import snapshot_download

    return snapshot_download(repo_id, revision=revision, allow_patterns=CHECKPOINT_FILES,
                             local_files_only=local_files_only)


def load_pool(config: CausalLMConfig) -> CausalLMPool:
    return CausalLMPool(config)
