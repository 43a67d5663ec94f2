"""What the embedded benchmark is made of: its eight tasks and the sizes and schedules of each scale.

Everything here is a constant; `build.py` turns it into models and datasets. Each task pairs an input domain
(a transform of sklearn's 8×8 digits, drawn on a background colour of its own that every patch sees) with a
label set of its own (digit, digit-as-word, parity, …), like the paper's eight CLIP tasks differ in both.
"""
from __future__ import annotations

from dataclasses import dataclass

RGB = tuple[int, int, int]


@dataclass(frozen=True)
class TaskSpec:
    """One task: how its images are drawn and how its labels are named."""

    name: str
    transform: str  # key of `build.TRANSFORMS`: how the 16×16 stroke intensity map is changed
    background: RGB  # colour where the stroke intensity is 0
    foreground: RGB  # colour where the stroke intensity is 1
    classnames: tuple[str, ...]
    label_of_digit: tuple[int, ...]  # label_of_digit[d] = class index of digit d (10 entries)
    templates: tuple[str, ...]  # each contains "{c}"


DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

TASKS: tuple[TaskSpec, ...] = (
    TaskSpec("digit", "identity", (0, 0, 110), (255, 255, 255),
             tuple(str(d) for d in range(10)), tuple(range(10)),
             ('a photo of the number: "{c}".',)),
    TaskSpec("word", "blur", (0, 90, 0), (255, 255, 255),
             DIGIT_WORDS, tuple(range(10)),
             ("a photo of the number {c}.", "a drawing of the number {c}.")),
    TaskSpec("parity", "hflip", (120, 0, 0), (255, 255, 255),
             ("even", "odd"), tuple(d % 2 for d in range(10)),
             ("a photo of an {c} number.", "a photo of a number that is {c}.")),
    TaskSpec("magnitude", "noise", (90, 0, 90), (255, 255, 255),
             ("small", "large"), tuple(int(d >= 5) for d in range(10)),
             ("a photo of a {c} number.",)),
    TaskSpec("remainder", "corner", (0, 100, 100), (255, 255, 255),
             ("remainder 0", "remainder 1", "remainder 2"), tuple(d % 3 for d in range(10)),
             ("a photo of a number with {c} after division by 3.",)),
    TaskSpec("prime", "rot90", (130, 80, 0), (255, 255, 255),
             ("prime", "not prime"), tuple(0 if d in (2, 3, 5, 7) else 1 for d in range(10)),
             ("a photo of a {c} number.", "a photo of a number that is {c}.")),
    TaskSpec("range", "transpose", (150, 150, 0), (255, 255, 255),
             ("low", "middle", "high"), tuple(0 if d <= 2 else 1 if d <= 6 else 2 for d in range(10)),
             ("a photo of a {c} digit.",)),
    TaskSpec("roman", "invert", (255, 225, 140), (0, 0, 60),
             ("nulla", "I", "II", "III", "IV", "V", "VI", "VII", "VIII", "IX"), tuple(range(10)),
             ("a photo of the roman numeral {c}.",)),
)

# Pretraining images are the untransformed digits, white strokes on black.
PRETRAIN_BACKGROUND: RGB = (0, 0, 0)
PRETRAIN_FOREGROUND: RGB = (255, 255, 255)


@dataclass(frozen=True)
class Recipe:
    """Sizes and schedules of one scale; every field goes into the build's hash."""

    seed: int = 0
    test_fraction: float = 0.3  # stratified split of the 1797 digits, shared by all tasks
    train_per_class: int | None = None  # subsample (per digit) for quick builds; None keeps all
    test_per_class: int | None = None
    image_size: int = 16  # 8×8 digits are upsampled bilinearly to this
    patch_size: int = 4
    noise_std: float = 0.25  # "noise" transform: Gaussian noise on the stroke intensity
    blur_sigma: float = 1.0  # "blur" transform: Gaussian blur, in pixels of the 16×16 image
    pixel_mean: float = 0.5  # the image processor's normalisation, same for R, G, B
    pixel_std: float = 0.5
    vision_hidden: int = 128
    vision_mlp: int = 256
    vision_layers: int = 3
    vision_heads: int = 4
    text_hidden: int = 64
    text_mlp: int = 128
    text_layers: int = 2
    text_heads: int = 2
    projection_dim: int = 64
    max_text_len: int = 32
    pretrain_epochs: int = 10
    pretrain_lr: float = 5e-4  # AdamW
    pretrain_weight_decay: float = 0.01
    finetune_epochs: int = 8
    finetune_lr: float = 0.02  # SGD with momentum, vision-tower nn.Linear layers only
    finetune_momentum: float = 0.9
    batch_size: int = 64


RECIPES: dict[str, Recipe] = {
    "full": Recipe(),
    "tiny": Recipe(train_per_class=12, test_per_class=6, vision_hidden=32, vision_mlp=64, vision_layers=1,
                   vision_heads=2, text_hidden=32, text_mlp=64, text_layers=1, projection_dim=16,
                   pretrain_epochs=1, finetune_epochs=1),
}
