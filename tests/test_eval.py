"""Evaluation harness with injected generators (an image-reading oracle, scripted texts) and, once,
the real rollout path on the tiny Qwen2-VL."""

import json

import pytest

from grpo_core.data import VQARecord, make_synthetic_vqa, oracle_answer, swap_images
from grpo_core.eval import EvalResult, evaluate
from grpo_core.stats import bootstrap_ci

LETTER = {"upper left": "A", "upper right": "B", "lower left": "C", "lower right": "D"}


def oracle_gen(template="think"):
    """A 'model' that reads the lesion quadrant off the image and answers in the template's format."""
    def fn(prompts):
        letters = [LETTER[oracle_answer(p.images[0], "quadrant")] for p in prompts]
        if template == "think":
            texts = [f"<think>the bright spot is there</think><answer>{L}</answer>" for L in letters]
        elif template == "nothink":
            texts = [f"<answer>{L}</answer>" for L in letters]
        else:
            texts = [f"({L})." for L in letters]
        return texts, [7] * len(prompts)
    return fn


@pytest.mark.parametrize("template", ["think", "nothink", "direct"])
def test_oracle_scores_perfectly_and_swapped_images_drop_to_chance(template):
    recs = make_synthetic_vqa(48, seed=0)
    res = evaluate(None, recs, template=template, batch_size=10, generate_fn=oracle_gen(template), progress=False)
    assert isinstance(res, EvalResult) and res.n == 48
    assert res.accuracy == 1.0 and res.format_rate == 1.0 and res.mean_completion_tokens == 7.0
    swapped = evaluate(None, swap_images(recs, seed=1), template=template,
                       generate_fn=oracle_gen(template), progress=False)
    assert swapped.accuracy < 0.5


def test_groups_format_rate_and_lengths():
    recs = make_synthetic_vqa(12, seed=2)
    # right answers on even items only; malformed format on every third item
    state = {"i": 0}

    def gen(prompts):
        texts = []
        for p in prompts:
            i = state["i"]
            state["i"] += 1
            L = LETTER[oracle_answer(p.images[0], "quadrant")] if i % 2 == 0 else "Z"
            texts.append(f"<think>{'w ' * i}</think><answer>{L}</answer>" + (" junk" if i % 3 == 0 else ""))
        return texts, [i + 1 for i in range(state["i"] - len(prompts), state["i"])]
    res = evaluate(None, recs, batch_size=5, generate_fn=gen, progress=False)
    assert res.accuracy == pytest.approx(6 / 12)
    assert res.format_rate == pytest.approx(8 / 12)
    assert res.mean_completion_tokens == pytest.approx(sum(range(1, 13)) / 12)
    assert res.mean_reasoning_words == pytest.approx(sum(range(12)) / 12)
    for m, g in res.by_modality.items():
        items = [it for it in res.items if it["modality"] == m]
        assert g["n"] == len(items) and g["accuracy"] == pytest.approx(sum(it["accuracy"] for it in items) / len(items))
    assert sum(g["n"] for g in res.by_modality.values()) == 12
    q = res.by_question_type["quadrant"]
    assert (q["n"], q["accuracy"], q["format_rate"]) == (12, 0.5, pytest.approx(8 / 12))
    assert q["ci"] == list(bootstrap_ci([it["accuracy"] for it in res.items]))
    assert res.accuracy_ci[0] < 0.5 < res.accuracy_ci[1] and "[" in res.table().splitlines()[2]


def test_mixed_answer_types():
    img = make_synthetic_vqa(1, seed=0)[0].images[0]
    recs = [VQARecord(id="y", images=[img], question="Is there a lesion?", answer_text="Yes",
                      answer_type="yesno", modality="CT"),
            VQARecord(id="o", images=[img], question="Which organ?", answer_text="left lung",
                      answer_type="open", modality="MR")]
    res = evaluate(None, recs, template="nothink", progress=False,
                   generate_fn=lambda ps: (["<answer>yes.</answer>", "<answer>The left lung</answer>"], [3, 4]))
    assert res.accuracy == 1.0 and res.by_modality["MR"]["accuracy"] == 1.0
    assert [it["prediction"] for it in res.items] == ["yes.", "The left lung"]


