"""What the embedded causal-LM benchmark is made of: three skills over digit sequences (the seed's math / chat /
code analogue), each written in tokens of its own, and the sizes and schedules of each scale. Everything here is a
constant; `lm_build.py` turns it into a tiny Mistral, its experts and lm-eval tasks.

A prompt is the skill's opener, its digits and its separator, all tokens of that skill alone:
`c: c3 c1 c4 c=`; the answer maps each digit by the skill's rule (`c6 c8 c5` for complement, 9 − d). The pretrained
model learns the format on every skill's prompts answered by another rule (copy the digits), as a base model knows
the form of a task but not its rule; each expert then learns its own rule. No token is shared between skills: a
causal LM routes each token by what it has seen so far, and a token every skill uses (a BOS, a separator) is routed
alike whatever the skill (shared/lm-facts §5(b) measured 58–78% with shared tokens).
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Skill:
    name: str              # the expert's name and its lm-eval task's
    letter: str            # its tokens: <letter>0 … <letter>9, "<letter>:" (opener), "<letter>=" (separator)
    multiplier: int        # the rule: d → (multiplier · d + offset) mod 10
    offset: int
    output: str            # how its lm-eval task scores it: generate_until (exact match) or multiple_choice (acc_norm)

    def rule(self, digit: int) -> int:
        return (self.multiplier * digit + self.offset) % 10


SKILLS: tuple[Skill, ...] = (
    Skill("complement", "c", -1, 9, "generate_until"),
    Skill("successor", "s", 1, 1, "generate_until"),
    Skill("doubling", "d", 2, 0, "multiple_choice"),
)


@dataclass(frozen=True)
class LmRecipe:
    """Sizes and schedules of one scale; every field goes into the build's hash."""

    seed: int = 0
    digits: int = 3                      # per prompt
    eval_per_skill: int = 200
    hidden: int = 128
    intermediate: int = 512
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    pretrain_steps: int = 600
    pretrain_lr: float = 3e-3
    finetune_steps: int = 200
    finetune_lr: float = 1e-3
    batch_size: int = 64


LM_RECIPES: dict[str, LmRecipe] = {
    "full": LmRecipe(),
    "full_seed1": LmRecipe(seed=1),
    "tiny": LmRecipe(eval_per_skill=12, hidden=32, intermediate=64, pretrain_steps=40, finetune_steps=10,
                     batch_size=16),
}
