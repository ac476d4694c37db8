"""token_logprobs reference: values, gradients, extreme inputs, label checks."""

import math

import pytest
import torch

from grpo_core.logprobs import token_entropy, token_logprobs

pytestmark = pytest.mark.numerics   # also run under other CPUs' kernel paths (make test-numerics)


def test_by_hand():
    # logits [0, log 3] → softmax [1/4, 3/4]
    logits = torch.tensor([[[0.0, math.log(3.0)]]])
    assert token_logprobs(logits, torch.tensor([[1]])).item() == pytest.approx(math.log(0.75))
    # temperature 2 → softmax of [0, log(3)/2] = [1/(1+√3), √3/(1+√3)]
    got = token_logprobs(logits, torch.tensor([[0]]), temperature=2.0).item()
    assert got == pytest.approx(-math.log(1 + math.sqrt(3)))


def test_matches_log_softmax_and_chunks():
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 37)
    labels = torch.randint(0, 37, (3, 5))
    want = torch.log_softmax(logits / 0.7, -1).gather(-1, labels[..., None]).squeeze(-1)
    import grpo_core.logprobs as lp

    old = lp._CHUNK_ELEMS
    try:
        lp._CHUNK_ELEMS = 37 * 4  # force several chunks, the last one partial
        got = token_logprobs(logits, labels, temperature=0.7)
    finally:
        lp._CHUNK_ELEMS = old
    torch.testing.assert_close(got, want)


def test_bf16_input_fp32_output():
    logits = torch.randn(2, 3, 11).bfloat16()
    labels = torch.randint(0, 11, (2, 3))
    out = token_logprobs(logits, labels)
    assert out.dtype == torch.float32
    want = torch.log_softmax(logits.float(), -1).gather(-1, labels[..., None]).squeeze(-1)
    torch.testing.assert_close(out, want)


def test_gradcheck():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 7, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 7, (2, 3))
    mask = torch.tensor([[1, 1, 0], [0, 0, 0]])
    assert torch.autograd.gradcheck(lambda x: token_logprobs(x, labels, 1.3, mask), (logits,))


def test_mask_zero_and_padding_labels():
    logits = torch.randn(2, 3, 5, requires_grad=True)
    labels = torch.tensor([[1, 2, -100], [-100, -100, -100]])
    mask = labels != -100
    out = token_logprobs(logits, labels, mask=mask)
    assert torch.all(out[~mask] == 0)
    out.sum().backward()
    assert torch.all(logits.grad[~mask] == 0)


def test_extreme_and_neg_inf_logits():
    logits = torch.tensor([[[1e4, -1e4, 0.0, float("-inf")]]]).repeat(1, 2, 1)
    logits[0, 1, 0] = -1e4
    labels = torch.tensor([[0, 2]])
    x = logits.clone().requires_grad_()
    out = token_logprobs(x, labels)
    assert torch.isfinite(out).all()
    assert out[0, 0].item() == pytest.approx(0.0, abs=1e-6)
    assert out[0, 1].item() == pytest.approx(0.0, abs=1e-6)  # label 2 holds the max (0 vs −1e4)
    out.sum().backward()
    assert torch.isfinite(x.grad).all()
    assert torch.all(x.grad[..., 3] == 0)  # −inf entries have zero probability and zero grad


@pytest.mark.parametrize("bad", [-1, 5, 100])
def test_invalid_label_raises(bad):
    with pytest.raises(ValueError, match=r"label ids must be in \[0, 5\)"):
        token_logprobs(torch.randn(1, 2, 5), torch.tensor([[0, bad]]))


def test_shape_and_temperature_errors():
    with pytest.raises(ValueError, match="expected logits"):
        token_logprobs(torch.randn(2, 5), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="temperature"):
        token_logprobs(torch.randn(1, 1, 5), torch.tensor([[0]]), temperature=0.0)


def test_entropy():
    # uniform over 4 → log 4; a −inf entry is ignored (uniform over the other 3 → log 3)
    assert token_entropy(torch.zeros(1, 1, 4)).item() == pytest.approx(math.log(4))
    x = torch.tensor([[[0.0, 0.0, 0.0, float("-inf")]]])
    assert token_entropy(x).item() == pytest.approx(math.log(3))
