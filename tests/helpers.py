"""Builders shared by the tests: images, prompts, a tiny policy from a path, a toy reward.

(Tolerances and comparisons live in numerics.py; kernel-test bounds in kernel_helpers.py; the
session-wide tiny models are conftest fixtures; the transformers-free toy policy is
examples/toy_policy.py, which the readers' example and the rollout tests share.)
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from grpo_core.policy import Prompt

# The GRPO-variant example configs (examples/configs/synthetic_<name>.yaml, prompt "nothink").
VARIANT_CONFIGS = ("gspo", "cispo", "sapo", "two_sided_clip", "dapo", "dapo_overlong_filter", "high_entropy", "rloo",
                   "ref_sync")


def img(w: int, h: int, seed: int = 0, mode: str = "RGB") -> Image.Image:
    """A random w×h image (seeded)."""
    arr = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    im = Image.fromarray(arr)
    return im.convert(mode) if mode != "RGB" else im


def ragged_prompts() -> list[Prompt]:
    """1, 2, 0 and 1 images of different sizes (4, 12 + 4, 0, 9 image tokens on the tiny Qwen2-VL)
    and different text lengths → ragged left padding; one prompt with a system turn."""
    return [
        Prompt("What is shown? A. CT B. MRI", [img(56, 56, 1)]),
        Prompt("Where is the lesion located?", [img(84, 112, 2), img(56, 56, 3)], system="You are a radiologist."),
        Prompt("No image in this one, and a somewhat longer question text.", []),
        Prompt("Which organ?", [img(90, 70, 4)]),
    ]


def tiny_policy(path: str, dtype=torch.float32, **kw):
    """A fresh Qwen2VLPolicy (CPU) from a tiny checkpoint folder: safe to train in place."""
    from grpo_models.qwen2_vl import Qwen2VLPolicy

    return Qwen2VLPolicy.from_pretrained(path, dtype=dtype, device="cpu", **kw)


def vowel_reward(completions, records):
    """Toy reward: 1 when the completion text starts with a vowel (decided by the first token)."""
    return [float(t[:1].lower() in "aeiou") for t in completions]
