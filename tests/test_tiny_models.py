"""Tiny offline factories: tokenizer tokens, chat template, determinism, shapes, real 2B config."""

import pytest
import torch
from grpo_models.tiny import SPECIAL_TOKENS, TAG_TOKENS, build_tiny_qwen2_vl, qwen2_vl_2b_config
from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoTokenizer


@pytest.fixture(scope="module")
def tok(tiny_vlm_path):
    return AutoTokenizer.from_pretrained(tiny_vlm_path)


def test_special_tags_and_letters_are_single_tokens(tok):
    for t in SPECIAL_TOKENS + TAG_TOKENS + ["A", "B", "C", "D", " A", " B", " C", " D", "Yes", "No", " Yes", " No"]:
        ids = tok.encode(t, add_special_tokens=False)
        assert len(ids) == 1, f"{t!r} → {tok.convert_ids_to_tokens(ids)}"
    assert 400 <= len(tok) <= 2048
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"


def test_tags_survive_decode_and_text_round_trips(tok):
    text = "<think>The lesion is in the upper left quadrant.</think><answer> B</answer>"
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids, skip_special_tokens=True) == text          # tags are not "special"
    assert tok.decode(tok.encode("<|im_start|>user\nhi<|im_end|>", add_special_tokens=False),
                      skip_special_tokens=True) == "user\nhi"


def test_chat_template_is_qwen_style(tok):
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is shown?"}]}]
    s = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert s == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                 "<|vision_start|><|image_pad|><|vision_end|>What is shown?<|im_end|>\n<|im_start|>assistant\n")


def test_tiny_vlm_config_and_determinism(tiny_vlm_path, tmp_path, tok):
    m = AutoModelForImageTextToText.from_pretrained(tiny_vlm_path)
    cfg = m.config
    assert cfg.image_token_id == tok.convert_tokens_to_ids("<|image_pad|>")
    assert cfg.vision_config.patch_size == 14 and cfg.vision_config.spatial_merge_size == 2
    assert m.lm_head.weight.shape[0] >= len(tok)
    again = AutoModelForImageTextToText.from_pretrained(build_tiny_qwen2_vl(str(tmp_path / "a"), seed=0))
    other = AutoModelForImageTextToText.from_pretrained(build_tiny_qwen2_vl(str(tmp_path / "b"), seed=1))
    sd, sd2, sd3 = m.state_dict(), again.state_dict(), other.state_dict()
    assert all(torch.equal(sd[k], sd2[k]) for k in sd)
    assert any(not torch.equal(sd[k], sd3[k]) for k in sd if sd[k].numel() > 1 and sd[k].std() > 0)


def test_tiny_text_lm_loads_and_runs(tiny_text_lm_path):
    m = AutoModelForCausalLM.from_pretrained(tiny_text_lm_path)
    tok = AutoTokenizer.from_pretrained(tiny_text_lm_path)
    ids = torch.tensor([tok.encode("The answer is A", add_special_tokens=False)])
    logits = m(input_ids=ids).logits
    assert logits.shape == (1, ids.shape[1], m.lm_head.weight.shape[0]) and torch.isfinite(logits).all()


def test_qwen2_vl_2b_config_shapes():
    from transformers import Qwen2VLForConditionalGeneration

    cfg = qwen2_vl_2b_config()
    with torch.device("meta"):
        model = Qwen2VLForConditionalGeneration(cfg)
    n = sum(p.numel() for p in model.parameters())   # tied lm_head counted once
    assert 2.1e9 < n < 2.3e9, n                      # Qwen2-VL-2B: 2.21 B parameters
    assert model.lm_head.weight.shape == (151936, 1536)
    assert sum(cfg.text_config.rope_parameters["mrope_section"]) * 2 == 1536 // 12


def test_kv_cache_names_of_old_and_new_transformers():
    """transformers 5.17 (the GPU device image's) returns and takes ``past_key_values``; newer ones
    ``cache``: policy_utils reads and passes whichever the installed version uses."""
    from types import SimpleNamespace

    from grpo_models import policy_utils as pu

    class Old(torch.nn.Module):
        def forward(self, input_ids, past_key_values=None, use_cache=None):
            return SimpleNamespace(past_key_values=("old", past_key_values))

    class New(torch.nn.Module):
        def forward(self, input_ids, cache=None, use_cache=None):
            return SimpleNamespace(cache=("new", cache))

    for mod, name in ((Old(), "old"), (New(), "new")):
        out = mod(None, **pu.cache_arg(mod, "kv"), use_cache=True)
        assert pu.cache_of(out) == (name, "kv")
