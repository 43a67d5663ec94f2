"""Build the embedded causal-LM benchmark: a tiny Mistral pretrained on every skill's prompts, one expert per skill,
and an lm-eval task per skill (lm_recipe.py says what the skills are).

Layout of a build (the formats a causal_lm pool and lm-eval load):

    <cache>/lm-<scale>-<hash>/base/             MistralForCausalLM + its tokenizer (save_pretrained, safetensors)
    <cache>/lm-<scale>-<hash>/experts/<skill>/  the expert (the decoder blocks' linear weights trained) + tokenizer
    <cache>/lm-<scale>-<hash>/tasks/            <skill>.yaml and <skill>.jsonl: lm-eval tasks, data paths absolute
    <cache>/lm-<scale>-<hash>/recipe.json       what was built, and how long it took

    lm_eval --model hf --model_args pretrained=<cache>/…/base --tasks complement --include_path <cache>/…/tasks

Built on one torch thread, deterministically; cached like the other embedded benchmarks.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import transformers
import yaml
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import MistralConfig, MistralForCausalLM, PreTrainedTokenizerFast

from smile_ray.embedded.cache import build_environment, cached_build, default_cache_dir
from smile_ray.embedded.lm_recipe import LM_RECIPES, SKILLS, LmRecipe, Skill
from smile_ray.errors import SmileError

PAD, EOS, UNK = "<pad>", "</s>", "<unk>"


@dataclass
class LmBenchmark:
    root: Path
    base_dir: Path
    experts: dict[str, Path]             # skill → expert directory
    tasks_dir: Path                      # lm-eval task YAMLs (one task per skill, named as the skill)


def recipe_for(scale: str) -> LmRecipe:
    if scale not in LM_RECIPES:
        raise SmileError(f"scale: unknown embedded LM benchmark scale {scale!r}; choose one of {sorted(LM_RECIPES)}")
    return LM_RECIPES[scale]


def lm_benchmark_dir(cache_dir: str | Path | None = None, scale: str = "full") -> Path:
    """Named by a digest of the recipe, the skills, library versions and this builder's source."""
    blob = json.dumps({"scale": scale, "recipe": dataclasses.asdict(recipe_for(scale)),
                       "skills": [dataclasses.asdict(s) for s in SKILLS],
                       "versions": [torch.__version__, transformers.__version__]}, sort_keys=True).encode()
    digest = hashlib.sha256(blob)
    for name in ("lm_recipe.py", "lm_build.py"):
        digest.update((Path(__file__).parent / name).read_bytes())
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return cache.expanduser() / f"lm-{scale}-{digest.hexdigest()[:16]}"


def build_lm_benchmark(cache_dir: str | Path | None = None, *, scale: str = "full", force: bool = False
                       ) -> LmBenchmark:
    """The causal-LM benchmark of `scale`, built first unless a finished build is cached (or `force`)."""
    root = lm_benchmark_dir(cache_dir, scale)
    root = cached_build(root, lambda out: _build_into(out, scale, final=root), force=force)
    return LmBenchmark(root=root, base_dir=root / "base", experts={s.name: root / "experts" / s.name for s in SKILLS},
                       tasks_dir=root / "tasks")


# ---------------------------------------------------------------------------------------------------------------
# Data

def prompt_and_answer(skill: Skill, digits: list[int], rule: Skill | None = None) -> tuple[str, str]:
    """`c: c3 c1 c4 c=` and its answer: by the skill's own rule, by another skill's `rule`, or (rule False) the
    digits copied, as the pretrained model learns to answer."""
    words = [f"{skill.letter}{d}" for d in digits]
    answer = [f"{skill.letter}{(rule or skill).rule(d)}" for d in digits] if rule is not False else words
    return " ".join([f"{skill.letter}:", *words, f"{skill.letter}="]), " ".join(answer)


def _draw(rng: np.random.Generator, recipe: LmRecipe) -> list[int]:
    return [int(d) for d in rng.integers(0, 10, recipe.digits)]


def _task_rows(skill: Skill, recipe: LmRecipe) -> list[dict]:
    """The skill's evaluation rows, from a stream of its own (never the training stream's)."""
    rng = np.random.default_rng([recipe.seed, 7, SKILLS.index(skill)])
    rows = []
    for _ in range(recipe.eval_per_skill):
        digits = _draw(rng, recipe)
        prompt, answer = prompt_and_answer(skill, digits)
        row = {"prompt": prompt, "answer": answer}
        if skill.output == "multiple_choice":      # the answer, the copy the base gives, another skill's rule
            other = SKILLS[(SKILLS.index(skill) + 1) % len(SKILLS)]
            choices = [answer, prompt_and_answer(skill, digits, False)[1], prompt_and_answer(skill, digits, other)[1]]
            order = [int(i) for i in rng.permutation(3)]
            row = {"prompt": prompt, "choices": [choices[i] for i in order], "label": order.index(0)}
        rows.append(row)
    return rows


