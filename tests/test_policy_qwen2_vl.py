"""Qwen2VLPolicy and TextLMPolicy against the HF models' own forward (tiny random models, CPU).

The reference everywhere is ``model(input_ids=prompt+completion, attention_mask, pixel_values,
image_grid_thw, mm_token_type_ids)`` — HF computes mRoPE itself — so these tests check our
positions, padding, image expansion, shared vision features and KV cache handling. The
comparisons run in float64 (tests/numerics.py: they then hold on any CPU); decode logits are fp32
by contract, so those are held to fp32 rounding of the fp64 values.
"""

import io

import numpy as np
import pytest
import torch
from grpo_models.qwen2_vl import Qwen2VLPolicy
from helpers import img, ragged_prompts
from numerics import assert_close, assert_equiv, tol
from PIL import Image

from grpo_core.policy import Policy, Prompt

pytestmark = pytest.mark.numerics   # also run under other CPUs' kernel paths (make test-numerics)

F64 = dict(device="cpu", dtype=torch.float64)


def _hf_logits(policy, enc, ids):
    """HF full forward on enc's prompts (one row per completion row) + ids → logits (N, P+C, V)."""
    full = torch.cat([enc.input_ids, ids], 1)
    mask = torch.cat([enc.attention_mask, torch.ones_like(ids)], 1)
    return policy._hf(input_ids=full, attention_mask=mask, pixel_values=enc.pixel_values,
                      image_grid_thw=enc.image_grid_thw,
                      mm_token_type_ids=(full == policy.image_token_id).int()).logits


# ------------------------------------------------------------------ encode

