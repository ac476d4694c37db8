"""Image counterfactuals: does the policy look at the image?

    cf = evaluate_counterfactual(policy, records, template="think")    # image, blank, swapped
    print(cf.table()); cf.to_json("counterfactual.json")

Each item is evaluated (greedy, grpo_core.eval.evaluate) under several image conditions, with its
question, options and gold answer unchanged:

    image     its own image(s)
    blank     each image replaced by a uniform image of the same size, filled with that image's
              mean colour (brightness kept, content removed)
    swapped   another item's image(s): a derangement of the items (data.record.swap_images), so
              no item keeps its own image
    none      no image at all (text only); optional, since a model trained with images may never
              have seen a prompt without one

Visual reliance under a condition = accuracy(image) − accuracy(condition) on the same items, with
its paired 95 % bootstrap interval and exact McNemar p (grpo_core.stats.paired_test); also by
modality and by question type. A policy whose answers do not depend on the pixels gets exactly 0
(the same completions under every condition when decoding is greedy); one that reads the image
falls towards chance under ``blank`` and ``swapped``.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Sequence

from .data.images import DEFAULT_MAX_IMAGE_PIXELS, ImageLoadError, record_images
from .data.record import swap_images
from .eval import EvalResult, ci_text, evaluate
from .stats import paired_test

VARIANTS = ("image", "blank", "swapped", "none")
DEFAULT_VARIANTS = ("image", "blank", "swapped")


def blank_image(img):
    """A uniform RGB image of ``img``'s size in its mean colour."""
    from PIL import Image, ImageStat

    rgb = img.convert("RGB")
    return Image.new("RGB", rgb.size, tuple(int(round(m)) for m in ImageStat.Stat(rgb).mean))


def variant_records(
    records: Sequence,
    variant: str,
    seed: int = 0,
    max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
) -> list:
    """Copies of ``records`` under one condition (module docstring). ``blank`` decodes each image
    to learn its size and colour; a record whose image cannot be used keeps its sources, so
    evaluate() skips and lists it as it would under ``image``."""
    if variant not in VARIANTS:
        raise ValueError(f"counterfactual: variant must be one of {VARIANTS}, got {variant!r}")
    if variant == "image":
        return list(records)
    if variant == "swapped":
        return swap_images(records, seed=seed)
    if variant == "none":
        return [
            dataclasses.replace(r, images=[], extra=dict(r.extra, image_variant="none"))
            for r in records
        ]
    out = []
    for r in records:
        try:
            imgs = [blank_image(im) for im in record_images(r, max_image_pixels)]
        except ImageLoadError:
            out.append(r)
            continue
        out.append(dataclasses.replace(r, images=imgs, extra=dict(r.extra, image_variant="blank")))
    return out


@dataclass
class CounterfactualResult:
    variants: dict  # condition -> EvalResult
    reliance: dict  # condition -> paired_test(image, condition) on shared items
    by_modality: dict = field(
        default_factory=dict
    )  # modality -> {condition: accuracy, "drop_<c>": drop}
    by_question_type: dict = field(default_factory=dict)  # question type -> same

    def to_dict(self) -> dict:
        return {
            "variants": {k: v.to_dict() for k, v in self.variants.items()},
            "reliance": self.reliance,
            "by_modality": self.by_modality,
            "by_question_type": self.by_question_type,
        }

    def to_json(self, path: str) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=2, ensure_ascii=False)

    def summary(self) -> dict:
        """Small form for tables: {condition: accuracy, "reliance_<c>": drop,
        "reliance_<c>_ci": [lo, hi], "reliance_<c>_p": p}."""
        out = {k: v.accuracy for k, v in self.variants.items()}
        for k, t in self.reliance.items():
            out[f"reliance_{k}"], out[f"reliance_{k}_ci"], out[f"reliance_{k}_p"] = (
                t["difference"],
                t["ci"],
                t["p_value"],
            )
        return out

    def table(self) -> str:
        """Accuracy per condition (with its interval), then the drop from ``image``, by group."""
        names = list(self.variants)
        lines = [
            f"{'condition':<10}  {'n':>5}  {'accuracy':>8}  {'95 % CI':>14}  "
            f"{'reliance (drop)':>16}  {'95 % CI':>15}  {'p':>8}",
            "-" * 88,
        ]
        for k in names:
            r, t = self.variants[k], self.reliance.get(k)
            drop = (
                f"{100 * t['difference']:+.1f} pts  {ci_text(t['ci']):>15}  {t['p_value']:>8.3g}"
                if t
                else ""
            )
            lines.append(
                f"{k:<10}  {r.n:>5}  {r.accuracy:>8.2%}  {ci_text(r.accuracy_ci):>14}  {drop:>16}"
            )
        for title, groups in (
            ("modality", self.by_modality),
            ("question type", self.by_question_type),
        ):
            if len(groups) < 2:
                continue
            lines += [
                "",
                f"accuracy % by {title} (drop from image, points)",
                f"{'group':<14}" + "".join(f"  {k:>16}" for k in names),
            ]
            for g, row in groups.items():
                cells = [
                    f"{100 * row[k]:.1f}"
                    + (f" ({100 * row['drop_' + k]:+.1f})" if k != "image" else "")
                    for k in names
                ]
                lines.append(f"{g:<14}" + "".join(f"  {c:>16}" for c in cells))
        return "\n".join(lines)


def _by_group(results: dict, ids: list, key: str) -> dict:
    """group -> {condition: accuracy on the shared items of that group, "drop_<c>": image − c}."""
    per = {k: {it["id"]: it for it in r.items} for k, r in results.items()}
    groups = defaultdict(list)
    for i in ids:
        groups[per["image"][i][key] or "(none)"].append(i)
    out = {}
    for g, members in sorted(groups.items()):
        row = {k: sum(per[k][i]["accuracy"] for i in members) / len(members) for k in results}
        row.update({f"drop_{k}": row["image"] - row[k] for k in results if k != "image"})
        row["n"] = len(members)
        out[g] = row
    return out


def evaluate_counterfactual(
    policy,
    records: Sequence,
    variants: Sequence[str] = DEFAULT_VARIANTS,
    seed: int = 0,
    **evaluate_kw,
) -> CounterfactualResult:
    """Evaluate ``records`` under each condition (``image`` always first) and compare on the items
    every condition scored. ``evaluate_kw`` go to grpo_core.eval.evaluate (template, batch_size,
    max_new_tokens, generate_fn, progress, ...); decoding stays greedy."""
    variants = ["image"] + [v for v in variants if v != "image"]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise ValueError(f"counterfactual: unknown condition(s) {unknown}; choose from {VARIANTS}")
    mp = evaluate_kw.get("max_image_pixels", DEFAULT_MAX_IMAGE_PIXELS)
    results: dict[str, EvalResult] = {}
    for v in variants:
        results[v] = evaluate(policy, variant_records(records, v, seed, mp), **evaluate_kw)
    ids = [it["id"] for it in results["image"].items]
    for r in results.values():
        have = {it["id"] for it in r.items}
        ids = [i for i in ids if i in have]
    score = {k: {it["id"]: it["accuracy"] for it in r.items} for k, r in results.items()}
    reliance = {
        k: paired_test([score["image"][i] for i in ids], [score[k][i] for i in ids], seed=seed)
        for k in variants
        if k != "image"
    }
    return CounterfactualResult(
        results,
        reliance,
        _by_group(results, ids, "modality"),
        _by_group(results, ids, "question_type"),
    )