def lm_eval_task(name: str, data: Path, output_type: str) -> dict:
    """An lm-eval task over a JSON-lines file (absolute path: lm-eval reads relative ones from the working
    directory) of {"prompt", "answer"} rows (generate_until, exact match) or {"prompt", "choices", "label"} rows
    (multiple_choice, acc and acc_norm)."""
    task = {"task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data)}},
            "test_split": "test", "output_type": output_type, "doc_to_text": "{{prompt}}", "metadata": {"version": 1.0}}
    if output_type == "multiple_choice":
        return {**task, "doc_to_choice": "{{choices}}", "doc_to_target": "{{label}}",
                "metric_list": [{"metric": metric, "aggregation": "mean", "higher_is_better": True}
                                for metric in ("acc", "acc_norm")]}
    return {**task, "doc_to_target": "{{answer}}",
            "generation_kwargs": {"until": [EOS], "do_sample": False, "max_gen_toks": 8},
            "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}]}


def _tokenizer() -> PreTrainedTokenizerFast:
    vocab = {PAD: 0, EOS: 1, UNK: 2}
    for skill in SKILLS:
        for word in [f"{skill.letter}:", *(f"{skill.letter}{d}" for d in range(10)), f"{skill.letter}="]:
            vocab[word] = len(vocab)
    backend = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token=PAD, eos_token=EOS, unk_token=UNK,
                                   model_max_length=64)


# ---------------------------------------------------------------------------------------------------------------
# Training

def _batch(tokenizer, skills: list[Skill], rng: np.random.Generator, recipe: LmRecipe, pretrain: bool):
    """`batch_size` prompts with their answers and EOS; the loss on the answer and EOS only."""
    ids, labels = [], []
    for skill in (skills[i] for i in rng.integers(0, len(skills), recipe.batch_size)):
        prompt, answer = prompt_and_answer(skill, _draw(rng, recipe), False if pretrain else None)
        p, a = tokenizer(prompt)["input_ids"], tokenizer(answer)["input_ids"] + [tokenizer.eos_token_id]
        ids.append(p + a)
        labels.append([-100] * len(p) + a)
    width = max(map(len, ids))
    mask = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in ids])
    return (torch.tensor([row + [0] * (width - len(row)) for row in ids]), mask,
            torch.tensor([row + [-100] * (width - len(row)) for row in labels]))


def _train(model, tokenizer, skills: list[Skill], recipe: LmRecipe, *, steps: int, lr: float, seed: int,
           pretrain: bool) -> None:
    rng = np.random.default_rng(seed)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    model.train()
    for _ in range(steps):
        ids, mask, labels = _batch(tokenizer, skills, rng, recipe, pretrain)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()


def _build_into(out: Path, scale: str, *, final: Path) -> None:
    recipe = recipe_for(scale)
    started = time.perf_counter()
    with build_environment(recipe.seed):
        tokenizer = _tokenizer()
        config = MistralConfig(vocab_size=len(tokenizer), hidden_size=recipe.hidden,
                               intermediate_size=recipe.intermediate, num_hidden_layers=recipe.layers,
                               num_attention_heads=recipe.heads, num_key_value_heads=recipe.kv_heads,
                               max_position_embeddings=64, tie_word_embeddings=False, pad_token_id=0,
                               eos_token_id=1, bos_token_id=None)
        model = MistralForCausalLM(config)
        _train(model, tokenizer, list(SKILLS), recipe, steps=recipe.pretrain_steps, lr=recipe.pretrain_lr,
               seed=recipe.seed, pretrain=True)
        model.save_pretrained(out / "base")
        tokenizer.save_pretrained(out / "base")
        for i, skill in enumerate(SKILLS):
            expert = copy.deepcopy(model)
            for name, param in expert.named_parameters():        # the decoder blocks' linear weights only
                param.requires_grad_(name.endswith("_proj.weight"))
            _train(expert, tokenizer, [skill], recipe, steps=recipe.finetune_steps, lr=recipe.finetune_lr,
                   seed=recipe.seed * 1000 + i + 1, pretrain=False)
            expert.save_pretrained(out / "experts" / skill.name)
            tokenizer.save_pretrained(out / "experts" / skill.name)
            tasks = out / "tasks"
            tasks.mkdir(parents=True, exist_ok=True)
            (tasks / f"{skill.name}.jsonl").write_text(
                "".join(json.dumps(row) + "\n" for row in _task_rows(skill, recipe)))
            task = lm_eval_task(skill.name, final / "tasks" / f"{skill.name}.jsonl", skill.output)
            (tasks / f"{skill.name}.yaml").write_text(yaml.safe_dump(task, sort_keys=False))
    (out / "recipe.json").write_text(json.dumps({
        "scale": scale, "recipe": dataclasses.asdict(recipe), "skills": [dataclasses.asdict(s) for s in SKILLS],
        "build_seconds": round(time.perf_counter() - started, 1)}, indent=2))