def test_protocol_and_special_ids(tiny_vlm_policy):
    pol = tiny_vlm_policy
    assert isinstance(pol, Policy)
    tok = pol.tokenizer
    assert set(pol.eos_token_ids) == {tok.convert_tokens_to_ids("<|im_end|>"),
                                      tok.convert_tokens_to_ids("<|endoftext|>")}
    bias = pol.lm_head_bias
    assert bias.shape == (pol.vocab_size,) and bias.dtype == torch.float32
    never = {tok.convert_tokens_to_ids(t)
             for t in ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>")}
    assert set(torch.nonzero(torch.isinf(bias)).flatten().tolist()) == never
    assert (bias[torch.isfinite(bias)] == 0).all()
    assert pol.vocab_size == pol.lm_head_weight.shape[0] >= len(tok)


def test_image_tokens_match_grid_and_left_padding(tiny_vlm_policy):
    pol = tiny_vlm_policy
    enc = pol.encode(ragged_prompts())
    assert enc.num_images.tolist() == [1, 2, 0, 1]
    assert enc.image_grid_thw.shape == (4, 3) and enc.pixel_values.shape[0] == int(enc.image_grid_thw.prod(-1).sum())
    per_image = (enc.image_grid_thw.prod(-1) // 4).tolist()
    assert per_image[0] == 4 and per_image[2] == 4                        # 56×56 → 2×2 merged tokens
    n_tok = (enc.input_ids == pol.image_token_id).sum(-1).tolist()
    assert n_tok == [per_image[0], per_image[1] + per_image[2], 0, per_image[3]]
    lengths = enc.attention_mask.sum(-1)
    for row, n in zip(range(len(enc)), lengths.tolist()):
        m = enc.attention_mask[row]
        assert m[-n:].all() and not m[:-n].any()                          # padding on the left only
        assert (enc.input_ids[row, :-n] == pol.pad_token_id).all()
    last = pol.tokenizer.encode("<|im_start|>assistant\n", add_special_tokens=False)
    assert (enc.input_ids[:, -len(last):] == torch.tensor(last)).all()    # all rows end the same way


def test_templates_chat_vs_plain(tiny_vlm_path):
    chat = Qwen2VLPolicy.from_pretrained(tiny_vlm_path, device="cpu", template="chat")
    plain = Qwen2VLPolicy.from_pretrained(tiny_vlm_path, device="cpu", template="plain")
    p = [Prompt("Which organ?", [img(56, 56)], system="Be brief.")]
    c_text = chat.tokenizer.decode(chat.encode(p).input_ids[0])
    p_text = plain.tokenizer.decode(plain.encode(p).input_ids[0])
    assert c_text.startswith("<|im_start|>system\nBe brief.<|im_end|>") and c_text.endswith("<|im_start|>assistant\n")
    assert "<|im_start|>" not in p_text and "<|im_end|>" not in p_text
    assert p_text == "Be brief.\n<|vision_start|>" + "<|image_pad|>" * 4 + "<|vision_end|>Which organ?\n"
    with pytest.raises(ValueError, match="template"):
        Qwen2VLPolicy.from_pretrained(tiny_vlm_path, device="cpu", template="base").encode(p)


def test_select_with_repeats_keeps_images_with_their_prompts(tiny_vlm_policy, tiny_vlm_policy64):
    pol = tiny_vlm_policy
    prompts = ragged_prompts()
    enc = pol.encode(prompts)
    order = [3, 1, 1, 2, 0]
    sel = enc.select(order)
    direct = pol.encode([prompts[i] for i in order])
    assert torch.equal(sel.pixel_values, direct.pixel_values)
    assert torch.equal(sel.image_grid_thw, direct.image_grid_thw)
    assert sel.num_images.tolist() == direct.num_images.tolist() and sel.prompt_index.tolist() == order
    for r in range(len(order)):   # same real tokens and positions (padding width may differ)
        n = int(direct.attention_mask[r].sum())
        assert torch.equal(sel.input_ids[r, -n:], direct.input_ids[r, -n:])
        assert torch.equal(sel.position_ids[:, r, -n:], direct.position_ids[:, r, -n:])
    with torch.no_grad():      # fp64 model: fp32 logits equal to fp32 rounding of the same fp64 values
        a, b = tiny_vlm_policy64.prefill(tiny_vlm_policy64.encode(prompts).select(order))[0], tiny_vlm_policy64.prefill(
            tiny_vlm_policy64.encode([prompts[i] for i in order]))[0]
    assert_close(a, b, "prefill after select", atol=tol(torch.float32, b.abs().max(), k=2))
    assert enc.select([2]).pixel_values is None


def test_bad_and_odd_images(tiny_vlm_policy, tmp_path):
    pol = tiny_vlm_policy
    with pytest.raises(ValueError, match=r"prompt 0 image 1 \('.*missing\.png'\).*no such image file"):
        pol.encode([Prompt("x", [img(56, 56), str(tmp_path / "missing.png")])])
    bad = tmp_path / "corrupt.png"
    buf = io.BytesIO()
    img(64, 64).save(buf, format="PNG")
    bad.write_bytes(buf.getvalue()[:100])                                 # truncated PNG
    with pytest.raises(ValueError, match=r"prompt 1 image 0 \('.*corrupt\.png'\): cannot load"):
        pol.encode([Prompt("ok", []), Prompt("x", [str(bad)])])
    with pytest.raises(ValueError, match="cannot load"):
        pol.encode([Prompt("x", [b"not an image at all"])])
    with pytest.raises(ValueError, match="aspect ratio"):
        pol.encode([Prompt("x", [img(900, 3)])])

    rgb = img(56, 56, 7)
    ref = pol.encode([Prompt("x", [rgb])]).pixel_values
    as_png = io.BytesIO()
    rgb.save(as_png, format="PNG")
    assert torch.equal(pol.encode([Prompt("x", [as_png.getvalue()])]).pixel_values, ref)   # bytes input
    gray = rgb.convert("L")
    assert torch.equal(pol.encode([Prompt("x", [gray])]).pixel_values,
                       pol.encode([Prompt("x", [gray.convert("RGB")])]).pixel_values)
    rgba = rgb.convert("RGBA")
    rgba.putalpha(0)                                                      # fully transparent → white
    white = pol.encode([Prompt("x", [Image.new("RGB", (56, 56), "white")])]).pixel_values
    assert torch.equal(pol.encode([Prompt("x", [rgba])]).pixel_values, white)
    pal = rgb.convert("P")
    assert pol.encode([Prompt("x", [pal])]).pixel_values.shape == ref.shape
    deep = Image.fromarray((np.arange(56 * 56).reshape(56, 56) * 20).astype(np.uint16))   # 16-bit greyscale
    pv = pol.encode([Prompt("x", [deep])]).pixel_values
    assert torch.isfinite(pv).all() and pv.std() > 0.1                   # scaled, not clipped to white

    tiny = pol.encode([Prompt("x", [img(3, 5)])])
    assert int(tiny.image_grid_thw.prod()) * 14 * 14 >= pol.image_processor.size["shortest_edge"]
    huge = pol.encode([Prompt("x", [img(3000, 2000)])])
    assert int(huge.image_grid_thw.prod()) * 14 * 14 <= pol.image_processor.size["longest_edge"]


def test_a_long_prompt_is_an_error_never_a_dropped_row(tiny_vlm_path, tiny_text_lm_path):
    """Row b of an Encoded is prompts[b] (the trainer pairs records with completions by position),
    so a prompt over max_prompt_len stops with what to do; there is no option to drop it."""
    from grpo_models.text_lm import TextLMPolicy

    err = Qwen2VLPolicy.from_pretrained(tiny_vlm_path, device="cpu", max_prompt_len=40)
    prompts = [Prompt("short", [img(56, 56)]), Prompt("long", [img(224, 224)]), Prompt("also short", [])]
    with pytest.raises(ValueError, match=r"prompt 1 is .* tokens after image expansion > max_prompt_len=40 "
                                         r"\(1 prompts too long\); lower max_pixels, shorten the text, or "
                                         r"raise max_prompt_len\.$"):
        err.encode(prompts)
    enc = err.encode([prompts[0], prompts[2]])
    assert enc.prompt_index.tolist() == [0, 1] and enc.num_images.tolist() == [1, 0]
    with pytest.raises(TypeError, match="on_long_prompt"):
        Qwen2VLPolicy.from_pretrained(tiny_vlm_path, device="cpu", max_prompt_len=40, on_long_prompt="skip")
    text = TextLMPolicy.from_pretrained(tiny_text_lm_path, device="cpu", max_prompt_len=40)
    with pytest.raises(ValueError, match="prompt 1 is .* tokens > max_prompt_len=40; shorten it or raise"):
        text.encode([Prompt("a"), Prompt("a much longer prompt " * 10)])


# ------------------------------------------------------------------ completion_hidden

@pytest.mark.parametrize("group_size", [1, 3])
def test_completion_hidden_matches_hf_forward(tiny_vlm_policy64, group_size):
    pol = tiny_vlm_policy64
    enc = pol.encode(ragged_prompts())
    n, c = len(enc) * group_size, 7
    g = torch.Generator().manual_seed(group_size)
    ids = torch.randint(10, len(pol.tokenizer) - 20, (n, c), generator=g)
    ids[ids == pol.image_token_id] = 11
    mask = torch.ones(n, c, dtype=torch.long)
    mask[1, 4:] = 0
    mask[-1] = 0                                                          # fully masked row
    with torch.no_grad():
        hidden = pol.completion_hidden(enc, ids, mask, group_size)        # (N, C, H)
        logp = torch.log_softmax(hidden @ pol.lm_head_weight.T, -1)
        rows = enc.select(torch.arange(len(enc)).repeat_interleave(group_size))
        ref = torch.log_softmax(_hf_logits(pol, rows, ids)[:, enc.input_ids.shape[1] - 1:-1], -1)
    assert hidden.shape == (n, c, pol.lm_head_weight.shape[1])
    assert_equiv(logp, ref, "completion log-probs vs HF")


def test_shared_vision_gradients_equal_unshared(tiny_vlm_path):
    pol = Qwen2VLPolicy.from_pretrained(tiny_vlm_path, **F64)
    enc = pol.encode(ragged_prompts()[:2])
    g, c = 3, 5
    ids = torch.randint(10, 500, (2 * g, c), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    w = torch.randn(2 * g, c, pol.lm_head_weight.shape[1], generator=torch.Generator().manual_seed(1),
                    dtype=torch.float64)

    def grads(e, group):
        pol.model.zero_grad()
        (pol.completion_hidden(e, ids, mask, group) * w).sum().backward()
        return {k: p.grad.clone() for k, p in pol.model.named_parameters() if p.grad is not None}

    shared = grads(enc, g)
    unshared = grads(enc.select(torch.arange(2).repeat_interleave(g)), 1)   # vision tower run per row
    vision = [k for k in shared if ".visual." in k]
    assert vision and shared.keys() == unshared.keys()
    for k in shared:
        assert_equiv(shared[k], unshared[k], k)


def test_completion_hidden_bf16_close_to_fp64(tiny_vlm_path, tiny_vlm_policy64):
    """bf16 log-probs vs fp64: a bf16 rounding budget (k ulps of bf16 at the values' size)."""
    pol64 = tiny_vlm_policy64
    enc = pol64.encode(ragged_prompts()[:2])
    ids = torch.randint(10, 500, (4, 6), generator=torch.Generator().manual_seed(0))
    bf = Qwen2VLPolicy.from_pretrained(tiny_vlm_path, device="cpu", dtype=torch.bfloat16)
    with torch.no_grad():
        ref = torch.log_softmax(pol64.completion_hidden(enc, ids, torch.ones_like(ids), 2) @ pol64.lm_head_weight.T, -1)
        h = bf.completion_hidden(enc, ids, torch.ones_like(ids), 2)
        out = torch.log_softmax(h.double() @ bf.lm_head_weight.double().T, -1)
    assert h.dtype == torch.bfloat16
    # a 2-layer model: a few dozen bf16 roundings on the way to the logits
    assert_close(out, ref, "bf16 vs fp64 log-probs", atol=tol(torch.bfloat16, ref.abs().max(), k=4))


# ------------------------------------------------------------------ rollout path

def _check_kv_against_full_forward(pol, enc, group_size, steps, hf_logits, k=4):
    """Decode logits (fp32 by contract) == HF's full forward, to k fp32 roundings (more for bf16)."""
    n = len(enc) * group_size
    ids = torch.randint(10, len(pol.tokenizer) - 20, (n, steps), generator=torch.Generator().manual_seed(3))
    ids[ids == getattr(pol, "image_token_id", -1)] = 11
    rows = enc.select(torch.arange(len(enc)).repeat_interleave(group_size))
    logits, state = pol.prefill(enc)
    state = pol.expand(state, group_size)
    logits = logits.repeat_interleave(group_size, 0)
    for j in range(steps):
        ref = hf_logits(rows, ids[:, :j])[:, -1]
        assert logits.dtype == torch.float32 and logits.shape == (n, pol.vocab_size)
        rounding = torch.float32 if pol.model.dtype == torch.float64 else pol.model.dtype
        assert_close(logits, ref, f"step {j}", atol=tol(rounding, ref.abs().max(), k=k))
        logits, state = pol.decode_step(state, ids[:, j])
        assert state.attention_mask.shape == (n, enc.input_ids.shape[1] + j + 1)


def test_prefill_expand_decode_matches_full_forward(tiny_vlm_policy64):
    pol = tiny_vlm_policy64
    with torch.no_grad():
        _check_kv_against_full_forward(pol, pol.encode(ragged_prompts()), 2, 4, lambda e, ids: _hf_logits(pol, e, ids))


def test_text_lm_policy_matches_hf(tiny_text_policy64):
    pol = tiny_text_policy64
    assert isinstance(pol, Policy) and pol.lm_head_bias is None
    enc = pol.encode([Prompt("Is the reasoning sound?"), Prompt("A much longer question about the lung scan?",
                                                               system="You are a judge.")])
    assert enc.attention_mask[0, 0] == 0 and enc.pixel_values is None

    def hf(e, ids):
        full = torch.cat([e.input_ids, ids], 1)
        mask = torch.cat([e.attention_mask, torch.ones_like(ids)], 1)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        return pol._hf(input_ids=full, attention_mask=mask, position_ids=pos).logits

    with torch.no_grad():
        _check_kv_against_full_forward(pol, enc, 3, 3, hf)
        ids = torch.randint(10, 500, (6, 5), generator=torch.Generator().manual_seed(0))
        h = pol.completion_hidden(enc, ids, torch.ones_like(ids), 3)
        rows = enc.select(torch.arange(2).repeat_interleave(3))
        ref = torch.log_softmax(hf(rows, ids)[:, enc.input_ids.shape[1] - 1:-1], -1)
        assert_equiv(torch.log_softmax(h @ pol.lm_head_weight.T, -1), ref, "text completion log-probs")
    with pytest.raises(ValueError, match="prompt 0 has 1 images but TextLMPolicy is text-only"):
        pol.encode([Prompt("x", [img(56, 56)])])


# ------------------------------------------------------------------ decode, save/load, LoRA

def test_decode_stops_at_mask_or_eos(tiny_vlm_policy):
    pol = tiny_vlm_policy
    tok = pol.tokenizer
    a = tok.encode("<think>lesion upper left</think><answer> A</answer>", add_special_tokens=False)
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    ids = torch.tensor([a + [eos, a[0]], [a[0]] * (len(a) + 2)])
    mask = torch.zeros_like(ids)
    mask[0, :len(a) + 1] = 1
    mask[1, :2] = 1
    assert pol.decode(ids, mask) == ["<think>lesion upper left</think><answer> A</answer>", "<think><think>"]
    assert pol.decode(ids)[0] == "<think>lesion upper left</think><answer> A</answer>"


def test_save_load_round_trip(tiny_vlm_policy, tmp_path):
    pol = tiny_vlm_policy
    pol.save_pretrained(str(tmp_path / "p"))
    again = Qwen2VLPolicy.from_pretrained(str(tmp_path / "p"), device="cpu", dtype=torch.float32)
    enc = pol.encode(ragged_prompts())
    enc2 = again.encode(ragged_prompts())
    assert torch.equal(enc.input_ids, enc2.input_ids) and torch.equal(enc.pixel_values, enc2.pixel_values)
    assert torch.equal(pol.prefill(enc)[0], again.prefill(enc2)[0])
    with pytest.raises(NotImplementedError):
        pol.disable_adapters()


def test_lora_adapters_disable_and_merged_save(tiny_vlm_path, tmp_path):
    pytest.importorskip("peft")
    pol = Qwen2VLPolicy.from_pretrained(tiny_vlm_path, **F64,
                                        lora={"r": 4, "lora_alpha": 8, "init_lora_weights": False})
    names = [k for k, p in pol.model.named_parameters() if p.requires_grad]
    assert names and all("lora_" in k and ".visual." not in k for k in names)
    enc = pol.encode(ragged_prompts()[:2])
    base = Qwen2VLPolicy.from_pretrained(tiny_vlm_path, **F64)
    with torch.no_grad():
        tuned = pol.prefill(enc)[0]
        with pol.disable_adapters():
            off = pol.prefill(enc)[0]
        assert_close(off, base.prefill(enc)[0], "adapters off = base model",
                     atol=tol(torch.float32, off.abs().max(), k=2))
        assert (tuned - off).abs().max() > 1e-3                          # the adapters do something
        pol.save_pretrained(str(tmp_path / "merged"))
        merged = Qwen2VLPolicy.from_pretrained(str(tmp_path / "merged"), **F64)
        assert_close(merged.prefill(enc)[0], tuned, "merged save = LoRA model",
                     atol=tol(torch.float32, tuned.abs().max(), k=2))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_bf16_kv_cache_and_hidden(tiny_vlm_path):
    pol = Qwen2VLPolicy.from_pretrained(tiny_vlm_path, device="cuda", dtype=torch.bfloat16)
    enc = pol.encode(ragged_prompts())
    with torch.no_grad():
        _check_kv_against_full_forward(pol, enc.to("cuda"), 2, 3, lambda e, ids: _hf_logits(pol, e, ids.cuda()))


def test_qwen2_5_vl_checkpoint_works(tmp_path):
    from grpo_models.tiny import build_tiny_qwen2_5_vl

    pol = Qwen2VLPolicy.from_pretrained(build_tiny_qwen2_5_vl(str(tmp_path / "q25")), **F64)
    assert type(pol._hf).__name__ == "Qwen2_5_VLForConditionalGeneration"
    enc = pol.encode(ragged_prompts()[:2])
    ids = torch.randint(10, 500, (4, 4), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        rows = enc.select([0, 0, 1, 1])
        ref = _hf_logits(pol, rows, ids)
        h = pol.completion_hidden(enc, ids, torch.ones_like(ids), 2)
        p = enc.input_ids.shape[1]
        assert_equiv(torch.log_softmax(h @ pol.lm_head_weight.T, -1), torch.log_softmax(ref[:, p - 1:-1], -1),
                     "Qwen2.5-VL completion log-probs")
        _check_kv_against_full_forward(pol, enc, 2, 2, lambda e, x: _hf_logits(pol, e, x))


def test_gradient_checkpointing_same_values_and_grads(tiny_vlm_path):
    enc_pol = Qwen2VLPolicy.from_pretrained(tiny_vlm_path, **F64)
    gc_pol = Qwen2VLPolicy.from_pretrained(tiny_vlm_path, **F64, gradient_checkpointing=True)
    enc = enc_pol.encode(ragged_prompts()[:2])
    ids = torch.randint(10, 500, (4, 5), generator=torch.Generator().manual_seed(0))
    out = []
    for pol in (enc_pol, gc_pol):
        pol.model.train()
        h = pol.completion_hidden(enc, ids, torch.ones_like(ids), 2)
        h.pow(2).mean().backward()
        out.append((h.detach(), {k: p.grad for k, p in pol.model.named_parameters()}))
    assert_equiv(out[1][0], out[0][0], "hidden with checkpointing")
    for k, g in out[0][1].items():
        assert_equiv(out[1][1][k], g, k)


def test_freeze_vision_and_pixel_overrides(tiny_vlm_path, tmp_path):
    pol = Qwen2VLPolicy.from_pretrained(tiny_vlm_path, device="cpu", freeze_vision=True, max_pixels=112 * 112,
                                        min_pixels=84 * 84)
    enc = pol.encode([Prompt("x", [img(224, 224)]), Prompt("y", [img(20, 20)])])
    assert enc.image_grid_thw.tolist() == [[1, 8, 8], [1, 6, 6]]       # capped at 112², raised to 84²
    ids = torch.randint(10, 500, (2, 3), generator=torch.Generator().manual_seed(0))
    pol.completion_hidden(enc, ids, torch.ones_like(ids), 1).sum().backward()
    grads = {k: p.grad for k, p in pol.model.named_parameters()}
    assert all(g is None for k, g in grads.items() if ".visual." in k)
    assert all(g is not None for k, g in grads.items() if ".language_model.layers." in k)
    pol.save_pretrained(str(tmp_path / "p"))                            # the overrides are saved too
    loaded = Qwen2VLPolicy.from_pretrained(str(tmp_path / "p"), device="cpu")
    assert loaded.image_processor.size["longest_edge"] == 112 * 112
