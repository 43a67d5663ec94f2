"""A pool of encoder-decoder models: the pretrained base and named experts, fully fine-tuned or PEFT adapters merged
into the base on load (smile_ray.kinds.seq2seq names `load_pool`)."""
from __future__ import annotations

import os

import torch

from smile_ray.errors import SmileError
from smile_ray.hub import hub_has_file, load_pretrained
from smile_ray.kinds.seq2seq import Seq2SeqConfig
from smile_ray.pools import load_tokenizer
from smile_ray.sources import ADAPTER_PICKLE, ADAPTER_SAFETENSORS, pickle_refused
from smile_ray.smile.weights import check_finite_weights


class Seq2SeqPool:
    """`AutoModelForSeq2SeqLM`s from hub ids or directories; an expert that is a PEFT adapter is loaded on a fresh
    copy of the base and merged (`merge_and_unload`), as FusionBench's LoRA pools do."""

    def __init__(self, config: Seq2SeqConfig) -> None:
        self.config = config
        self.expert_names = list(config.experts)
        self.torch_dtype = getattr(torch, config.dtype)

    @property
    def base(self) -> str:
        return self.config.base

    @property
    def revision(self) -> str | None:
        return self.config.revision

    def load_base(self) -> torch.nn.Module:
        return load_seq2seq(self.config.base, field="model_pool.base", dtype=self.torch_dtype,
                            revision=self.config.revision, allow_pickle=self.config.allow_pickle)

    def _has_file(self, name: str, filename: str) -> bool:
        """Whether expert `name` (a directory or a hub id) holds `filename` (a hub that cannot be asked: no)."""
        source = self.config.experts[name]
        if os.path.isdir(source):
            return os.path.isfile(os.path.join(source, filename))
        return hub_has_file(source, filename, revision=self.config.revision)

    def is_adapter(self, name: str) -> bool:
        return self._has_file(name, "adapter_config.json")

    def adapter_is_pickle_only(self, name: str) -> bool:
        """Whether the adapter's weights are adapter_model.bin alone, which peft would unpickle (safetensors asked
        first: once downloaded, the answer comes from the local cache)."""
        return not self._has_file(name, ADAPTER_SAFETENSORS) and self._has_file(name, ADAPTER_PICKLE)

    def load_expert(self, name: str) -> torch.nn.Module:
        if name not in self.config.experts:
            raise SmileError(f"model_pool.experts: no expert {name!r} (have: {', '.join(self.expert_names)})")
        field, source = f"model_pool.experts.{name}", self.config.experts[name]
        if not self.is_adapter(name):
            return load_seq2seq(source, field=field, dtype=self.torch_dtype, revision=self.config.revision,
                                allow_pickle=self.config.allow_pickle)
        from peft import PeftModel

        if not self.config.allow_pickle and self.adapter_is_pickle_only(name):
            raise SmileError(f"{field}: {pickle_refused(f'{source}/{ADAPTER_PICKLE}', False)}")

        def merged(adapter: str, **hub_kwargs) -> torch.nn.Module:
            base = load_seq2seq(self.config.base, field="model_pool.base", dtype=torch.float32,
                                revision=self.config.revision, allow_pickle=self.config.allow_pickle)
            model = PeftModel.from_pretrained(base, adapter, **hub_kwargs).merge_and_unload()
            return model.to(self.torch_dtype).eval()

        return check_finite_weights(load_pretrained(merged, source, field=field, revision=self.config.revision),
                                    f"{field}: {source!r}")

    def load_tokenizer(self):
        return load_tokenizer(self.config)


def load_seq2seq(source: str, *, field: str, dtype: torch.dtype, revision: str | None,
                 allow_pickle: bool = False) -> torch.nn.Module:
    """An `AutoModelForSeq2SeqLM` from a hub id or a directory, in eval mode, its weights finite; one-line SmileError
    naming `field`. Safetensors only, unless `allow_pickle`."""
    from transformers import AutoModelForSeq2SeqLM

    def load(source: str, **kwargs) -> torch.nn.Module:
        return AutoModelForSeq2SeqLM.from_pretrained(source, use_safetensors=None if allow_pickle else True,
                                                     **kwargs).eval()

    return check_finite_weights(load_pretrained(load, source, field=field, revision=revision, dtype=dtype),
                                f"{field}: {source!r}")


def load_pool(config: Seq2SeqConfig) -> Seq2SeqPool:
    return Seq2SeqPool(config)
