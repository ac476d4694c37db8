"""Shared-prefix training forward (grpo_models.prefix_train) against the plain [prompt ; completion] path.

The plain path (``prefix_train.ENABLED = False``) runs HF's language model over N = B·G full rows;
test_policy_qwen2_vl.py holds it to HF's own full forward. Here the shared path must give the same
hidden states and the same gradients for every parameter (vision tower included), with ragged left
padding, 0 / 1 / 2 images per prompt, masked and fully masked rows, LoRA, gradient checkpointing
and bf16. One test also compares with HF's full forward directly (positions computed by HF).

The equivalences run in float64 (tests/numerics.py): the two paths reduce in different orders,
which moves fp32 results by ~1e-6 on some CPUs; in fp64 they agree to ~1e-15 of the values' size.
"""

import pytest
import torch
from grpo_models.qwen2_vl import Qwen2VLPolicy
from helpers import ragged_prompts
from numerics import assert_equiv

from grpo_models import prefix_train

pytestmark = pytest.mark.numerics   # also run under other CPUs' kernel paths (make test-numerics)

F64 = dict(dtype=torch.float64, device="cpu")


def _completions(pol, n, c, seed):
    ids = torch.randint(10, 500, (n, c), generator=torch.Generator().manual_seed(seed))
    ids[ids == pol.image_token_id] = 11
    mask = torch.ones(n, c, dtype=torch.long)
    mask[0, c // 2:] = 0
    mask[-1] = 0                                                        # fully masked row ...
    ids[-1, 1:] = -100                                                  # ... with -100 padding
    return ids, mask


def _run(pol, enc, ids, mask, g, shared: bool, loss=None):
    """(hidden, {name: grad}) through one path; ``loss(hidden)`` is back-propagated when given."""
    prefix_train.ENABLED = shared
    try:
        pol.model.zero_grad(set_to_none=True)
        h = pol.completion_hidden(enc, ids, mask, g)
        if loss is None:
            return h.detach(), {}
        loss(h).backward()
        return h.detach(), {k: p.grad.clone() for k, p in pol.model.named_parameters() if p.grad is not None}
    finally:
        prefix_train.ENABLED = True


def _logp_loss(pol, ids, mask):
    """Σ mask · log p(c_j) through lm_head: the quantity GRPO differentiates."""
    labels = ids.clamp(min=0)

    def loss(h):
        logp = torch.log_softmax(h @ pol.lm_head_weight.to(h.dtype).T, -1)             # (N, C, V)
        return (logp.gather(-1, labels[..., None])[..., 0] * mask).sum()
    return loss


@pytest.fixture(scope="module")
def pol(tiny_vlm_path):
    p = Qwen2VLPolicy.from_pretrained(tiny_vlm_path, **F64)
    assert prefix_train.supported(p._lm), "the tiny Qwen2-VL must take the shared path"
    return p


@pytest.mark.parametrize("layout", ["rows", "grouped"])
@pytest.mark.parametrize("group_size,c", [(1, 7), (3, 5), (2, 1)])
def test_hidden_equals_plain_path(pol, group_size, c, layout, monkeypatch):
    monkeypatch.setattr(prefix_train, "LAYOUT", layout)
    enc = pol.encode(ragged_prompts())
    ids, mask = _completions(pol, len(enc) * group_size, c, seed=group_size)
    with torch.no_grad():
        new, _ = _run(pol, enc, ids, mask, group_size, shared=True)
        old, _ = _run(pol, enc, ids, mask, group_size, shared=False)
    assert new.shape == old.shape == (len(enc) * group_size, c, pol.lm_head_weight.shape[1])
    assert_equiv(new, old, f"hidden G={group_size} C={c}")


def test_shared_path_is_taken(pol, monkeypatch):
    calls = []
    real = prefix_train.shared_prefix_hidden
    monkeypatch.setattr(prefix_train, "shared_prefix_hidden", lambda *a, **k: calls.append(1) or real(*a, **k))
    enc = pol.encode(ragged_prompts()[:2])
    ids, mask = _completions(pol, 4, 3, seed=0)
    with torch.no_grad():
        pol.completion_hidden(enc, ids, mask, 2)
    assert calls == [1]


def test_logprobs_equal_hf_full_forward(pol):
    """Completion positions L + δ + j checked against HF computing mRoPE over the whole row itself."""
    enc = pol.encode(ragged_prompts())
    g, c = 2, 4
    ids, mask = _completions(pol, len(enc) * g, c, seed=5)
    ids = ids.clamp(min=10)
    rows = enc.select(torch.arange(len(enc)).repeat_interleave(g))
    full = torch.cat([rows.input_ids, ids], 1)
    with torch.no_grad():
        h = pol.completion_hidden(enc, ids, mask, g)
        ref = pol._hf(input_ids=full, attention_mask=torch.cat([rows.attention_mask, torch.ones_like(ids)], 1),
                      pixel_values=rows.pixel_values, image_grid_thw=rows.image_grid_thw,
                      mm_token_type_ids=(full == pol.image_token_id).int()).logits
    p = enc.input_ids.shape[1]
    assert_equiv(torch.log_softmax(h @ pol.lm_head_weight.T, -1), torch.log_softmax(ref[:, p - 1:-1].double(), -1),
                 "log-probs vs HF full forward")


@pytest.mark.parametrize("layout", ["rows", "grouped"])
@pytest.mark.parametrize("group_size", [1, 3])
def test_gradients_equal_plain_path(pol, group_size, layout, monkeypatch):
    monkeypatch.setattr(prefix_train, "LAYOUT", layout)
    enc = pol.encode(ragged_prompts())
    ids, mask = _completions(pol, len(enc) * group_size, 5, seed=10 + group_size)
    loss = _logp_loss(pol, ids, mask)
    h_new, g_new = _run(pol, enc, ids, mask, group_size, shared=True, loss=loss)
    h_old, g_old = _run(pol, enc, ids, mask, group_size, shared=False, loss=loss)
    assert_equiv(h_new, h_old, "hidden")
    assert g_new.keys() == g_old.keys() == {k for k, p in pol.model.named_parameters() if p.requires_grad}
    assert any(".visual." in k for k in g_new)
    for k, g in g_old.items():
        assert_equiv(g_new[k], g, k)


def test_lora_trains_only_adapters_and_matches(tiny_vlm_path):
    pol = Qwen2VLPolicy.from_pretrained(tiny_vlm_path, **F64,
                                        lora={"r": 4, "lora_alpha": 8, "init_lora_weights": False})
    assert prefix_train.supported(pol._lm)
    enc = pol.encode(ragged_prompts()[1:3])
    ids, mask = _completions(pol, 6, 4, seed=3)
    loss = _logp_loss(pol, ids, mask)
    h_new, g_new = _run(pol, enc, ids, mask, 3, shared=True, loss=loss)
    h_old, g_old = _run(pol, enc, ids, mask, 3, shared=False, loss=loss)
    assert g_new and all("lora_" in k for k in g_new) and g_new.keys() == g_old.keys()
    assert_equiv(h_new, h_old, "LoRA hidden")
    for k, g in g_old.items():
        assert_equiv(g_new[k], g, k)


@pytest.mark.parametrize("backbone,attn", [("qwen2_5_vl", "sdpa"), ("qwen2_vl", "eager")])
def test_other_backbone_and_attention(tmp_path, tiny_vlm_path, backbone, attn):
    """Qwen2.5-VL's text layers share the layout; an eager-attention model takes the same path."""
    from grpo_models.tiny import build_tiny_qwen2_5_vl

    path = build_tiny_qwen2_5_vl(str(tmp_path / "q25")) if backbone == "qwen2_5_vl" else tiny_vlm_path
    pol = Qwen2VLPolicy.from_pretrained(path, **F64, attn_implementation=attn)
    assert prefix_train.supported(pol._lm)
    enc = pol.encode(ragged_prompts()[:2])
    ids, mask = _completions(pol, 4, 4, seed=7)
    loss = _logp_loss(pol, ids, mask)
    h_new, g_new = _run(pol, enc, ids, mask, 2, shared=True, loss=loss)
    h_old, g_old = _run(pol, enc, ids, mask, 2, shared=False, loss=loss)
    assert_equiv(h_new, h_old, f"{backbone} hidden")
    assert g_new.keys() == g_old.keys() and any(".visual." in k for k in g_new)
    for k, g in g_old.items():
        assert_equiv(g_new[k], g, k)


def test_gradient_checkpointing_matches_plain_path(tiny_vlm_path, pol):
    gc = Qwen2VLPolicy.from_pretrained(tiny_vlm_path, **F64, gradient_checkpointing=True)
    gc.model.train()
    assert prefix_train._checkpointing(gc._lm)
    enc = pol.encode(ragged_prompts()[:3])
    ids, mask = _completions(pol, 6, 4, seed=4)
    h_new, g_new = _run(gc, enc, ids, mask, 2, shared=True, loss=_logp_loss(gc, ids, mask))
    h_old, g_old = _run(pol, enc, ids, mask, 2, shared=False, loss=_logp_loss(pol, ids, mask))
    assert_equiv(h_new, h_old, "hidden with checkpointing")
    assert g_new.keys() == g_old.keys()
    for k, g in g_old.items():
        assert_equiv(g_new[k], g, k)


def test_bf16_error_within_twice_plain_bf16(tiny_vlm_path, pol):
    """bf16 shared path vs fp64: error ≤ 2× the plain bf16 path's own error (+ a small floor)."""
    bf = Qwen2VLPolicy.from_pretrained(tiny_vlm_path, dtype=torch.bfloat16, device="cpu")
    enc = pol.encode(ragged_prompts())
    ids, mask = _completions(pol, 8, 5, seed=6)

    def logp(p, shared):
        h, _ = _run(p, enc, ids, mask, 2, shared=shared)
        return torch.log_softmax(h.double() @ p.lm_head_weight.double().T, -1), h.dtype

    with torch.no_grad():
        ref, _ = logp(pol, False)
        new, dtype = logp(bf, True)
        old, _ = logp(bf, False)
    assert dtype == torch.bfloat16
    err_new, err_old = (new - ref).abs().max().item(), (old - ref).abs().max().item()
    assert err_new <= 2 * err_old + 1e-2, f"bf16 shared err {err_new:.3g} vs plain bf16 err {err_old:.3g}"


def test_layout_rule(monkeypatch):
    assert prefix_train.use_grouped(prompt_len=100, c=10, group_size=8)          # G·C' = 80 ≤ P
    assert not prefix_train.use_grouped(prompt_len=100, c=20, group_size=8)
    monkeypatch.setattr(prefix_train, "LAYOUT", "rows")
    assert not prefix_train.use_grouped(prompt_len=100, c=1, group_size=2)
    monkeypatch.setattr(prefix_train, "LAYOUT", "bogus")
    with pytest.raises(ValueError, match="LAYOUT"):
        prefix_train.use_grouped(100, 1, 2)


def test_falls_back_where_unsupported(pol, monkeypatch):
    lm = pol._lm
    monkeypatch.setattr(lm.config, "_attn_implementation", "flash_attention_2")
    assert prefix_train.supported(lm), "the shared path does its own attention: any backend keeps it"
    monkeypatch.undo()
    assert prefix_train.supported(lm)
    monkeypatch.setattr(prefix_train, "ENABLED", False)
    assert not prefix_train.supported(lm)
