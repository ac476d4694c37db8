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

Uncertainty (grpo_core.stats): every accuracy carries a 95 % percentile-bootstrap interval over the
items (``accuracy_ci``, and ``ci`` in each group). pass@k: with ``samples = n > 0`` each item also
gets n sampled completions (temperature ``temperature``, through ``sample_fn(prompts, n) -> B·n
texts``, prompt-major); an item's sample counts as correct when its score is 1 (a graded open
answer needs a full match), and ``pass_at_k[k]`` is the mean over items of the unbiased estimator
1 − C(n−c, k)/C(n, k) for k = 1, 2, 4, … ≤ n, beside the greedy acc@1 (``accuracy``).
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
from .stats import bootstrap_ci, ks_for, pass_at_k

__all__ = ["EvalResult", "evaluate", "swap_images"]


@dataclass
class EvalResult:
    template: str                                           # prompt template evaluated
    n: int                                                  # records scored
    accuracy: float                                         # mean accuracy over all records
    format_rate: float                                      # fraction of well-formed completions
    mean_completion_tokens: float                           # generated tokens per completion
    mean_reasoning_words: float                             # whitespace tokens inside <think>
    accuracy_ci: list = field(default_factory=list)         # 95 % bootstrap interval over items
    by_modality: dict = field(default_factory=dict)         # modality -> {"n", "accuracy", "format_rate"}
    by_question_type: dict = field(default_factory=dict)    # question_type -> same
    items: list = field(default_factory=list)               # per record: id, prediction, gold, scores, text
    skipped: list = field(default_factory=list)             # records whose images could not be used: id, error
    samples: int = 0                                        # sampled completions per item (pass@k)
    temperature: float = 1.0                                # their sampling temperature
    pass_at_k: dict = field(default_factory=dict)           # "k" -> mean unbiased pass@k over items
    pass_at_k_ci: dict = field(default_factory=dict)        # "k" -> its 95 % bootstrap interval

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self, path: str) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=2, ensure_ascii=False)

    def table(self) -> str:
        """A plain-text table: overall row, then one row per modality and per question type;
        accuracy with its 95 % interval; pass@k below when sampled."""
        rows = [("all", self.n, self.accuracy, self.accuracy_ci, self.format_rate)]
        for label, groups in (("modality", self.by_modality), ("question", self.by_question_type)):
            rows += [(f"{label}: {k}", v["n"], v["accuracy"], v.get("ci"), v["format_rate"])
                     for k, v in groups.items()]
        w = max(len(r[0]) for r in rows)
        lines = [f"{'group':<{w}}  {'n':>6}  {'accuracy':>8}  {'95 % CI':>15}  {'format':>7}",
                 "-" * (w + 46)]
        lines += [f"{name:<{w}}  {n:>6}  {acc:>8.2%}  {ci_text(ci):>15}  {fmt:>7.2%}"
                  for name, n, acc, ci, fmt in rows]
        lines.append(f"template={self.template}  mean completion tokens={self.mean_completion_tokens:.1f}  "
                     f"mean reasoning words={self.mean_reasoning_words:.1f}")
        if self.pass_at_k:
            lines.append(f"pass@k from {self.samples} samples per item at T={self.temperature:g} "
                         f"(greedy acc@1 {self.accuracy:.2%}): " + ", ".join(
                             f"pass@{k} {v:.2%} {ci_text(self.pass_at_k_ci.get(k))}"
                             for k, v in self.pass_at_k.items()))
        return "\n".join(lines)


def ci_text(ci) -> str:
    """[lo, hi] as '[41.0, 55.0]' (percent), or '' when there is none."""
    return f"[{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]" if ci else ""


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


def default_sample_fn(policy, max_new_tokens: int = 256, temperature: float = 1.0, seed: int = 0,
                      **sampling_kw) -> Callable:
    """(prompts, n) -> B·n sampled texts (prompt-major) through generate_groups, seeded per call."""
    from .rollout import generate_groups
    from .sampling import SamplingConfig

    calls = [0]

    def fn(prompts, n):
        sampling = SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature,
                                  seed=seed * 1_000_003 + calls[0], **sampling_kw)
        calls[0] += 1
        return list(generate_groups(policy, prompts, group_size=n, sampling=sampling).texts)
    return fn


