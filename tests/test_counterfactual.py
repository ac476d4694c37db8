"""Image counterfactuals (grpo_core.counterfactual): a policy that never reads pixels gets reliance
exactly 0; one whose answer is a function of the image drops towards chance under blank and swapped
images; the conditions themselves; the tiny Qwen2-VL through every condition, text-only included."""

import pytest
from PIL import ImageStat

from grpo_core.counterfactual import VARIANTS, evaluate_counterfactual, variant_records
from grpo_core.data import make_synthetic_vqa, oracle_answer
from grpo_core.data.images import record_images

LETTER = {"upper left": "A", "upper right": "B", "lower left": "C", "lower right": "D"}


def reader(prompts):
    """Answers with the lesion quadrant read off the image (the task's oracle); no image → "A"."""
    return [
        f"<answer>{LETTER[oracle_answer(p.images[0], 'quadrant')] if p.images else 'A'}</answer>"
        for p in prompts
    ], [3] * len(prompts)


def ignorer(prompts):
    """Answers from the question text alone (a deterministic function of it), never the pixels."""
    return [f"<answer>{'ABCD'[sum(map(ord, p.text)) % 4]}</answer>" for p in prompts], [3] * len(
        prompts
    )


def test_conditions_keep_questions_and_change_only_images():
    recs = make_synthetic_vqa(6, seed=0)
    blank = variant_records(recs, "blank")
    for r, b in zip(recs, blank):
        (im,), (bl,) = record_images(r), record_images(b)
        assert bl.size == im.size and len(set(bl.getdata())) == 1  # uniform
        want = [round(m) for m in ImageStat.Stat(im.convert("RGB")).mean]
        assert [round(m) for m in ImageStat.Stat(bl).mean] == want  # its mean colour
        assert (b.question, b.answer_letter, b.options) == (r.question, r.answer_letter, r.options)
    swapped = variant_records(recs, "swapped", seed=3)
    assert all(s.extra["image_from"] != r.id for r, s in zip(recs, swapped))  # a derangement
    assert all(n.images == [] for n in variant_records(recs, "none"))
    with pytest.raises(ValueError, match="variant must be one of"):
        variant_records(recs, "noise")


def test_a_policy_that_ignores_the_image_relies_on_it_exactly_zero():
    recs = make_synthetic_vqa(40, seed=1)
    cf = evaluate_counterfactual(
        None, recs, variants=VARIANTS, template="nothink", generate_fn=ignorer, progress=False
    )
    assert list(cf.variants) == ["image", "blank", "swapped", "none"]
    for k, t in cf.reliance.items():
        assert t["difference"] == 0.0 and t["ci"] == [0.0, 0.0] and t["p_value"] == 1.0, k
    for g in cf.by_modality.values():
        assert g["drop_blank"] == g["drop_swapped"] == g["drop_none"] == 0.0
    assert "reliance" in cf.table()


def test_a_policy_that_reads_the_image_drops_to_chance():
    recs = make_synthetic_vqa(120, seed=2)
    cf = evaluate_counterfactual(
        None, recs, template="nothink", generate_fn=reader, progress=False, seed=1
    )
    assert cf.variants["image"].accuracy == 1.0
    for k in ("blank", "swapped"):
        t = cf.reliance[k]
        assert cf.variants[k].accuracy < 0.45, k  # chance is 0.25
        assert t["difference"] > 0.55 and t["ci"][0] > 0.4 and t["p_value"] < 1e-6, (k, t)
    s = cf.summary()
    assert s["reliance_swapped"] == pytest.approx(1.0 - s["swapped"])
    assert set(cf.by_modality) == {r.modality for r in recs}
    assert all(g["image"] == 1.0 and g["drop_swapped"] > 0.3 for g in cf.by_modality.values())


def test_tiny_qwen2_vl_under_every_condition(tiny_vlm_policy):
    recs = make_synthetic_vqa(3, seed=0)
    cf = evaluate_counterfactual(
        tiny_vlm_policy,
        recs,
        variants=VARIANTS,
        template="nothink",
        max_new_tokens=3,
        progress=False,
    )
    assert [r.n for r in cf.variants.values()] == [3, 3, 3, 3]
    assert all(len(it["completion"]) >= 0 for it in cf.variants["none"].items)
