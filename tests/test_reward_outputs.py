"""A reward's return value and options are checked (grpo_core.rewards_output, rewards_plugins):
a bad reward is refused with its name and the step, never coerced into a wrong score."""

import numpy as np
import pytest
import torch

from grpo_core.data import VQARecord
from grpo_core.rewards import (
    RewardError,
    RewardSpec,
    check_reward_entries,
    combine_rewards,
    get_reward,
)


def rec():
    return VQARecord(
        id="r", images=[], question="Where?", options={"A": "left", "B": "right"}, answer_letter="A"
    )


def run(fn, n=3, step=7):
    return combine_rewards([RewardSpec("mine", fn)], ["a"] * n, [rec()] * n, step=step)


@pytest.mark.parametrize(
    "value, match",
    [
        ({0: 0.5, 1: 0.5, 2: 0.5}, r"returned a dict .* \(a dict is read by its keys"),
        (["0.5", "1", "0"], r"returned a str at completion 0 \('0.5'; 3 of 3"),
        ([True, False, True], r"returned a bool at completion 0"),
        ([1.0, None, 0.0], r"returned a NoneType at completion 1"),
        (None, r"returned None \(a missing return\?\)"),
        (0.5, r"returned a float 0.5; return a list"),
        ([[1.0], [0.0], [1.0]], r"returned a list at completion 0"),
        ([1.0, 0.0], r"returned 2 values for 3 completions"),
        ([1.0, float("nan"), 0.0], r"returned NaN/inf at completions \[1\]"),
        ([1.0, 10**400, 0.0], r"returned NaN/inf at completions \[1\]"),
        (torch.ones(3, 1), r"returned a Tensor of shape \(3, 1\)"),
        (torch.ones(3, dtype=torch.bool), r"returned booleans"),
        (np.array([True, False, True]), r"returned booleans"),
        ([np.bool_(True)] * 3, r"returned a bool at completion 0"),
        ("abc", r"returned a str 'abc'; return a list"),
    ],
)
def test_bad_return_values_are_refused_naming_reward_and_step(value, match):
    with pytest.raises(RewardError, match=r"^step 7: reward 'mine' " + match):
        run(lambda c, r: value)


@pytest.mark.parametrize(
    "value",
    [
        [1, 0.5, -2],
        (1.0, 0.0, 1.0),
        torch.tensor([1.0, 0.5, -2.0]),
        np.array([1, 0, 1]),
        [np.float32(0.5), np.int64(1), torch.tensor(2.0)],
    ],
)
def test_good_return_values_are_columns(value):
    total, cols = run(lambda c, r: value)
    ref = torch.tensor([float(v) for v in value], dtype=torch.float32)  # plain reference
    assert torch.equal(cols["mine"], ref) and torch.equal(total, ref)


def test_errors_inside_a_reward_are_named_with_where_they_came_from():
    def broken(completions, records):
        raise ValueError("gold answer missing")

    with pytest.raises(
        RewardError,
        match=r"^step 3: reward 'mine' raised ValueError: gold answer missing "
        r"\(at .*test_reward_outputs.py:\d+\)",
    ) as info:
        run(broken, step=3)
    assert isinstance(info.value.__cause__, ValueError)  # traceback kept, chained
    with pytest.raises(
        RewardError, match=r"^reward 'mine' raised KeyError"
    ):  # no step given: no prefix
        combine_rewards([RewardSpec("mine", lambda c, r: {}["k"])], ["a"], [rec()])


@pytest.mark.parametrize(
    "entry, match",
    [
        (
            {"name": "cosine_length", "r0_correct": "big"},
            r"r0_correct: reward 'cosine_length' takes a finite number",
        ),
        (
            {"name": "cosine_length", "r0_correct": float("nan")},
            r"r0_correct: .* takes a finite number here, got nan",
        ),
        (
            {"name": "ecr", "target_len": 2.5},
            r"target_len: reward 'ecr' takes an integer here, got 2.5",
        ),
        ({"name": "ecr", "target_len": True}, r"target_len: .* takes an integer here, got True"),
        (
            {"name": "accuracy", "require_tag": "yes"},
            r"require_tag: reward 'accuracy' takes true/false",
        ),
        ({"name": "ecr", "measure": 3}, r"measure: reward 'ecr' takes a string here, got 3"),
        (
            {"name": "semantic_judge", "model_path": 3},
            r"model_path: .* takes a string or null here, got 3",
        ),
        (
            {"name": "semantic_judge", "model_path": "x", "batch_size": "8"},
            r"batch_size: .* takes an integer",
        ),
    ],
)
def test_reward_options_are_type_checked_at_load(entry, match):
    with pytest.raises(ValueError, match=r"grpo.rewards\[0\]." + match):
        check_reward_entries([entry])


def test_a_float_option_written_as_yaml_string_is_a_number():
    check_reward_entries([{"name": "cosine_length", "r0_correct": "1e-3", "max_len": 8}])
    fn = get_reward("cosine_length", r0_correct="1e-3", max_len=8)
    assert fn.keywords == {"r0_correct": 1e-3, "max_len": 8}


def test_the_trainer_names_the_step_of_a_bad_reward(tiny_vlm_path, tmp_path):
    """Fault injection: a reward that goes bad at its 2nd call stops the run at step 2, named."""
    from helpers import tiny_policy

    from grpo_core.config import TrainConfig
    from grpo_core.data import make_synthetic_vqa
    from grpo_core.trainer import GRPOTrainer

    calls = []

    def goes_bad(completions, records):
        calls.append(1)
        return (
            [0.5] * len(completions)
            if len(calls) < 2
            else {i: 0.5 for i in range(len(completions))}
        )

    cfg = TrainConfig()
    cfg.rollout.group_size, cfg.rollout.prompts_per_step, cfg.rollout.max_new_tokens = 2, 1, 2
    cfg.grpo.beta, cfg.run.steps, cfg.run.progress, cfg.run.output_dir = (
        0.0,
        3,
        False,
        str(tmp_path),
    )
    tr = GRPOTrainer(
        tiny_policy(tiny_vlm_path),
        make_synthetic_vqa(4, seed=0),
        cfg,
        reward_specs=[RewardSpec("goes_bad", goes_bad)],
    )
    with pytest.raises(RewardError, match=r"^step 2: reward 'goes_bad' returned a dict"):
        tr.train()
