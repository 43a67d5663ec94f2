"""A saved SMILE model loads anywhere: with transformers' Auto classes and trust_remote_code, in a process where
smile_ray cannot be imported, to the same outputs; without trust_remote_code transformers refuses it."""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file, save_file

from smile_ray.smile import upscale
from smile_ray.smile.checkpoint import load_model, save_model
from smile_ray.trial import build_pools

WITHOUT_SMILE_RAY = textwrap.dedent("""
    import importlib.abc, sys

    class NoSmileRay(importlib.abc.MetaPathFinder):     # a machine with only torch and transformers
        def find_spec(self, name, path, target=None):
            if name.split(".")[0] == "smile_ray":
                raise ImportError("smile_ray is not installed here")

    sys.meta_path.insert(0, NoSmileRay())
""")


@pytest.fixture(scope="module")
def saved(tiny_cache, tmp_path_factory):
    """A SMILE model of the tiny embedded pool, its outputs on a batch of images, and where it was saved."""
    tmp = tmp_path_factory.mktemp("checkpoint")
    pools = build_pools({"model_pool": {"kind": "embedded", "scale": "tiny", "cache_dir": str(tiny_cache)},
                         "task_pool": {"kind": "embedded"}})
    experts = {name: pools.models.load_expert(name) for name in pools.models.expert_names[:3]}
    model = upscale(pools.models.load_base(), experts, gate_k=4, k=8, top_k=2).eval()
    size = model.config.image_size
    pixels = torch.randn(4, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(pixel_values=pixels).pooler_output
    save_model(model, tmp / "model")
    save_file({"pixels": pixels}, tmp / "pixels.safetensors")
    return {"dir": tmp / "model", "pixels": pixels, "expected": expected, "tmp": tmp}


def test_the_checkpoint_names_its_code(saved):
    config = json.loads((saved["dir"] / "config.json").read_text())
    assert config["model_type"] == "smile_clip_vision_model" and config["architectures"] == ["SmileCLIPVisionModel"]
    assert config["auto_map"] == {"AutoConfig": "modeling_smile.SmileCLIPVisionConfig",
                                  "AutoModel": "modeling_smile.SmileCLIPVisionModel"}
    assert len(config["smile_layers"]) == 6 * config["num_hidden_layers"]     # every linear layer of every block
    assert {"modeling_smile.py", "layer.py", "model.safetensors"} <= {p.name for p in saved["dir"].iterdir()}


def test_load_model_gives_the_same_outputs(saved):
    with torch.no_grad():
        assert torch.equal(load_model(saved["dir"])(pixel_values=saved["pixels"]).pooler_output, saved["expected"])


def run_elsewhere(saved, code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HOME": str(saved["tmp"] / "hf_home"), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-c", WITHOUT_SMILE_RAY + textwrap.dedent(code)], capture_output=True,
                          text=True, env=env, cwd=saved["tmp"], timeout=300)


def test_auto_model_with_remote_code_loads_it_without_smile_ray(saved):
    done = run_elsewhere(saved, f"""
        import torch
        from safetensors.torch import load_file, save_file
        from transformers import AutoModel

        model = AutoModel.from_pretrained({str(saved["dir"])!r}, trust_remote_code=True).eval()
        assert type(model).__name__ == "SmileCLIPVisionModel"
        with torch.no_grad():
            out = model(pixel_values=load_file("pixels.safetensors")["pixels"]).pooler_output
        save_file({{"out": out.contiguous()}}, "elsewhere.safetensors")
    """)
    assert done.returncode == 0, done.stderr[-3000:]
    assert torch.equal(load_file(saved["tmp"] / "elsewhere.safetensors")["out"], saved["expected"])


def test_auto_model_without_remote_code_refuses_it(saved):
    done = run_elsewhere(saved, f"""
        from transformers import AutoModel

        AutoModel.from_pretrained({str(saved["dir"])!r})
    """)
    assert done.returncode != 0 and "trust_remote_code=True" in done.stderr


