"""Prompt templates: rendering, answer-kind instructions, deterministic option shuffling."""

import pytest
from PIL import Image

from grpo_core.data import (
    VQARecord,
    record_to_prompt,
    records_to_prompts,
    render_options,
    shuffle_record_options,
)
from grpo_core.policy import Prompt


def mc(id="r1", n=4, gold="C"):
    opts = {L: f"option {L.lower()}" for L in "ABCDEFGH"[:n]}
    img = Image.new("L", (16, 16), 128)
    return VQARecord(id=id, images=[img], question="Where is the lesion?", options=opts,
                     answer_letter=gold, answer_text=opts[gold])


def test_render_options_lines():
    assert render_options({"A": "CT", "B": "MRI"}) == "A) CT\nB) MRI"


@pytest.mark.parametrize("template", ["think", "nothink", "direct"])
def test_prompt_text_and_images(template):
    p, shown = record_to_prompt(mc(), template=template)
    assert isinstance(p, Prompt) and shown.answer_letter == "C"
    assert p.text.startswith("Where is the lesion?\nA) option a\nB) option b\nC) option c\nD) option d\n")
    assert len(p.images) == 1 and p.images[0].mode == "RGB"            # grey converted for the processor
    assert ("<think>" in p.text) == (template == "think")
    assert ("<answer>" in p.text) == (template != "direct")
    assert "letter" in p.text


def test_yesno_and_open_instructions_have_no_options():
    img = Image.new("RGB", (8, 8))
    yn = VQARecord(id="y", images=[img], question="Is there a fracture?", answer_text="yes", answer_type="yesno")
    op = VQARecord(id="o", images=[img], question="Which organ?", answer_text="liver", answer_type="open")
    assert "yes or no" in record_to_prompt(yn)[0].text and "A)" not in record_to_prompt(yn)[0].text
    assert "short answer" in record_to_prompt(op, template="nothink")[0].text


def test_image_paths_are_loaded(tmp_path):
    path = tmp_path / "im age.png"
    Image.new("L", (10, 12), 7).save(path)
    r = mc()
    r.images = [str(path)]
    p, _ = record_to_prompt(r)
    assert p.images[0].size == (10, 12) and p.images[0].mode == "RGB"


def test_bad_template_name():
    with pytest.raises(ValueError, match="template must be one of"):
        record_to_prompt(mc(), template="cot")


def test_shuffle_remaps_gold_and_keeps_texts():
    for i in range(30):
        r = mc(id=f"r{i}", n=5, gold="ABCDE"[i % 5])
        s = shuffle_record_options(r, seed=1)
        assert sorted(s.options.values()) == sorted(r.options.values())
        assert list(s.options) == list("ABCDE")
        assert s.options[s.answer_letter] == r.options[r.answer_letter]         # gold text follows its letter
        assert [r.options[L] for L in s.extra["option_order"]] == list(s.options.values())
        assert r.options == mc(id=f"r{i}", n=5, gold="ABCDE"[i % 5]).options   # input not mutated


def test_shuffle_is_deterministic_per_seed_and_id_and_varies():
    r = mc(n=4)
    a = shuffle_record_options(r, seed=3).extra["option_order"]
    assert a == shuffle_record_options(r, seed=3).extra["option_order"]
    orders = {tuple(shuffle_record_options(mc(id=f"x{i}"), seed=3).extra["option_order"]) for i in range(40)}
    assert len(orders) > 5                                              # different items, different orders
    golds = {shuffle_record_options(mc(id=f"x{i}", gold="A"), seed=3).answer_letter for i in range(40)}
    assert golds == set("ABCD")


def test_prompt_and_shown_record_agree_after_shuffle():
    prompts, shown = records_to_prompts([mc(id=f"q{i}") for i in range(6)], shuffle_options=True, seed=0)
    for p, s in zip(prompts, shown):
        assert f"{s.answer_letter}) option c" in p.text


def test_shuffle_leaves_non_mc_alone():
    yn = VQARecord(id="y", images=[], question="q", answer_text="no", answer_type="yesno")
    assert shuffle_record_options(yn, seed=0) is yn
