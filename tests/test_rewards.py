"""Rewards: parsers (with hypothesis properties), format, accuracy, length rewards, judge, combiner."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from numerics import tol

from grpo_core.data import VQARecord
from grpo_core.rewards import (
    REWARDS,
    RewardSpec,
    accuracy_graded_reward,
    accuracy_reward,
    combine_rewards,
    cosine_length_reward,
    cwr_reward,
    ecr_reward,
    extract_answer,
    extract_think,
    format_nothink_reward,
    format_reward,
    get_reward,
    normalize_open,
    reasoning_length,
    token_f1,
)

pytestmark = pytest.mark.numerics   # also run under other CPUs' kernel paths (make test-numerics)


def mc(gold="B"):
    return VQARecord(id="m", images=[], question="Where?", options={L: L.lower() for L in "ABCD"}, answer_letter=gold)


def yn(ans="Yes"):
    return VQARecord(id="y", images=[], question="Is it?", answer_text=ans, answer_type="yesno")


def op(ans="left lung"):
    return VQARecord(id="o", images=[], question="Which?", answer_text=ans, answer_type="open")


def fmt(think, answer):
    return f"<think>{think}</think><answer>{answer}</answer>"


# ---------------------------------------------------------------------------------------------
# Parsers
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("<answer> B </answer>", "B"),
    ("<ANSWER>b</Answer>", "b"),                                   # tags case-insensitive
    ("<think>x</think>\n<answer>\n C \n</answer>", "C"),            # spans newlines, stripped
    ("<answer>A</answer><answer>B</answer>", "A"),                  # repeated: the first pair
    ("<answer><answer>A</answer></answer>", "A"),                   # nested: the inner pair
    ("<answer>A", None), ("A</answer>", None), ("plain B", None),    # incomplete / missing
    ("<answer></answer>", ""),
])
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_extract_answer_fallback_and_think():
    assert extract_answer("  B. ", require_tag=False) == "B."
    assert extract_answer("<answer>C</answer> tail", require_tag=False) == "C"
    assert extract_think("<think> a b </think><answer>A</answer>") == " a b "
    assert extract_think("<answer>A</answer>") is None
    assert reasoning_length(fmt("one two  three\nfour", "A")) == 4
    assert reasoning_length("<answer>A</answer>") == 0 and reasoning_length(fmt("   ", "A")) == 0


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_parsers_never_crash_on_arbitrary_text(s):
    a = extract_answer(s)
    assert a is None or (isinstance(a, str) and a == a.strip())
    assert extract_answer(s, require_tag=False) is not None
    assert reasoning_length(s) >= 0
    assert format_reward([s]) [0] in (0.0, 1.0) and format_nothink_reward([s])[0] in (0.0, 1.0)
    for r in (mc(), yn(), op()):
        v = accuracy_reward([s], [r])[0]
        assert 0.0 <= v <= 1.0
        assert accuracy_graded_reward([s], [r])[0] in (0.0, 0.5, 1.0) or r.answer_type != "mc"


_tagless = st.text(alphabet=st.characters(blacklist_characters="<>"), max_size=40)


@settings(max_examples=200, deadline=None)
@given(_tagless, _tagless, st.text(alphabet=" \n\t", max_size=3), st.text(alphabet=" \n\t", max_size=3))
def test_format_accepts_any_tag_free_content_with_surrounding_whitespace(think, answer, pre, post):
    text = pre + fmt(think, answer) + post
    assert format_reward([text]) == [1.0]
    assert extract_answer(text) == answer.strip()
    assert extract_think(text) == think
    assert format_nothink_reward([pre + f"<answer>{answer}</answer>" + post]) == [1.0]


@settings(max_examples=200, deadline=None)
@given(_tagless, _tagless, _tagless.filter(lambda s: s.strip() != ""))
def test_format_rejects_text_outside_tags(think, answer, junk):
    assert format_reward([junk + fmt(think, answer)]) == [0.0]
    assert format_reward([fmt(think, answer) + junk]) == [0.0]


@pytest.mark.parametrize("text", [
    "<think>a</think><answer>B</answer><answer>C</answer>",      # repeated answer block
    "<think>a</think><think>b</think><answer>B</answer>",        # repeated think block
    "<think>a <think>b</think></think><answer>B</answer>",       # nested think
    "<think>a</think><answer><answer>B</answer></answer>",       # nested answer
    "<answer>B</answer><think>a</think>",                        # wrong order
    "<think>a</think>x<answer>B</answer>",                       # text between blocks
    "<THINK>a</THINK><ANSWER>B</ANSWER>",                        # format tags are case-sensitive
    "<think>a</think>", "<answer>B</answer>", "",
])
def test_format_reward_rejects(text):
    assert format_reward([text]) == [0.0]


def test_format_nothink():
    assert format_nothink_reward(["<answer>B</answer>", " <answer> B </answer>\n", fmt("a", "B"),
                                  "<answer>A</answer><answer>B</answer>"]) == [1.0, 1.0, 0.0, 0.0]


# ---------------------------------------------------------------------------------------------
# Accuracy
# ---------------------------------------------------------------------------------------------

def test_accuracy_mc_strict_and_graded():
    texts = [fmt("x", "B"), fmt("x", " b "), fmt("x", "B) b"), fmt("x", "A"), fmt("x", "B or C"), "B", fmt("x", "(B)")]
    recs = [mc("B")] * len(texts)
    assert accuracy_reward(texts, recs) == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    # MedVLM-R1: upper-case, then the letters A-J; one and equal to gold; 1.0 alone, 0.5 with extra
    # text. " b " → "B" → 1.0; "B) b" → "B) B" has two → 0; no tags → 0; "(B)" → 0.5
    assert accuracy_graded_reward(texts, recs) == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.5]
    assert accuracy_reward(["B", "(b).", " b)"], [mc("B")] * 3, require_tag=False) == [1.0, 1.0, 1.0]


def test_accuracy_yesno_normalised():
    texts = ["<answer>yes</answer>", "<answer> YES. </answer>", "<answer>No</answer>",
             "<answer>Yes, there is</answer>", "yes"]
    assert accuracy_reward(texts, [yn("Yes")] * 5) == [1.0, 1.0, 0.0, 0.0, 0.0]
    assert accuracy_reward(["<answer>是的</answer>", "<answer>no</answer>"], [yn("yes"), yn("不是")]) == [1.0, 1.0]


def test_accuracy_open_exact_and_f1():
    texts = ["<answer>The Left Lung.</answer>", "<answer>left</answer>", "<answer>right kidney</answer>"]
    assert accuracy_reward(texts, [op()] * 3) == [1.0, 0.0, 0.0]
    f1 = accuracy_reward(texts, [op()] * 3, open_metric="f1")
    assert f1[0] == 1.0 and f1[1] == pytest.approx(2 * 1 * 0.5 / 1.5) and f1[2] == 0.0
    assert normalize_open("  The  Left, lung! ") == "left lung"
    assert token_f1("腹部", "腹部") == 1.0 and token_f1("胸部", "腹部") == pytest.approx(0.5)


def test_accuracy_needs_matching_lengths_and_known_type():
    with pytest.raises(ValueError, match="2 completions but 1 records"):
        accuracy_reward(["a", "b"], [mc()])
    bad = VQARecord(id="z", images=[], question="q", answer_type="essay")
    with pytest.raises(ValueError, match="unknown answer_type"):
        accuracy_reward(["<answer>x</answer>"], [bad])


# ---------------------------------------------------------------------------------------------
# Length rewards
# ---------------------------------------------------------------------------------------------

def words(n):
    return " ".join(["w"] * n)


def test_ecr_and_cwr():
    texts = [fmt(words(5), "B"), fmt(words(20), "B"), fmt(words(5), "A"), "<answer>B</answer>"]
    recs = [mc("B")] * 4
    assert ecr_reward(texts, recs, target_len=10) == [0.5, 1.0, 0.5, 0.0]      # capped at 1, answer ignored
    assert cwr_reward(texts, recs, target_len=10) == [0.5, 1.0, 0.0, 0.0]      # only when correct
    with pytest.raises(ValueError, match="target_len"):
        ecr_reward(texts, recs, target_len=0)


class WordPieces:
    """A stand-in tokenizer: each character is a token."""

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": list(range(len(text)))}


def test_length_with_tokenizer_and_completion_measure():
    t = fmt("ab cd", "B")
    assert ecr_reward([t], [mc()], target_len=10, tokenizer=WordPieces()) == [0.5]   # "ab cd" = 5 chars
    assert ecr_reward(["a b c " + t], [mc()], target_len=100, measure="completion") == [5 / 100]


def test_cosine_length_matches_formula():
    L = 100
    def expect(t, a, b):
        return b + 0.5 * (a - b) * (1 + math.cos(math.pi * t / L))
    texts = [fmt(words(0), "B"), fmt(words(50), "B"), fmt(words(50), "A"), fmt(words(99), "A"), fmt(words(100), "B")]
    got = cosine_length_reward(texts, [mc("B")] * 5, max_len=L)
    assert got == pytest.approx([2.0, expect(50, 2, 1), expect(50, -10, 0), expect(99, -10, 0), -10.0])
    # shorter correct answers earn more; longer wrong answers are punished less
    assert got[0] > got[1] and got[3] > got[2]


# ---------------------------------------------------------------------------------------------
# Combiner and registry
# ---------------------------------------------------------------------------------------------

def test_combine_rewards_weighted_sum_and_columns():
    texts = [fmt("a", "B"), fmt("a", "A"), "B"]
    recs = [mc("B")] * 3
    specs = [RewardSpec("format", format_reward, 0.5), RewardSpec("accuracy", accuracy_reward, 1.0)]
    total, cols = combine_rewards(specs, texts, recs)
    assert total.dtype == torch.float32 and total.shape == (3,)
    assert torch.equal(cols["format"], torch.tensor([1.0, 1.0, 0.0]))
    assert torch.equal(cols["accuracy"], torch.tensor([1.0, 0.0, 0.0]))
    assert torch.allclose(total, 0.5 * cols["format"] + cols["accuracy"])


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_combine_rewards_rejects_non_finite_naming_the_reward(bad):
    spec = RewardSpec("broken", lambda c, r: [1.0, bad], 1.0)
    with pytest.raises(ValueError, match=r"reward 'broken' returned NaN/inf at completions \[1\]"):
        combine_rewards([spec], ["a", "b"], [mc(), mc()])


def test_combine_rewards_wrong_length_and_duplicate_names():
    with pytest.raises(ValueError, match="returned 1 values for 2"):
        combine_rewards([RewardSpec("short", lambda c, r: [1.0], 1.0)], ["a", "b"], [mc(), mc()])
    with pytest.raises(ValueError, match="unique"):
        combine_rewards([RewardSpec("f", format_reward), RewardSpec("f", format_reward)], ["a"], [mc()])


def test_registry_names_and_options():
    assert set(REWARDS) == {"format", "format_nothink", "accuracy", "accuracy_graded", "ecr", "cwr",
                            "cosine_length", "overlong", "semantic_judge"}
    t = [fmt(words(5), "B) x")]
    assert get_reward("accuracy")(t, [mc()]) == [0.0]
    assert get_reward("accuracy_graded")(t, [mc()]) == [0.5]      # "B) X": one letter, extra text
    assert get_reward("ecr", target_len=20)(t, [mc()]) == [0.25]
    assert get_reward("format")(t, [mc()]) == [1.0]
    with pytest.raises(ValueError, match="known rewards"):
        get_reward("bleu")
    with pytest.raises(ValueError, match="model_path"):
        get_reward("semantic_judge")


# ---------------------------------------------------------------------------------------------
# LLM judge (tiny random Qwen2 from grpo_models.tiny)
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def judge_parts(tiny_text_lm_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_text_lm_path)
    model = AutoModelForCausalLM.from_pretrained(tiny_text_lm_path, dtype=torch.float64)   # fp64: numerics.py
    return model, tok


def test_judge_prob_matches_unbatched_reference(judge_parts):
    from grpo_core.rewards_judge import LLMJudgeReward

    model, tok = judge_parts
    judge = LLMJudgeReward(model, tok, mode="prob", batch_size=3, yes_token="Yes", no_token="No")
    texts = [fmt("the lesion is bright in the upper left", "A"), fmt("x", "B"), "<answer>A</answer>",
             fmt("a much longer chain of reasoning about the chest image and the lung " * 3, "C"), fmt("  ", "A")]
    recs = [mc("A")] * len(texts)
    got = judge(texts, recs)
    assert got[2] == 0.0 and got[4] == 0.0                               # no / empty reasoning: no judge call
    yes, no = tok.encode("Yes", add_special_tokens=False)[0], tok.encode("No", add_special_tokens=False)[0]
    for i in (0, 1, 3):                                                  # one prompt at a time, no padding
        ids = torch.tensor([tok.encode(judge.build_prompt(texts[i], recs[i]), add_special_tokens=False)])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, -1]
        p = torch.softmax(logits[[yes, no]], dim=0)[0].item()
        # padded batch vs one prompt: equal in fp64 up to ~1e-15, then rounded to fp32 once
        assert got[i] == pytest.approx(p, abs=tol(torch.float32, 1.0, k=4)), f"row {i}: batched {got[i]} vs single {p}"
    binary = LLMJudgeReward(model, tok, mode="binary", batch_size=2, yes_token="Yes", no_token="No")(texts, recs)
    assert binary == [float(g > 0.5) if i not in (2, 4) else 0.0 for i, g in enumerate(got)]


def test_judge_prompt_holds_question_options_reasoning(judge_parts):
    from grpo_core.rewards_judge import LLMJudgeReward

    model, tok = judge_parts
    judge = LLMJudgeReward(model, tok, yes_token="Yes", no_token="No")
    p = judge.build_prompt(fmt("bright spot top left", "A"), mc("A"))
    assert "Where?" in p and "A) a\nB) b" in p and "bright spot top left" in p and p.endswith("Reply:")


def test_judge_multi_token_word_is_a_clear_error(judge_parts):
    from grpo_core.rewards_judge import LLMJudgeReward

    model, tok = judge_parts
    with pytest.raises(ValueError, match=r"' yes' is \d+ tokens"):
        LLMJudgeReward(model, tok, yes_token=" yes", no_token="No")


def test_judge_through_registry_from_local_path(tiny_text_lm_path):
    fn = get_reward("semantic_judge", model_path=tiny_text_lm_path, yes_token="Yes", no_token="No", mode="prob")
    out = fn([fmt("reasoning here", "A")], [mc("A")])
    assert len(out) == 1 and 0.0 < out[0] < 1.0


# ---------------------------------------------------------------------------------------------
# MedVLM-R1's graded accuracy, reproduced
# ---------------------------------------------------------------------------------------------

def medvlm_restated(completion, gold):
    """MedVLM-R1 accuracy_reward, restated: their answer span, upper-case, count A–J by hand."""
    import re

    m = re.search(r"<answer>(.*?)</answer>", completion, flags=re.DOTALL | re.IGNORECASE)
    text = m.group(1).strip() if m else ""
    found = [ch for ch in text.upper() if ch in "ABCDEFGHIJ"]
    if not text or len(found) != 1 or found[0] != "".join(gold.upper().split()):
        return 0.0
    i = next(k for k, ch in enumerate(text) if ch.upper() == found[0] and ch.lower() == found[0].lower())
    return 0.5 if (text[:i] + text[i + 1:]).strip() else 1.0


@pytest.mark.parametrize("answer, want", [
    ("a", 1.0), ("A is correct", 0.0), ("A, because", 0.0),     # the cases, gold "A"
    ("A", 1.0), (" (a) ", 0.5), ("A.", 0.5), ("Answer: A", 0.0), ("xyz a", 0.5), ("B", 0.0), ("", 0.0),
])
def test_graded_accuracy_is_medvlm_r1s(answer, want):
    text = fmt("x", answer)
    assert accuracy_graded_reward([text], [mc("A")]) == [want]
    assert medvlm_restated(text, "A") == want


def test_graded_accuracy_reads_the_answer_their_way():
    # nested opening: theirs reads "<answer>A" (letters A, E, A) → 0; a missing pair → 0
    assert accuracy_graded_reward(["<answer><answer>A</answer></answer>", "A"], [mc("A")] * 2) == [0.0, 0.0]
    # the direct (no-tag) template is our extension: the whole text is read
    assert accuracy_graded_reward(["a"], [mc("A")], require_tag=False) == [1.0]


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("abcjkAJBZ .,()<>/answerANSWER\n")), max_size=30), st.sampled_from("ABJ"))
def test_graded_accuracy_matches_restatement_on_any_text(s, gold):
    for text in (s, f"<answer>{s}</answer>", f"<think>t</think><answer>{s}</answer>tail"):
        assert accuracy_graded_reward([text], [mc(gold)]) == [medvlm_restated(text, gold)], text


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("ab c d 胸部.,")), max_size=40),
       st.text(alphabet=st.sampled_from(list("ab c d 胸部.,")), max_size=40))
def test_token_f1_equals_the_quadratic_definition(a, g):
    from grpo_core.rewards import _tokens

    ta, tg = _tokens(a), _tokens(g)
    if not ta or not tg:
        want = float(ta == tg)
    else:
        common = sum(min(ta.count(t), tg.count(t)) for t in set(ta))
        want = 0.0 if common == 0 else (2 * (common / len(ta)) * (common / len(tg))
                                        / (common / len(ta) + common / len(tg)))
    assert token_f1(a, g) == pytest.approx(want, rel=1e-12)


# ---------------------------------------------------------------------------------------------
# The judge: template checked at construction, tokens capped, logits checked
# ---------------------------------------------------------------------------------------------

class FakeJudge(torch.nn.Module):
    """Returns the logits it is given (b, T, V) for any input; records the input lengths."""

    def __init__(self, fill, vocab):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.fill, self.vocab, self.lengths = fill, vocab, []

    def forward(self, input_ids, attention_mask=None, position_ids=None):
        from types import SimpleNamespace

        self.lengths.append(input_ids.shape[1])
        return SimpleNamespace(logits=torch.full((*input_ids.shape, self.vocab), self.fill))


@pytest.mark.parametrize("template, match", [
    ("{question} {reasonig} Reply:", r"placeholder \{reasonig\} \(did you mean \{reasoning\}\?\)"),
    ("{question} {reasoning} {}", r"placeholder \{\}"),
    ("{question} {reasoning} {", "not a valid format string"),
    ("{question} only", r"must contain \{reasoning\}"),
])
def test_judge_template_checked_at_construction(judge_parts, template, match):
    from grpo_core.rewards_judge import LLMJudgeReward

    model, tok = judge_parts
    with pytest.raises(ValueError, match=match):
        LLMJudgeReward(model, tok, prompt_template=template, yes_token="Yes", no_token="No")


def test_judge_nonfinite_and_narrow_logits_are_errors(judge_parts):
    from grpo_core.rewards_judge import LLMJudgeReward

    _, tok = judge_parts
    texts, recs = [fmt("some reasoning", "A")], [mc("A")]
    for fill in (float("nan"), float("inf")):
        judge = LLMJudgeReward(FakeJudge(fill, len(tok)), tok, yes_token="Yes", no_token="No")
        with pytest.raises(ValueError, match="non-finite Yes/No logits .* for prompt 0"):
            judge(texts, recs)
    judge = LLMJudgeReward(FakeJudge(0.0, 5), tok, yes_token="Yes", no_token="No")
    with pytest.raises(ValueError, match=r"logits of shape \(1, \d+, 5\) for a batch of 1; expected .* V >= \d+"):
        judge(texts, recs)


def test_judge_returning_a_tuple_is_a_clear_error(judge_parts):
    from grpo_core.rewards_judge import LLMJudgeReward

    _, tok = judge_parts
    fake = FakeJudge(0.0, len(tok))
    tuple_judge = lambda **kw: (fake(**kw).logits,)        # noqa: E731  (as return_dict=False)
    tuple_judge.eval, tuple_judge.parameters = (lambda: tuple_judge), fake.parameters
    judge = LLMJudgeReward(tuple_judge, tok, yes_token="Yes", no_token="No")
    with pytest.raises(ValueError, match=r"the judge model returned a tuple, not an output with"):
        judge([fmt("some reasoning", "A")], [mc("A")])


def test_judge_prompt_is_capped_in_tokens(judge_parts):
    from grpo_core.rewards_judge import LLMJudgeReward

    _, tok = judge_parts
    fake = FakeJudge(0.0, len(tok))
    judge = LLMJudgeReward(fake, tok, yes_token="Yes", no_token="No", max_reasoning_tokens=50,
                           max_answer_tokens=8, max_prompt_tokens=200)
    n = lambda s: len(tok.encode(s, add_special_tokens=False))              # noqa: E731
    one_word = "x" * 32_000                                                  # one "word", thousands of tokens
    empty = n(judge.build_prompt(fmt(".", "A"), mc("A")))
    capped = n(judge.build_prompt(fmt(one_word, "B" * 5000), mc("A")))
    assert n(one_word) > 1000 and capped <= empty + 50 + 8 + 4              # + a few tokens at the cut edges
    long_q = VQARecord(id="q", images=[], question="why " * 5000, options={}, answer_letter="A")
    judge([fmt("short reasoning", "A")], [long_q])
    assert fake.lengths == [200]                                             # the prompt's last 200 tokens


def test_medvlm_reading_is_their_regex_in_linear_time():
    """extract_answer_medvlm against MedVLM-R1's regex (the plain reference) on tag soups, and
    linear on repeated unclosed openings (the regex took 32-39 s on 125k characters)."""
    import random
    import re
    import time

    from grpo_core.answers import extract_answer_medvlm

    theirs = re.compile(r"<answer>(.*?)</answer>", re.DOTALL | re.IGNORECASE)
    parts = ["<answer>", "</answer>", "<ANSWER>", "</Answer>", "A", " b ", "\n", "<think>",
             "<answer"]
    rng = random.Random(0)
    for _ in range(2000):
        text = "".join(rng.choice(parts) for _ in range(rng.randint(0, 12)))
        m = theirs.search(text)
        assert extract_answer_medvlm(text) == (m.group(1).strip() if m else None), text
    for soup in ("<answer>" * 15625, "<answer>A" * 12500, "<think><answer>" * 8929):
        t0 = time.perf_counter()
        assert accuracy_graded_reward([soup], [mc("A")]) == [0.0]
        assert time.perf_counter() - t0 < 2.0                   # quadratic: ~30 s; linear: ~0.01 s
