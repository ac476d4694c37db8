"""Evaluation harness: generate one completion per record, score it, aggregate, report.

    res = evaluate(policy, records, template="think")   # greedy, 256 new tokens (Med-R1's setting)
    print(res.table()); res.to_json("eval.json")

Scoring uses the same parsers as the training rewards (grpo_core.rewards): accuracy is the strict
``accuracy_reward`` (letters 1/0, yes/no normalised, open answers normalised exact match or F1),
format is ``format_reward`` for "think", ``format_nothink_reward`` for "nothink"; for "direct"
(no tags) the answer is the whole completion, letters may carry brackets/dots ("(B)", "b."), and
the format rate counts completions that parse as an answer at all.

Generation goes through ``generate_fn(prompts) -> (texts, completion_lengths)``; the default one
calls ``grpo_core.rollout.generate_groups(policy, prompts, group_size=1, sampling)`` (imported
lazily, so tests can inject a fake generator without a model). Lengths are token counts.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

from .answers import FORMAT_NOTHINK_RE, FORMAT_RE, direct_letter, extract_answer, reasoning_length
from .data.images import DEFAULT_MAX_IMAGE_PIXELS, ImageLoadError
from .data.record import swap_images, yes_no
from .data.templates import TEMPLATES, records_to_prompts
from .rewards import score_one

__all__ = ["EvalResult", "evaluate", "swap_images"]


@dataclass
class EvalResult:
    template: str                                           # prompt template evaluated
    n: int                                                  # records scored
    accuracy: float                                         # mean accuracy over all records
    format_rate: float                                      # fraction of well-formed completions
    mean_completion_tokens: float                           # generated tokens per completion
    mean_reasoning_words: float                             # whitespace tokens inside <think>
    by_modality: dict = field(default_factory=dict)         # modality -> {"n", "accuracy", "format_rate"}
    by_question_type: dict = field(default_factory=dict)    # question_type -> same
    items: list = field(default_factory=list)               # per record: id, prediction, gold, scores, text
    skipped: list = field(default_factory=list)             # records whose images could not be used: id, error

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self, path: str) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=2, ensure_ascii=False)

    def table(self) -> str:
        """A plain-text table: overall row, then one row per modality and per question type."""
        rows = [("all", self.n, self.accuracy, self.format_rate)]
        rows += [(f"modality: {k}", v["n"], v["accuracy"], v["format_rate"]) for k, v in self.by_modality.items()]
        rows += [(f"question: {k}", v["n"], v["accuracy"], v["format_rate"]) for k, v in self.by_question_type.items()]
        w = max(len(r[0]) for r in rows)
        lines = [f"{'group':<{w}}  {'n':>6}  {'accuracy':>8}  {'format':>7}", "-" * (w + 29)]
        lines += [f"{name:<{w}}  {n:>6}  {acc:>8.2%}  {fmt:>7.2%}" for name, n, acc, fmt in rows]
        lines.append(f"template={self.template}  mean completion tokens={self.mean_completion_tokens:.1f}  "
                     f"mean reasoning words={self.mean_reasoning_words:.1f}")
        return "\n".join(lines)


def format_ok(text: str, record, template: str) -> bool:
    """Is the completion well formed for the template (see module docstring)?"""
    if template == "think":
        return FORMAT_RE.fullmatch(text) is not None
    if template == "nothink":
        return FORMAT_NOTHINK_RE.fullmatch(text) is not None
    answer = text.strip()
    if record.answer_type == "mc":
        return direct_letter(answer) is not None
    if record.answer_type == "yesno":
        return yes_no(answer) is not None
    return bool(answer)


def default_generate_fn(policy, max_new_tokens: int = 256, greedy: bool = True, **sampling_kw) -> Callable:
    """prompts -> (texts, completion token counts) through grpo_core.rollout.generate_groups."""
    from .rollout import generate_groups
    from .sampling import SamplingConfig

    sampling = SamplingConfig(max_new_tokens=max_new_tokens, greedy=greedy, **sampling_kw)

    def fn(prompts):
        ro = generate_groups(policy, prompts, group_size=1, sampling=sampling)
        return list(ro.texts), ro.completion_mask.sum(-1).tolist()
    return fn


def _group(items: list, key: str) -> dict:
    acc = defaultdict(list)
    for it in items:
        acc[it[key] or "(none)"].append(it)
    return {k: {"n": len(v), "accuracy": sum(i["accuracy"] for i in v) / len(v),
                "format_rate": sum(i["format_ok"] for i in v) / len(v)} for k, v in sorted(acc.items())}


def evaluate(policy, records: Sequence, *, template: str = "think", batch_size: int = 8, max_new_tokens: int = 256,
             greedy: bool = True, generate_fn: Callable | None = None, progress: bool = True,
             shuffle_options: bool = False, seed: int | None = None, open_metric: str = "exact",
             max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> EvalResult:
    """Generate, score and aggregate over ``records`` (one completion each). A record whose images
    cannot be used (ImageLoadError: unreadable, over ``max_image_pixels``) is skipped and listed in
    ``EvalResult.skipped``; the scores are over the records that were evaluated."""
    if template not in TEMPLATES:
        raise ValueError(f"evaluate: template must be one of {TEMPLATES}, got {template!r}")
    if batch_size < 1:
        raise ValueError(f"evaluate: batch_size must be >= 1, got {batch_size}")
    if not records:
        raise ValueError("evaluate: no records to evaluate")
    gen = generate_fn or default_generate_fn(policy, max_new_tokens=max_new_tokens, greedy=greedy)
    require_tag = template != "direct"
    bar = None
    if progress:
        from .progress import bar as progress_bar
        bar = progress_bar(len(records), f"eval ({template})", "rec")
    items, skipped = [], []
    for s in range(0, len(records), batch_size):
        prompts, shown = _prompts(records[s: s + batch_size], template, shuffle_options, seed, max_image_pixels,
                                  skipped)
        if not prompts:
            continue
        texts, lengths = gen(prompts)
        if len(texts) != len(prompts) or len(lengths) != len(prompts):
            raise ValueError(f"evaluate: generate_fn returned {len(texts)} texts / {len(lengths)} lengths "
                             f"for {len(prompts)} prompts; it must return one completion per prompt")
        for rec, text, ln in zip(shown, texts, lengths):
            items.append({
                "id": rec.id, "modality": rec.modality, "question_type": rec.question_type,
                "answer_type": rec.answer_type, "gold": rec.answer_letter if rec.answer_type == "mc" else rec.answer_text,
                "prediction": extract_answer(text, require_tag=require_tag),
                "accuracy": score_one(text, rec, require_tag=require_tag, open_metric=open_metric),
                "format_ok": format_ok(text, rec, template), "completion_tokens": int(ln),
                "reasoning_words": reasoning_length(text), "completion": text,
            })
        if bar is not None:
            acc = sum(i["accuracy"] for i in items) / len(items)
            bar.set_postfix(acc=f"{acc:.3f}", refresh=False)    # first: a log line shows this batch
            bar.update(len(prompts))
    if bar is not None:
        bar.close()
    n = len(items)
    if n == 0:
        raise ValueError(f"evaluate: none of the {len(records)} records could be evaluated; the first error: "
                         f"{skipped[0]['error']}")
    return EvalResult(
        template=template, n=n, accuracy=sum(i["accuracy"] for i in items) / n,
        format_rate=sum(i["format_ok"] for i in items) / n,
        mean_completion_tokens=sum(i["completion_tokens"] for i in items) / n,
        mean_reasoning_words=sum(i["reasoning_words"] for i in items) / n,
        by_modality=_group(items, "modality"), by_question_type=_group(items, "question_type"), items=items,
        skipped=skipped,
    )


def _prompts(records, template, shuffle_options, seed, max_image_pixels, skipped: list):
    """records_to_prompts, but a record whose images fail is left out and appended to ``skipped``."""
    try:
        return records_to_prompts(records, template, shuffle_options, seed, max_image_pixels)
    except ImageLoadError:
        prompts, shown = [], []
        for r in records:
            try:
                (p,), (s,) = records_to_prompts([r], template, shuffle_options, seed, max_image_pixels)
            except ImageLoadError as e:
                skipped.append({"id": r.id, "error": str(e)})
                continue
            prompts.append(p)
            shown.append(s)
        return prompts, shown
