"""Prompt text for a VQA record: question, options as "A) text" lines, then the instructions.

Templates (the reward that fits each one is named beside it):
  - "think":   reason inside <think>…</think>, then only the answer inside <answer>…</answer>
               (rewards "format" + "accuracy"; Med-R1 / MedVLM-R1 style, own wording).
  - "nothink": only the answer inside <answer>…</answer> (rewards "format_nothink" + "accuracy").
  - "direct":  only the answer, no tags (evaluation baseline; accuracy with require_tag=False).

The answer asked for follows the record: the option letter for "mc", yes or no for "yesno", a
short phrase for "open". The chat-vs-plain wrapping and the image placeholders are the policy's
job (Policy.encode); this module only builds ``Prompt(text, images)``. Images are decoded here
(images.record_images, under ``max_image_pixels``): an image that cannot be used raises
``ImageLoadError`` naming the record's file, row and path, so the caller can skip that record.

Option shuffling (``shuffle_options=True``) permutes the option texts, relabels them A, B, …
and remaps the gold letter; with a seed the permutation is a pure function of (seed, record.id),
so the same record always gets the same order. docs/DESIGN.md: per-item shuffled options were not
learnable by the tiny CPU-demo model, so the default is the source order.
"""

from __future__ import annotations

import dataclasses
import hashlib
import random

from ..policy import Prompt
from .images import DEFAULT_MAX_IMAGE_PIXELS, record_images
from .record import LETTERS, VQARecord

TEMPLATES = ("think", "nothink", "direct")

_WHAT = {
    "mc": ("the letter of the correct option", "<answer> A </answer>"),
    "yesno": ("yes or no", "<answer> yes </answer>"),
    "open": ("a short answer (a few words)", "<answer> left lung </answer>"),
}

_INSTRUCTIONS = {
    "think": (
        "Look at the image and think through the question step by step inside <think> </think> tags. "
        "Then give only {what} inside <answer> </answer> tags, for example {example}. "
        "Write nothing outside the tags."
    ),
    "nothink": "Give only {what} inside <answer> </answer> tags, for example {example}. Write nothing else.",
    "direct": "Answer with only {what}.",
}


def render_options(options: dict) -> str:
    """{'A': 'CT', 'B': 'MRI'} -> 'A) CT\\nB) MRI'."""
    return "\n".join(f"{L}) {text}" for L, text in options.items())


def render_text(record: VQARecord, template: str = "think") -> str:
    """The user-turn text for one record: question, option lines (mc), instructions."""
    if template not in TEMPLATES:
        raise ValueError(f"template must be one of {TEMPLATES}, got {template!r}")
    what, example = _WHAT[record.answer_type]
    parts = [record.question.strip()]
    if record.answer_type == "mc" and record.options:
        parts.append(render_options(record.options))
    parts.append(_INSTRUCTIONS[template].format(what=what, example=example))
    return "\n".join(parts)


def _rng(seed, record_id: str) -> random.Random:
    if seed is None:
        return random.Random()
    digest = hashlib.sha256(f"{seed}:{record_id}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "little"))


def shuffle_record_options(record: VQARecord, seed=None) -> VQARecord:
    """A copy with option texts permuted, relabelled A, B, … and the gold letter remapped.

    ``extra["option_order"]`` lists the original letters in their new order.
    """
    if record.answer_type != "mc" or len(record.options) < 2:
        return record
    old = list(record.options)
    order = old[:]
    _rng(seed, record.id).shuffle(order)
    new_options = {LETTERS[i]: record.options[L] for i, L in enumerate(order)}
    letter = LETTERS[order.index(record.answer_letter)] if record.answer_letter in record.options else None
    extra = dict(record.extra, option_order=order)
    return dataclasses.replace(record, options=new_options, answer_letter=letter, extra=extra)


def record_to_prompt(record: VQARecord, template: str = "think", shuffle_options: bool = False, seed=None,
                     system: str | None = None, max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
                     ) -> tuple[Prompt, VQARecord]:
    """Record -> (Prompt(text, RGB images), record as shown: options possibly shuffled).

    Score completions against the returned record: its answer_letter matches the shown order.
    Raises ImageLoadError (file, row, path) when one of the record's images cannot be used.
    """
    shown = shuffle_record_options(record, seed) if shuffle_options else record
    text = render_text(shown, template)
    return Prompt(text=text, images=record_images(shown, max_image_pixels), system=system), shown


def records_to_prompts(records, template: str = "think", shuffle_options: bool = False, seed=None,
                       max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS):
    """Batch form of record_to_prompt -> (list[Prompt], list[VQARecord]); the first bad image raises."""
    pairs = [record_to_prompt(r, template, shuffle_options, seed, max_image_pixels=max_image_pixels) for r in records]
    return [p for p, _ in pairs], [r for _, r in pairs]


def make_prompt_fn(template: str = "think", shuffle_options: bool = False, seed=None,
                   max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS):
    """records -> (prompts, records as shown): the trainers' prompt function for one template.

    With ``shuffle_options`` the option order is fixed per (seed, record id), so a record gets the
    same order in every step, in eval and after a resume. Call it on one record at a time to
    skip records whose images fail (ImageLoadError) and take the next one instead.
    """
    if template not in TEMPLATES:
        raise ValueError(f"template must be one of {TEMPLATES}, got {template!r}")

    def prompt_fn(records):
        return records_to_prompts(records, template, shuffle_options, seed, max_image_pixels)
    return prompt_fn
