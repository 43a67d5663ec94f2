"""What the embedded text benchmark is made of: eight synthetic tasks shaped like GLUE and the sizes and schedules of
each scale. Everything here is a constant; `text_build.py` turns it into a tiny T5, its experts and datasets.

Each task has the columns and label encoding of its GLUE namesake (so the GLUE task pool and its Flan-T5 templates
read it unchanged) and a vocabulary of its own: twelve made-up words, each carrying a hidden attribute. A task's
label is a bag-of-words rule over those attributes (a majority, a trigger word, a count, and for stsb a score
from 0 to 5). The pretrained model learns the answer format on every task's prompts labelled by another rule (the
first word's attribute), like Flan-T5 answers GLUE prompts zero-shot without knowing the tasks' rules; each expert
then learns its own task's rule.
"""
from __future__ import annotations

from dataclasses import dataclass

SYLLABLES = ("ka", "lo", "mi", "ne", "pu", "ro", "sa", "te", "vi", "zo", "bu", "fe")


@dataclass(frozen=True)
class TextTask:
    """One task: its GLUE name and columns, its label rule, and how long its sentences are."""

    name: str
    columns: tuple[str, ...]             # the GLUE columns its template reads, in order
    lengths: tuple[int, ...]             # words per column
    rule: str                            # majority | trigger | count | majority3 | score
    classes: int                         # labels 0 … classes-1 (stsb: a score in [0, 5])
    yes_label: int = 1                   # the label a true rule gives (qnli and rte encode "yes" as 0)
    threshold: int = 0                   # count: how many attribute-1 words make the rule true


TASKS: tuple[TextTask, ...] = (
    TextTask("cola", ("sentence",), (5,), "majority", 2),
    TextTask("mnli", ("premise", "hypothesis"), (4, 3), "majority3", 3),
    TextTask("mrpc", ("sentence1", "sentence2"), (4, 4), "count", 2, threshold=5),
    TextTask("qnli", ("question", "sentence"), (3, 4), "trigger", 2, yes_label=0),
    TextTask("qqp", ("question1", "question2"), (3, 4), "majority", 2),
    TextTask("rte", ("sentence1", "sentence2"), (3, 4), "count", 2, yes_label=0, threshold=4),
    TextTask("sst2", ("sentence",), (5,), "trigger", 2),
    TextTask("stsb", ("sentence1", "sentence2"), (4, 4), "score", 0),
)
WORDS_PER_TASK = 12


def template(task: TextTask) -> str:
    """The benchmark's prompt: the task's name, then each column after its name ("rte sentence1 : … sentence2 : …").
    Short prompts of task-specific words, unlike Flan-T5's long English templates: a tiny model's experts change
    little on words all tasks share, so routing by the task vectors needs the task's own words to dominate."""
    return " ".join([task.name, *(f"{column} : {{{column}}}" for column in task.columns)])


def task_words(index: int) -> list[str]:
    """The task's twelve words: two syllables from a task-specific rotation and a task letter (made-up, distinct)."""
    letter = "abcdefgh"[index]
    return [f"{SYLLABLES[(i + index) % 12]}{SYLLABLES[(5 * i + 3 * index + 1) % 12]}{letter}"
            for i in range(WORDS_PER_TASK)]


@dataclass(frozen=True)
class TextRecipe:
    """Sizes and schedules of one scale; every field goes into the build's hash."""

    seed: int = 0
    train_per_task: int = 2000
    eval_per_task: int = 300
    d_model: int = 64
    d_kv: int = 16
    d_ff: int = 256
    layers: int = 2                      # encoder and decoder each
    heads: int = 4
    relative_buckets: int = 16
    pretrain_steps: int = 800
    pretrain_lr: float = 3e-3
    batch_size: int = 64                 # pretraining
    finetune_steps: int = 200
    finetune_lr: float = 1e-3
    lora_rank: int = 16
    lora_targets: tuple[str, ...] = ("q", "k", "v", "o", "wi_0", "wi_1", "wo")    # every linear layer but lm_head …
    lora_exclude: str = r".*decoder\.block\.\d+\.layer\.0\.SelfAttention\.[qkvo]"   # … and decoder self-attention
    lora_steps: int = 200
    lora_lr: float = 1e-3                # decaying linearly to 0
    eva_batches: int = 20                # batches of `batch_size` whose layer inputs initialise A (peft's EVA)
    finetune_batch_size: int = 32        # experts, full and LoRA
    build_processes: int = 2             # the experts train in this many processes (each one thread, seeded per task)


TEXT_RECIPES: dict[str, TextRecipe] = {
    "full": TextRecipe(),
    "full_seed1": TextRecipe(seed=1),    # the same recipe on another seed: how much of a result is the draw
    "tiny": TextRecipe(train_per_task=128, eval_per_task=24, d_model=32, d_kv=8, d_ff=64, layers=1, heads=2,
                       relative_buckets=8, pretrain_steps=60, finetune_steps=12, lora_rank=4, lora_steps=12,
                       eva_batches=2, batch_size=16, finetune_batch_size=16, build_processes=1),
}
