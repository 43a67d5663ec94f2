"""Model pools: a pretrained model and named fine-tuned experts, from hub ids or local directories."""
from __future__ import annotations

from typing import Any

from smile_ray.hub import load_pretrained
from smile_ray.kinds.transformers_pool import TransformersPoolConfig


def load_tokenizer(config: TransformersPoolConfig) -> Any:
    """A language-model pool's tokenizer: its `tokenizer` source, else the base's."""
    from transformers import AutoTokenizer

    return load_pretrained(AutoTokenizer.from_pretrained, config.tokenizer or config.base,
                           field="model_pool.tokenizer" if config.tokenizer else "model_pool.base",
                           revision=config.revision)
