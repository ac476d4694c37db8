"""Prefix sharing stays on whatever attention backend the model was loaded with (issue #17, item 3).
(Shared-prefix decoding on Qwen2.5-VL: test_rollout.py::test_shared_prefix_decode_matches_fanned_out_cache.)

The shared-prefix training forward (grpo_models.prefix_train) and decode (prefix_decode) do their
own attention through torch's sdpa; the model's ``attn_implementation`` (flash_attention_2 when
flash_attn is installed on a GPU) only drives the plain HF paths. On CPU flash_attention_2 cannot
run, so the text model's setting is switched after loading: the shared paths must still be taken,
and must still equal the plain path run with sdpa. Equivalences in float64 (numerics.py).
"""

import pytest
import torch
from grpo_models.qwen2_vl import Qwen2VLPolicy
from helpers import ragged_prompts
from numerics import assert_equiv

from grpo_models import prefix_decode, prefix_train

pytestmark = pytest.mark.numerics   # also run under other CPUs' kernel paths (make test-numerics)

F64 = dict(dtype=torch.float64, device="cpu")


@pytest.fixture(scope="module")
def q25_path(tmp_path_factory):
    from grpo_models.tiny import build_tiny_qwen2_5_vl

    return build_tiny_qwen2_5_vl(str(tmp_path_factory.mktemp("q25")))


def _hidden_and_grads(pol, enc, ids, mask, G):
    pol.model.zero_grad(set_to_none=True)
    h = pol.completion_hidden(enc, ids, mask, G)
    h.pow(2).sum().backward()
    return h.detach(), {k: p.grad.clone() for k, p in pol.model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("backbone", ["qwen2_vl", "qwen2_5_vl"])
def test_shared_paths_do_not_depend_on_the_text_attention_backend(tiny_vlm_path, q25_path, backbone):
    """A text model set to flash_attention_2 keeps both shared-prefix paths, with the same results
    as the plain path of an sdpa model."""
    path = tiny_vlm_path if backbone == "qwen2_vl" else q25_path
    flash = Qwen2VLPolicy.from_pretrained(path, **F64)
    flash._lm.config._attn_implementation = "flash_attention_2"          # the text layers only
    assert prefix_train.supported(flash._lm) and prefix_decode.supported(flash._lm)
    plain = Qwen2VLPolicy.from_pretrained(path, **F64)
    enc = flash.encode(ragged_prompts()[:2])
    G, C = 3, 4
    ids = torch.randint(10, 400, (2 * G, C), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    h_shared, g_shared = _hidden_and_grads(flash, enc, ids, mask, G)
    prefix_train.ENABLED = False
    try:
        h_plain, g_plain = _hidden_and_grads(plain, enc, ids, mask, G)
    finally:
        prefix_train.ENABLED = True
    assert_equiv(h_shared, h_plain, f"{backbone} hidden, shared (flash-configured) vs plain (sdpa)")
    assert g_shared.keys() == g_plain.keys()
    for k, g in g_plain.items():
        assert_equiv(g_shared[k], g, k)
