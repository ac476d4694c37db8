"""docs/CONFIG.md is generated from the config dataclasses and kept in sync (grpo_app.config_doc)."""

import dataclasses

import pytest

from grpo_app import config_doc
from grpo_core.config import TrainConfig


def test_committed_reference_matches_the_code():
    with open(config_doc.DOC_PATH, encoding="utf-8") as f:
        committed = f.read()
    assert committed == config_doc.render(), "docs/CONFIG.md is stale: run python -m grpo_app.config_doc"


def test_every_leaf_key_is_documented_once():
    keys = [r[0] for r in config_doc.rows(TrainConfig())]
    assert len(keys) == len(set(keys))
    for expected in ("run.log_completions", "run.report_to", "warmup.steps", "sft.optim.lr", "rollout.top_p"):
        assert expected in keys
    text = config_doc.render()
    for k in keys:
        assert f"| `{k}` |" in text


def test_a_field_without_a_comment_is_an_error():
    @dataclasses.dataclass
    class Undocumented:
        documented: int = 1   # has its one line
        bare: int = 2

    with pytest.raises(ValueError, match="Undocumented.bare has no comment"):
        config_doc.rows(Undocumented())
    assert config_doc.field_comments(Undocumented) == {"documented": "has its one line", "bare": ""}


def test_defaults_and_allowed_values_come_from_the_declarations():
    rows = {r[0]: r for r in config_doc.rows(TrainConfig())}
    assert rows["sft.optim.lr"][2] == "`0.0003`"                   # SFTConfig's own optimizer default
    assert rows["grpo.agg"][3] == "`token_mean`, `seq_mean`, `constant`"
    assert rows["rollout.top_p"][3] == "> 0; ≤ 1"
    assert rows["model.min_pixels"][1] == "int \\| null" and rows["model.min_pixels"][2] == "`null`"