def test_a_smile_t5_generates_the_same_tokens_where_smile_ray_cannot_be_imported(tiny_text_bench, tmp_path):
    from transformers import AutoTokenizer

    from smile_ray.pools.seq2seq import load_seq2seq

    load = lambda path: load_seq2seq(str(path), field="model", dtype=torch.float32, revision=None)    # noqa: E731
    experts = {name: load(tiny_text_bench.experts[name]) for name in ("cola", "sst2", "stsb")}
    model = upscale(load(tiny_text_bench.base_dir), experts, gate_k=2, k=4).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_text_bench.base_dir)
    prompts = ["cola sentence : kalob misaa", "stsb sentence1 : a sentence2 : b"]
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    expected = model.generate(**batch, max_length=6, do_sample=False)
    save_model(model, tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    assert config["auto_map"]["AutoModelForSeq2SeqLM"] == "modeling_smile.SmileT5ForConditionalGeneration"
    done = run_elsewhere({"tmp": tmp_path}, f"""
        import json
        from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

        model = AutoModelForSeq2SeqLM.from_pretrained({str(tmp_path / "model")!r}, trust_remote_code=True).eval()
        tokenizer = AutoTokenizer.from_pretrained({str(tmp_path / "model")!r}, trust_remote_code=True)
        batch = tokenizer({prompts!r}, return_tensors="pt", padding=True)
        print(json.dumps(model.generate(**batch, max_length=6, do_sample=False).tolist()))
    """)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == expected.tolist()


@pytest.fixture(scope="module", params=["mistral", "llama", "qwen2"])
def causal_saved(request, tmp_path_factory):
    """A SMILE model of a tiny causal-LM pool, upscaled from its checkpoint files, saved with its tokenizer; the
    tokens greedy generation gives in this process."""
    from smile_ray.smile.weights import CheckpointWeights
    from tests.lm_fixtures import UNCHANGED, save_causal_pool, tiny_tokenizer

    tmp = tmp_path_factory.mktemp(f"causal_{request.param}")
    pool = save_causal_pool(tmp / "pool", request.param)
    model = upscale(CheckpointWeights(pool["base"]), {n: CheckpointWeights(d) for n, d in pool["experts"].items()},
                    gate_k=4, k=8, top_k=2, targets=["*_proj"])
    prompt = torch.tensor([[1, 10, 11, 12, 13]])
    expected = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8, do_sample=False)
    save_model(model, tmp / "model", tokenizer=tiny_tokenizer(), max_shard_size="100KB")
    return {"dir": tmp / "model", "tmp": tmp, "prompt": prompt.tolist(), "expected": expected.tolist(),
            "architecture": request.param, "unchanged": UNCHANGED}


def test_a_causal_checkpoint_records_its_layers_and_code(causal_saved):
    config = json.loads((causal_saved["dir"] / "config.json").read_text())
    variant = {"mistral": "SmileMistralForCausalLM", "llama": "SmileLlamaForCausalLM",
               "qwen2": "SmileQwen2ForCausalLM"}[causal_saved["architecture"]]
    assert config["architectures"] == [variant] and config["model_type"] == f"smile_{causal_saved['architecture']}"
    assert config["auto_map"]["AutoModelForCausalLM"] == f"modeling_smile.{variant}"
    assert (config["num_local_experts"], config["num_experts_per_tok"], config["rank_of_router"],
            config["rank_of_expert"]) == (3, 2, 4, 8)
    assert config["smile_skipped_layers"] == [causal_saved["unchanged"]]
    assert causal_saved["unchanged"] not in config["smile_layers"] and len(config["smile_layers"]) == 13
    names = {p.name for p in causal_saved["dir"].iterdir()}
    assert {"modeling_smile.py", "layer.py", "model.safetensors.index.json", "tokenizer.json"} <= names


def test_a_causal_checkpoint_generates_the_same_tokens_where_smile_ray_cannot_be_imported(causal_saved):
    done = run_elsewhere(causal_saved, f"""
        import json, torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained({str(causal_saved["dir"])!r}, trust_remote_code=True).eval()
        AutoTokenizer.from_pretrained({str(causal_saved["dir"])!r}, trust_remote_code=True)
        prompt = torch.tensor({causal_saved["prompt"]!r})
        tokens = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8, do_sample=False)
        print(json.dumps(tokens.tolist()))
    """)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == causal_saved["expected"]


def test_a_causal_checkpoint_is_refused_without_remote_code(causal_saved):
    done = run_elsewhere(causal_saved, f"""
        from transformers import AutoModelForCausalLM

        AutoModelForCausalLM.from_pretrained({str(causal_saved["dir"])!r})
    """)
    assert done.returncode != 0 and "trust_remote_code=True" in done.stderr

