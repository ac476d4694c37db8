"""Rewards from configs: your own function by 'module:function', options checked against its
signature when the config loads (check_reward_entries), context keywords (completion_tokens)."""

import os
import sys
import textwrap

import pytest

from grpo_core.config import load_config
from grpo_core.data import VQARecord
from grpo_core.rewards import (
    RewardSpec,
    check_reward_entries,
    combine_rewards,
    get_reward,
    overlong_reward,
)

ROOT = os.path.join(os.path.dirname(__file__), "..")
EXAMPLE = os.path.join(ROOT, "examples", "custom_reward.py")


def rec():
    return VQARecord(id="r", images=[], question="Where?", options={"A": "left", "B": "right"}, answer_letter="A")


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """An importable package 'myrewards' with a reward that needs an option and one with **kwargs."""
    pkg = tmp_path / "myrewards"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "scores.py").write_text(textwrap.dedent('''
        def length_bonus(completions, records, *, per_char, cap=1.0):
            return [min(cap, per_char * len(c)) for c in completions]

        def anything(completions, records, **options):
            return [float(len(options))] * len(completions)

        def one_arg(completions):
            return [0.0] * len(completions)

        class NotAFunction:
            pass
    '''))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "myrewards.scores"
    for name in [m for m in sys.modules if m.startswith("myrewards")]:
        del sys.modules[name]


def test_module_spec_builds_and_scores(user_module):
    entries = [{"name": "accuracy", "weight": 1.0},
               {"name": f"{user_module}:length_bonus", "weight": 0.5, "role": "format", "per_char": 0.1}]
    check_reward_entries(entries)
    fn = get_reward(f"{user_module}:length_bonus", per_char=0.1)
    assert fn(["abc", "a" * 20], [rec(), rec()]) == pytest.approx([0.3, 1.0])
    check_reward_entries([{"name": f"{user_module}:anything", "any": 1, "thing": 2}])    # **kwargs: any option


def test_file_spec_and_the_example_config(monkeypatch):
    monkeypatch.chdir(ROOT)                        # file specs are relative to where grpo runs
    cfg = load_config("examples/configs/synthetic_custom_reward.yaml")
    check_reward_entries(cfg.grpo.rewards)
    entry = dict(cfg.grpo.rewards[2])
    fn = get_reward(entry.pop("name"), **{k: v for k, v in entry.items() if k not in ("weight", "role")})
    texts = ["<think>the lesion is in the upper left quadrant</think><answer>A</answer>",
             "<think>a bright spot</think><answer>A</answer>", "<answer>A</answer>"]
    assert fn(texts, [rec()] * 3) == [1.0, 0.0, 0.0]
    assert get_reward(f"{EXAMPLE}:reasoning_mentions", words=["lesion"])(texts, [rec()] * 3) == [1.0, 0.0, 0.0]


@pytest.mark.parametrize("entry,match", [
    ({"name": "acuracy"}, r"grpo.rewards\[0\].name: unknown reward 'acuracy'; did you mean 'accuracy'\?"),
    ({"name": "accuracy", "requre_tag": False}, r"grpo.rewards\[0\].requre_tag: reward 'accuracy' has no option "
                                                r"'requre_tag' \(did you mean 'require_tag'\?\)"),
    ({"name": "ecr", "target_len": 10, "weight": "high"}, r"grpo.rewards\[0\].weight: must be a finite number"),
    ({"name": "overlong", "max_len": 8}, r"grpo.rewards\[0\]: reward 'overlong' needs option\(s\) \['buffer'\]"),
    ({"name": "overlong", "max_len": 8, "buffer": 2, "completion_tokens": [1]},
     r"completion_tokens: filled in by the trainer"),
    ({"name": "semantic_judge", "mode": "prob"}, r"semantic_judge needs model_path"),
    ({"name": "semantic_judge", "model_path": "x", "max_reasoning_word": 3}, r"did you mean 'max_reasoning_words'"),
    ({"weight": 1.0}, r"grpo.rewards\[0\]: must be a mapping with a name"),
    ({"name": "format", "role": "acc"}, r"grpo.rewards\[0\].role: 'acc' is not one of \('accuracy', 'format'\)"),
    ({"name": "mypkg.rewards:"}, r"'mypkg.rewards:' is not a reward spec"),
    ({"name": ":fn"}, r"is not a reward spec"),
    ({"name": "no_such_pkg_xyz.mod:fn"}, r"cannot import reward module 'no_such_pkg_xyz.mod'"),
    ({"name": "missing/file.py:fn"}, r"reward file 'missing/file.py' does not exist"),
])
def test_entry_errors_name_index_and_key(entry, match):
    with pytest.raises(ValueError, match=match):
        check_reward_entries([entry])