def test_to_json_and_table(tmp_path):
    recs = make_synthetic_vqa(8, seed=3)
    res = evaluate(None, recs, generate_fn=oracle_gen(), progress=False)
    path = tmp_path / "out" / "eval.json"
    res.to_json(str(path))
    data = json.loads(path.read_text())
    assert data["accuracy"] == 1.0 and data["n"] == 8 and len(data["items"]) == 8
    assert set(data["by_modality"]) == {r.modality for r in recs}
    table = res.table()
    assert table.splitlines()[2].split()[:3] == ["all", "8", "100.00%"]
    assert "modality: CT" in table or "modality: MR" in table


def test_pass_at_k_from_scripted_samples_by_hand():
    """4 items × 4 samples with 0, 1, 2, 4 correct: pass@1 = mean c/n = 7/16;
    pass@2 = mean of 1 − C(4−c, 2)/C(4, 2) = (0 + 1/2 + 5/6 + 1)/4; pass@4 = 3/4."""
    recs = make_synthetic_vqa(4, seed=5)
    right = [LETTER[oracle_answer(r.images[0], "quadrant")] for r in recs]
    wrong = ["A" if L != "A" else "B" for L in right]
    correct = [0, 1, 2, 4]

    def sample_fn(prompts, n):
        assert n == 4 and len(prompts) == 4
        return [f"<answer>{right[i] if j < correct[i] else wrong[i]}</answer>"
                for i in range(4) for j in range(n)]
    res = evaluate(None, recs, template="nothink", generate_fn=oracle_gen("nothink"),
                   sample_fn=sample_fn, samples=4, progress=False)
    assert res.accuracy == 1.0 and [it["sample_correct"] for it in res.items] == correct
    assert res.pass_at_k["1"] == pytest.approx(7 / 16)
    assert res.pass_at_k["2"] == pytest.approx((0 + 1 / 2 + 5 / 6 + 1) / 4)
    assert res.pass_at_k["4"] == pytest.approx(3 / 4) and set(res.pass_at_k) == {"1", "2", "4"}
    assert "pass@2 58.33%" in res.table()
    with pytest.raises(ValueError, match="prompt-major"):
        evaluate(None, recs, template="nothink", generate_fn=oracle_gen("nothink"), samples=2,
                 progress=False, sample_fn=lambda ps, n: ["x"])


def test_bad_generator_and_arguments():
    recs = make_synthetic_vqa(4, seed=0)
    with pytest.raises(ValueError, match="one completion per prompt"):
        evaluate(None, recs, generate_fn=lambda ps: (["x"], [1]), progress=False)
    with pytest.raises(ValueError, match="template"):
        evaluate(None, recs, template="cot", generate_fn=oracle_gen(), progress=False)
    with pytest.raises(ValueError, match="no records"):
        evaluate(None, [], generate_fn=oracle_gen(), progress=False)


def test_progress_bar_runs(capsys):
    evaluate(None, make_synthetic_vqa(4, seed=0), generate_fn=oracle_gen(), progress=True)
    assert "eval (think)" in capsys.readouterr().err


def test_default_generation_through_rollout(tiny_vlm_policy):
    recs = make_synthetic_vqa(3, seed=0)
    res = evaluate(tiny_vlm_policy, recs, template="nothink", batch_size=2, max_new_tokens=4, progress=False)
    assert res.n == 3 and 1 <= res.mean_completion_tokens <= 4
    assert all(isinstance(it["completion"], str) for it in res.items)
    again = evaluate(tiny_vlm_policy, recs, template="nothink", batch_size=3, max_new_tokens=4,
                     progress=False, samples=2)
    assert [it["completion"] for it in again.items] == [it["completion"] for it in res.items]   # greedy
    assert set(again.pass_at_k) == {"1", "2"}
    assert all(0 <= it["sample_correct"] <= 2 for it in again.items)
