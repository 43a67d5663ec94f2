"""Build the embedded text benchmark: a tiny T5 pretrained on eight GLUE-shaped tasks' prompts, a fully fine-tuned
expert and a LoRA expert per task (text_recipe.py says what the tasks are).

Layout of a build (the formats a Flan-T5 GLUE pool loads):

    <cache>/text-<scale>-<hash>/base/           T5ForConditionalGeneration + its tokenizer (save_pretrained)
    <cache>/text-<scale>-<hash>/experts/<task>/ the fully fine-tuned T5 (every linear weight trained)
    <cache>/text-<scale>-<hash>/lora/<task>/    a PEFT LoRA adapter (adapter_config.json, adapter_model.safetensors)
    <cache>/text-<scale>-<hash>/data/<task>/    DatasetDict(train, validation or validation_matched), GLUE columns
    <cache>/text-<scale>-<hash>/recipe.json     what was built, and how long it took

Prompts and label texts are the GLUE task pool's own (`smile_ray.tasks.glue`), so training sees exactly what
evaluation feeds the model. Built on one torch thread, deterministically; cached like the CLIP benchmark.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import multiprocessing
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
import torch
import transformers
from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors
from torch import nn
from transformers import PreTrainedTokenizerFast, T5Config, T5ForConditionalGeneration

from smile_ray.cluster import usable_cpus
from smile_ray.embedded.cache import build_environment, cached_build, default_cache_dir
from smile_ray.embedded.text_recipe import (TASKS, TEXT_RECIPES, WORDS_PER_TASK, TextRecipe, TextTask, task_words,
                                           template)
from smile_ray.errors import SmileError
from smile_ray.tasks.glue import input_text, prompts, target_text

PAD, EOS, UNK = "<pad>", "</s>", "<unk>"           # ids 0, 1, 2, as T5's


@dataclass
class TextBenchmark:
    """A finished build: the pretrained T5, each task's full and LoRA expert, and each task's data."""

    root: Path
    base_dir: Path
    experts: dict[str, Path]             # task → fully fine-tuned model directory
    lora: dict[str, Path]                # task → PEFT adapter directory
    data: dict[str, Path]                # task → save_to_disk directory


def eval_split(task: str) -> str:
    return "validation_matched" if task == "mnli" else "validation"


def recipe_for(scale: str) -> TextRecipe:
    if scale not in TEXT_RECIPES:
        raise SmileError(f"scale: unknown embedded text benchmark scale {scale!r}; choose one of {sorted(TEXT_RECIPES)}")
    return TEXT_RECIPES[scale]


def recipe_hash(scale: str) -> str:
    """Hex digest over the scale's recipe, the tasks, the prompts, library versions and the builder's source."""
    here = Path(__file__).parent
    blob = json.dumps({"scale": scale, "recipe": dataclasses.asdict(recipe_for(scale)),
                       "tasks": [dataclasses.asdict(t) for t in TASKS], "templates": [template(t) for t in TASKS],
                       "answers": {name: entry["target_text"] for name, entry in prompts().items()},
                       "versions": [torch.__version__, transformers.__version__, datasets.__version__]},
                      sort_keys=True).encode()
    digest = hashlib.sha256(blob)
    for name in ("text_recipe.py", "text_build.py"):
        digest.update((here / name).read_bytes())
    return digest.hexdigest()


def text_benchmark_dir(cache_dir: str | Path | None = None, scale: str = "full") -> Path:
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return cache.expanduser() / f"text-{scale}-{recipe_hash(scale)[:16]}"


def build_text_benchmark(cache_dir: str | Path | None = None, *, scale: str = "full",
                         force: bool = False) -> TextBenchmark:
    """The text benchmark of `scale`, built first unless a finished build is cached (or `force`)."""
    root = text_benchmark_dir(cache_dir, scale)
    return describe(cached_build(root, lambda out: _build_into(out, scale, final=root), force=force))


def describe(root: Path) -> TextBenchmark:
    return TextBenchmark(root=root, base_dir=root / "base",
                         experts={t.name: root / "experts" / t.name for t in TASKS},
                         lora={t.name: root / "lora" / t.name for t in TASKS},
                         data={t.name: root / "data" / t.name for t in TASKS})


# ---------------------------------------------------------------------------------------------------------------
# Data: sentences of a task's own words, labelled by its rule

def _attribute(task: TextTask, word_index: int) -> int:
    return word_index % (3 if task.rule == "majority3" else 2)


def _sample_sentence_ids(task: TextTask, rng: np.random.Generator) -> list[list[int]]:
    """Word indices per column; a trigger task shows its trigger word (word 0) in half the examples."""
    present = task.rule == "trigger" and rng.random() < 0.5
    lowest = 1 if task.rule == "trigger" and not present else 0
    columns = [[int(w) for w in rng.integers(lowest, WORDS_PER_TASK, size=length)] for length in task.lengths]
    if present and not any(0 in column for column in columns):
        column = columns[int(rng.integers(0, len(columns)))]
        column[int(rng.integers(0, len(column)))] = 0
    return columns


def _label(task: TextTask, columns: list[list[int]]) -> float | int | None:
    """The task's rule over the words' attributes (None: a majority3 tie, to be resampled)."""
    words = [w for column in columns for w in column]
    ones = sum(_attribute(task, w) == 1 for w in words)
    if task.rule == "score":
        return round(5.0 * ones / len(words), 1)
    if task.rule == "majority3":
        counts = np.bincount([_attribute(task, w) for w in words], minlength=3)
        return int(np.argmax(counts)) if (counts == counts.max()).sum() == 1 else None
    true = {"majority": ones * 2 > len(words), "trigger": 0 in words, "count": ones >= task.threshold}[task.rule]
    return task.yes_label if true else 1 - task.yes_label


def _pretraining_label(task: TextTask, columns: list[list[int]]) -> float | int:
    """What the pretrained model learns instead: the first word's attribute, in the task's label encoding."""
    first = _attribute(task, columns[0][0])
    return 5.0 * first if task.rule == "score" else first


def _rows(task: TextTask, index: int, count: int, seed: int) -> list[dict]:
    rng = np.random.default_rng([seed, index, count])
    words = task_words(index)
    rows = []
    while len(rows) < count:
        columns = _sample_sentence_ids(task, rng)
        label = _label(task, columns)
        if label is None:
            continue
        row = {name: " ".join(words[w] for w in column) for name, column in zip(task.columns, columns)}
        rows.append({**row, "label": label, "pretrain_label": _pretraining_label(task, columns), "idx": len(rows)})
    return rows


def _task_dataset(task: TextTask, index: int, recipe: TextRecipe) -> datasets.DatasetDict:
    splits = {"train": _rows(task, index, recipe.train_per_task, recipe.seed),
              eval_split(task.name): _rows(task, index, recipe.eval_per_task, recipe.seed + 1)}
    label = (datasets.Value("float32") if task.rule == "score"
             else datasets.ClassLabel(names=[target_text(task.name, c) for c in range(task.classes)]))
    features = datasets.Features({**{c: datasets.Value("string") for c in task.columns}, "label": label,
                                  "idx": datasets.Value("int32")})
    return datasets.DatasetDict({split: datasets.Dataset.from_list(
        [{k: v for k, v in row.items() if k != "pretrain_label"} for row in rows], features=features)
        for split, rows in splits.items()})


# ---------------------------------------------------------------------------------------------------------------
# The tokenizer and the model

def _pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    """Words, and each punctuation mark on its own; a decimal like "3.8" stays one token (STS-B's answers)."""
    return pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                    pre_tokenizers.Split(Regex(r"\d\.\d|[^\w\s]"), behavior="isolated")])


