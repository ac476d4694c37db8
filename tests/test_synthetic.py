"""Synthetic lesion VQA: determinism, balance, and the image (not the text) carries the answer."""

from collections import Counter, defaultdict

import numpy as np
import pytest

from grpo_core.data import make_synthetic_vqa, oracle_answer, swap_images

TASKS = ["quadrant", "laterality", "size", "count", "presence"]


def pixels(r):
    return np.asarray(r.images[0])


def test_deterministic_by_seed_and_seed_matters():
    a, b = make_synthetic_vqa(12, seed=5), make_synthetic_vqa(12, seed=5)
    c = make_synthetic_vqa(12, seed=6)
    assert [r.answer_letter for r in a] == [r.answer_letter for r in b]
    assert all(np.array_equal(pixels(x), pixels(y)) for x, y in zip(a, b))
    assert not all(np.array_equal(pixels(x), pixels(y)) for x, y in zip(a, c))


@pytest.mark.parametrize("task", TASKS)
def test_balanced_answers_and_oracle_reads_image(task):
    recs = make_synthetic_vqa(80, seed=1, task=task)
    counts = Counter(r.answer_text for r in recs)
    assert max(counts.values()) - min(counts.values()) <= 1
    agree = np.mean([oracle_answer(r.images[0], task) == r.answer_text for r in recs])
    assert agree == 1.0, f"{task}: oracle agrees on {agree:.2%}"


def test_default_layout_quadrant_fixed_options_and_size():
    r = make_synthetic_vqa(4, seed=0)[0]
    assert r.images[0].size == (56, 56) and r.answer_type == "mc"
    assert r.options == {"A": "upper left", "B": "upper right", "C": "lower left", "D": "lower right"}
    assert r.options[r.answer_letter] == r.answer_text
    big = make_synthetic_vqa(2, seed=0, image_size=112, task="count")
    assert big[0].images[0].size == (112, 112)
    assert make_synthetic_vqa(2, seed=0, task="presence")[0].answer_type == "yesno"


def test_lesion_lies_inside_its_quadrant_token():
    for r in make_synthetic_vqa(60, seed=2):
        (cy, cx, s), = r.extra["lesions"]
        q = (cy >= 28) * 2 + (cx >= 28)
        assert "ABCD"[q] == r.answer_letter
        assert min(abs(cy - 27.5), abs(cx - 27.5)) > 3               # away from the token border


def test_question_text_carries_no_information():
    recs = make_synthetic_vqa(400, seed=3)
    by_text = defaultdict(Counter)
    for r in recs:
        by_text[(r.question, tuple(r.options.items()))][r.answer_letter] += 1
    assert len(by_text) > 1
    for text, cnt in by_text.items():
        n = sum(cnt.values())
        assert len(cnt) == 4 and max(cnt.values()) / n < 0.45, (text, cnt)   # near 1/4 each
    # and the answers are independent of the modality shown in the text
    for m in ("CT", "MR", "X-ray"):
        cnt = Counter(r.answer_letter for r in recs if r.modality == m)
        assert max(cnt.values()) / sum(cnt.values()) < 0.45


def test_swapping_images_permutes_answers():
    recs = make_synthetic_vqa(40, seed=4)
    swapped = swap_images(recs, seed=0)
    src = {r.id: r for r in recs}
    for s in swapped:
        owner = src[s.extra["image_from"]]
        assert owner.id != s.id
        assert oracle_answer(s.images[0], "quadrant") == owner.answer_text   # the answer moved with the image
    acc = np.mean([oracle_answer(s.images[0], "quadrant") == s.answer_text for s in swapped])
    assert acc < 0.5                                                        # the text alone is near chance


def test_bad_arguments():
    with pytest.raises(ValueError, match="task must be one of"):
        make_synthetic_vqa(2, task="colour")
    with pytest.raises(ValueError, match="modalities"):
        make_synthetic_vqa(2, modalities=("PET",))


def test_lesion_size_and_brightness_options():
    from grpo_core.data import make_synthetic_vqa as make
    from grpo_core.data import oracle_answer

    small = make(40, seed=5)
    big = make(40, seed=5, lesion_sigma=0.07, lesion_amplitude=0.7)
    assert [r.answer_letter for r in small] == [r.answer_letter for r in big]   # same answers, other pixels
    assert all(oracle_answer(r.images[0], "quadrant") == r.answer_text for r in big)
    import numpy as np
    peak = lambda rs: np.mean([np.asarray(r.images[0]).max() for r in rs])  # noqa: E731
    assert peak(big) > peak(small)
    with pytest.raises(ValueError, match="lesion_sigma"):
        make(4, lesion_sigma=0.5)