def test_entry_errors_in_user_code(user_module):
    with pytest.raises(ValueError, match=r"grpo.rewards\[1\].name: module 'myrewards.scores' has no function "
                                         r"'length_bonu' \(did you mean 'length_bonus'\?\)"):
        check_reward_entries([{"name": "format"}, {"name": f"{user_module}:length_bonu", "per_char": 1}])
    with pytest.raises(ValueError, match=r"grpo.rewards\[0\].per_chr: .* \(did you mean 'per_char'\?\)"):
        check_reward_entries([{"name": f"{user_module}:length_bonus", "per_chr": 1}])
    with pytest.raises(ValueError, match=r"needs option\(s\) \['per_char'\]"):
        check_reward_entries([{"name": f"{user_module}:length_bonus"}])
    with pytest.raises(ValueError, match=r"takes 1 positional parameter\(s\); a reward takes \(completions, records\)"):
        check_reward_entries([{"name": f"{user_module}:one_arg"}])
    with pytest.raises(ValueError, match="is a type, not a function"):
        check_reward_entries([{"name": f"{user_module}:NotAFunction"}])
    with pytest.raises(ValueError, match=r"grpo.rewards\[1\].name: 'format' is also entry 0"):
        check_reward_entries([{"name": "format"}, {"name": "format", "weight": 2.0}])
    with pytest.raises(ValueError, match="non-empty list"):
        check_reward_entries([])


def test_overlong_by_hand():
    # max_len 10, buffer 4: 0 up to 6 tokens, then (6 − L)/4: 7 → −0.25, 8 → −0.5, 10 → −1, beyond → −1
    got = overlong_reward(["x"] * 6, None, max_len=10, buffer=4, completion_tokens=[0, 6, 7, 8, 10, 25])
    assert got == [0.0, 0.0, -0.25, -0.5, -1.0, -1.0]
    assert overlong_reward(["a b c d e f g h"], None, max_len=10, buffer=4) == [-0.5]   # 8 words without counts
    with pytest.raises(ValueError, match="0 < buffer <= max_len"):
        overlong_reward(["x"], None, max_len=4, buffer=5)


def test_combine_rewards_passes_completion_tokens_to_who_asks():
    spec_o = RewardSpec("overlong", get_reward("overlong", max_len=10, buffer=4), 1.0)
    spec_f = RewardSpec("format", get_reward("format"), 1.0)              # does not ask: not given
    texts = ["one two", "<think>a</think><answer>A</answer>"]
    total, cols = combine_rewards([spec_o, spec_f], texts, [rec(), rec()], completion_tokens=[9, 3])
    assert cols["overlong"].tolist() == [-0.75, 0.0] and cols["format"].tolist() == [0.0, 1.0]
    _, cols = combine_rewards([spec_o], texts, [rec(), rec()])            # no counts: words (2 and 1)
    assert cols["overlong"].tolist() == [0.0, 0.0]
    with pytest.raises(ValueError, match="1 completion_tokens for 2 completions"):
        combine_rewards([spec_o], texts, [rec(), rec()], completion_tokens=[9])