def _make_tokenizer(texts: list[str]) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over every prompt and answer of the benchmark; T5's special ids (pad 0, eos 1)."""
    splitter = _pre_tokenizer()
    vocab = {PAD: 0, EOS: 1, UNK: 2}
    for text in texts:
        for piece, _ in splitter.pre_tokenize_str(text):
            vocab.setdefault(piece, len(vocab))
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    tokenizer.pre_tokenizer = splitter
    tokenizer.post_processor = processors.TemplateProcessing(single=f"$A {EOS}", special_tokens=[(EOS, 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token=PAD, eos_token=EOS, unk_token=UNK,
                                   model_max_length=128)


def _make_t5(recipe: TextRecipe, vocab_size: int) -> T5ForConditionalGeneration:
    config = T5Config(vocab_size=vocab_size, d_model=recipe.d_model, d_kv=recipe.d_kv, d_ff=recipe.d_ff,
                      num_layers=recipe.layers, num_decoder_layers=recipe.layers, num_heads=recipe.heads,
                      relative_attention_num_buckets=recipe.relative_buckets, dropout_rate=0.0,
                      feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    return T5ForConditionalGeneration(config)


# ---------------------------------------------------------------------------------------------------------------
# Training

@dataclass
class Examples:
    """Tokenized prompts and answers of one task (or a mixture), drawn in batches."""

    inputs: list[list[int]]
    targets: list[list[int]]

    def batch(self, rng: np.random.Generator, size: int) -> dict[str, torch.Tensor]:
        pick = rng.integers(0, len(self.inputs), size=size)
        return {"input_ids": _pad([self.inputs[i] for i in pick], 0),
                "attention_mask": _pad([[1] * len(self.inputs[i]) for i in pick], 0),
                "labels": _pad([self.targets[i] for i in pick], -100)}


def _pad(rows: list[list[int]], value: int) -> torch.Tensor:
    width = max(len(row) for row in rows)
    return torch.tensor([row + [value] * (width - len(row)) for row in rows])


def _examples(tokenizer, task: TextTask, rows, label_key: str = "label") -> Examples:
    texts = [input_text(task.name, row, template(task)) for row in rows]
    answers = [target_text(task.name, row[label_key]) for row in rows]
    return Examples(tokenizer(texts)["input_ids"], tokenizer(answers)["input_ids"])


def _train(model: nn.Module, examples: Examples, *, steps: int, lr: float, batch_size: int, seed: int,
           decay: bool = False) -> None:
    """AdamW on the parameters that require grad; one batch of `batch_size` examples per step; the learning rate
    constant, or (`decay`) falling linearly to 0."""
    rng = np.random.default_rng(seed)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / steps if decay else 1.0)
    model.train()
    for _ in range(steps):
        loss = model(**examples.batch(rng, batch_size)).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    model.eval()


def _train_experts(job: tuple[str, int, str, str]) -> None:
    """Task `index`'s fully fine-tuned expert and LoRA expert, from the base saved under `out`. Seeded by the task
    alone and on one thread, so a build is the same whether its experts train in one process or several."""
    from peft import EvaConfig, LoraConfig, get_peft_model, initialize_lora_eva_weights

    scale, index, out, final = job
    recipe, task, out = recipe_for(scale), TASKS[index], Path(out)
    seed = recipe.seed * 1000 + index + 1
    with build_environment(seed), warnings.catch_warnings():
        warnings.simplefilter("ignore")     # peft: EVA without low_cpu_mem_usage; the base's config not yet at `final`
        tokenizer = transformers.AutoTokenizer.from_pretrained(out / "base")
        base = T5ForConditionalGeneration.from_pretrained(out / "base")
        examples = _examples(tokenizer, task, _rows(task, index, recipe.train_per_task, recipe.seed))

        expert = copy.deepcopy(base)
        _linear_weights_only(expert)
        _train(expert, examples, steps=recipe.finetune_steps, lr=recipe.finetune_lr,
               batch_size=recipe.finetune_batch_size, seed=seed)
        expert.save_pretrained(out / "experts" / task.name)

        # LoRA's A starts from the principal directions of each layer's inputs on the task (peft's EVA), not at
        # random: SMILE routes by the row space of B·A, which a random A keeps long after B has learnt the task.
        # The decoder's self-attention is left out: its inputs are answer tokens every task shares (the start token
        # first), so no router can tell the tasks apart there and a wrongly routed update only does harm
        lora = get_peft_model(base, LoraConfig(
            r=recipe.lora_rank, lora_alpha=recipe.lora_rank, target_modules=list(recipe.lora_targets),
            exclude_modules=recipe.lora_exclude,
            lora_dropout=0.0, bias="none", task_type="SEQ_2_SEQ_LM", init_lora_weights="eva",
            eva_config=EvaConfig(rho=1.0)))
        rng = np.random.default_rng([seed, 1])
        initialize_lora_eva_weights(lora, [examples.batch(rng, recipe.batch_size) for _ in range(recipe.eva_batches)],
                                    prepare_model_inputs_fn=None, prepare_layer_inputs_fn=_token_rows,
                                    show_progress_bar=False)
        _train(lora, examples, steps=recipe.lora_steps, lr=recipe.lora_lr, batch_size=recipe.finetune_batch_size,
               seed=seed + 100, decay=True)
        lora.peft_config["default"].base_model_name_or_path = str(Path(final) / "base")
        lora.save_pretrained(out / "lora" / task.name)


def _token_rows(layer_input, model_input, layer_name: str) -> torch.Tensor:
    """EVA's view of a layer's input: every token's vector (padding included), one row each."""
    hidden = layer_input[0] if isinstance(layer_input, (tuple, list)) else layer_input
    return hidden.reshape(-1, hidden.shape[-1])


def _linear_weights_only(model: nn.Module) -> None:
    """Experts train the 2-D weights of linear layers; embeddings (and the lm_head tied to them), norms and the
    relative position bias stay pretrained, so an expert differs from the base only where SMILE can upscale."""
    for param in model.parameters():
        param.requires_grad_(False)
    shared = model.get_input_embeddings().weight
    for module in model.modules():
        if isinstance(module, nn.Linear) and module.weight is not shared:
            module.weight.requires_grad_(True)


def _build_into(out: Path, scale: str, *, final: Path) -> None:
    """Write a complete build of `scale` into the (new) directory `out` (it will be renamed to `final`)."""
    recipe = recipe_for(scale)
    started = time.perf_counter()
    with build_environment(recipe.seed):
        data = {task.name: _task_dataset(task, i, recipe) for i, task in enumerate(TASKS)}
        for name, dataset in data.items():
            dataset.save_to_disk(str(out / "data" / name))
        texts = [text for task in TASKS for split in data[task.name].values() for row in split
                 for text in (input_text(task.name, row, template(task)), target_text(task.name, row["label"]))]
        texts += [target_text("stsb", score / 10) for score in range(51)] + [
            text for task in TASKS if task.rule != "score" for text in prompts()[task.name]["target_text"].values()]
        base_dir = out / "base"
        _make_tokenizer(texts).save_pretrained(base_dir)
        tokenizer = transformers.AutoTokenizer.from_pretrained(base_dir)   # what a consumer loads back

        train = {task.name: _rows(task, i, recipe.train_per_task, recipe.seed) for i, task in enumerate(TASKS)}
        mixture = [_examples(tokenizer, task, train[task.name], "pretrain_label") for task in TASKS]
        model = _make_t5(recipe, len(tokenizer))
        _train(model, Examples([x for m in mixture for x in m.inputs], [y for m in mixture for y in m.targets]),
               steps=recipe.pretrain_steps, lr=recipe.pretrain_lr, batch_size=recipe.batch_size, seed=recipe.seed)
        model.save_pretrained(base_dir)

    jobs = [(scale, i, str(out), str(final)) for i in range(len(TASKS))]
    processes = min(recipe.build_processes, usable_cpus())
    if processes > 1:        # fresh interpreters (spawn): a fork would copy the caller's threads and locks
        try:
            with ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("spawn")) as pool:
                list(pool.map(_train_experts, jobs))
        except BrokenProcessPool as error:     # a process died: killed, or it ran the caller's unguarded script
            raise SmileError("the embedded text benchmark's build processes stopped (killed, or with the error "
                             "printed above); a script that builds it needs its code under `if __name__ == "
                             "'__main__':` (they are spawned and import it)") from error
    else:
        for job in jobs:
            _train_experts(job)

    (out / "recipe.json").write_text(json.dumps({
        "scale": scale, "hash": recipe_hash(scale), "recipe": dataclasses.asdict(recipe),
        "tasks": [dataclasses.asdict(t) for t in TASKS], "vocab_size": len(tokenizer),
        "build_seconds": round(time.perf_counter() - started, 1)}, indent=2))