def _group(items: list, key: str) -> dict:
    acc = defaultdict(list)
    for it in items:
        acc[it[key] or "(none)"].append(it)
    return {k: {"n": len(v), "accuracy": sum(i["accuracy"] for i in v) / len(v),
                "ci": list(bootstrap_ci([i["accuracy"] for i in v])),
                "format_rate": sum(i["format_ok"] for i in v) / len(v)} for k, v in sorted(acc.items())}


def _pass_at_k(items: list, n: int) -> tuple[dict, dict]:
    """Mean unbiased pass@k over items (k = 1, 2, 4, … ≤ n) and its bootstrap interval."""
    est, cis = {}, {}
    for k in ks_for(n):
        per_item = [pass_at_k(n, it["sample_correct"], k) for it in items]
        est[str(k)], cis[str(k)] = sum(per_item) / len(per_item), list(bootstrap_ci(per_item))
    return est, cis


def evaluate(policy, records: Sequence, *, template: str = "think", batch_size: int = 8, max_new_tokens: int = 256,
             greedy: bool = True, generate_fn: Callable | None = None, progress: bool = True,
             shuffle_options: bool = False, seed: int | None = None, open_metric: str = "exact",
             max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS, samples: int = 0,
             temperature: float = 1.0, sample_seed: int = 0, sample_fn: Callable | None = None,
             ) -> EvalResult:
    """Generate, score and aggregate over ``records`` (one completion each; with ``samples`` > 0
    also that many sampled ones for pass@k, module docstring). A record whose images cannot be
    used (ImageLoadError: unreadable, over ``max_image_pixels``) is skipped and listed in
    ``EvalResult.skipped``; the scores are over the records that were evaluated."""
    if template not in TEMPLATES:
        raise ValueError(f"evaluate: template must be one of {TEMPLATES}, got {template!r}")
    if batch_size < 1:
        raise ValueError(f"evaluate: batch_size must be >= 1, got {batch_size}")
    if not records:
        raise ValueError("evaluate: no records to evaluate")
    if samples < 0:
        raise ValueError(f"evaluate: samples must be >= 0 (0 = greedy acc@1 only), got {samples}")
    gen = generate_fn or default_generate_fn(policy, max_new_tokens=max_new_tokens, greedy=greedy)
    if samples and sample_fn is None:
        sample_fn = default_sample_fn(policy, max_new_tokens, temperature, sample_seed)
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
        many = sample_fn(prompts, samples) if samples else []
        if len(many) != samples * len(prompts):
            raise ValueError(f"evaluate: sample_fn returned {len(many)} texts for {len(prompts)} "
                             f"prompts × {samples} samples; it must return prompt-major B·n "
                             "completions")
        for j, (rec, text, ln) in enumerate(zip(shown, texts, lengths)):
            items.append({
                "id": rec.id, "modality": rec.modality, "question_type": rec.question_type,
                "answer_type": rec.answer_type,
                "gold": rec.answer_letter if rec.answer_type == "mc" else rec.answer_text,
                "prediction": extract_answer(text, require_tag=require_tag),
                "accuracy": score_one(text, rec, require_tag=require_tag, open_metric=open_metric),
                "format_ok": format_ok(text, rec, template), "completion_tokens": int(ln),
                "reasoning_words": reasoning_length(text), "completion": text,
            })
            if samples:
                scores = [score_one(t, rec, require_tag=require_tag, open_metric=open_metric)
                          for t in many[j * samples: (j + 1) * samples]]
                items[-1]["sample_correct"] = sum(sc >= 1.0 for sc in scores)
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
    pk, pk_ci = _pass_at_k(items, samples) if samples else ({}, {})
    return EvalResult(
        template=template, n=n, accuracy=sum(i["accuracy"] for i in items) / n,
        accuracy_ci=list(bootstrap_ci([i["accuracy"] for i in items])),
        samples=samples, temperature=temperature, pass_at_k=pk, pass_at_k_ci=pk_ci,
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
