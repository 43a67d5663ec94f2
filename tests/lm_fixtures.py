"""Tiny causal LMs saved the way the hub holds them (config.json, sharded safetensors, a tokenizer): a random base and
experts that differ from it in some linear layers, for the causal-LM pool, streamed upscaling and checkpoints."""
from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, MistralConfig, PreTrainedTokenizerFast, Qwen2Config

ARCHITECTURES = {"mistral": MistralConfig, "llama": LlamaConfig, "qwen2": Qwen2Config}
UNCHANGED = "model.layers.1.mlp.down_proj"          # no expert changes this layer: it must stay a plain Linear


def tiny_tokenizer(vocab_size: int = 96) -> PreTrainedTokenizerFast:
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3, **{f"w{i}": i + 4 for i in range(vocab_size - 4)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>")


def tiny_config(architecture: str = "mistral", **overrides):
    settings = dict(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False, bos_token_id=1,
                    eos_token_id=2, pad_token_id=3)
    return ARCHITECTURES[architecture](**{**settings, **overrides})


def save_causal_pool(root: Path, architecture: str = "mistral", experts: int = 3, seed: int = 0,
                     shard: str = "40KB", **overrides) -> dict:
    """base/ and expert0/ … under root, each sharded; returns {"base": dir, "experts": {name: dir}}."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_config(tiny_config(architecture, **overrides)).eval()
    tokenizer = tiny_tokenizer(base.config.vocab_size)
    pool = {"base": root / "base", "experts": {}}
    base.save_pretrained(pool["base"], max_shard_size=shard)
    tokenizer.save_pretrained(pool["base"])
    for i in range(experts):
        expert = AutoModelForCausalLM.from_config(base.config).eval()
        expert.load_state_dict(base.state_dict())
        generator = torch.Generator().manual_seed(seed * 100 + i)
        with torch.no_grad():
            for name, module in expert.named_modules():
                if isinstance(module, torch.nn.Linear) and name != UNCHANGED and name != "lm_head":
                    module.weight.add_(0.05 * torch.randn(module.weight.shape, generator=generator))
        directory = root / f"expert{i}"
        expert.save_pretrained(directory, max_shard_size=shard)
        tokenizer.save_pretrained(directory)
        pool["experts"][f"expert{i}"] = directory
    return pool


def save_lm_eval_tasks(directory: Path, rows: int = 8) -> Path:
    """Two lm-eval tasks over the tiny vocabulary in `directory`, written as the embedded LM benchmark writes its
    own: tiny_gen (generate_until, exact_match) and tiny_mc (multiple_choice, acc and acc_norm)."""
    import json

    import yaml

    from smile_ray.embedded.lm_build import lm_eval_task

    directory.mkdir(parents=True, exist_ok=True)
    gen = [{"prompt": f"w{i} w{i + 1}", "answer": f"w{i + 2}"} for i in range(4, 4 + rows)]
    mc = [{"prompt": f"w{i} w{i + 1}", "choices": [f"w{i + 2}", f"w{i + 3}", f"w{i + 4}"], "label": 0}
          for i in range(4, 4 + rows)]
    for name, data, output_type in (("tiny_gen", gen, "generate_until"), ("tiny_mc", mc, "multiple_choice")):
        (directory / f"{name}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in data))
        task = lm_eval_task(name, directory / f"{name}.jsonl", output_type)
        (directory / f"{name}.yaml").write_text(yaml.safe_dump(task, sort_keys=False))
    return directory
