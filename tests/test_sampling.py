"""sample_next and its processors on hand-made distributions (random logits, no model)."""

import math

import pytest
import torch

from grpo_core.sampling import (
    SamplingConfig,
    apply_temperature,
    draw_inverse_cdf,
    make_generator,
    min_p_filter,
    sample_next,
    top_k_filter,
    top_p_filter,
)

pytestmark = pytest.mark.numerics   # also run under other CPUs' kernel paths (make test-numerics)

NEG = float("-inf")


def _support(scores: torch.Tensor) -> list[list[int]]:
    """Ids with finite score, per row."""
    return [torch.isfinite(r).nonzero().flatten().tolist() for r in scores]


def _log(p):
    return torch.tensor(p, dtype=torch.float32).log()


def _empirical(logits, cfg, bias=None, n=4000):
    """Token frequencies of n draws from one logits row (rows replicated, one call)."""
    V = logits.shape[-1]
    tok, _ = sample_next(logits.expand(n, V).contiguous(), cfg, make_generator(cfg, "cpu"), bias)
    return torch.bincount(tok, minlength=V).float() / n


# ── processors ───────────────────────────────────────────────────────────────────────────────────

def test_top_k_keeps_k_largest_and_ties():
    s = torch.tensor([[0.1, 3.0, 2.0, -1.0, 2.5], [1.0, 1.0, 1.0, 0.0, 5.0]])
    assert _support(top_k_filter(s.clone(), 2)) == [[1, 4], [0, 1, 2, 4]]  # ties at the k-th kept
    assert _support(top_k_filter(s.clone(), 0)) == [[0, 1, 2, 3, 4]] * 2   # 0 = off
    assert _support(top_k_filter(s.clone(), 99)) == [[0, 1, 2, 3, 4]] * 2  # k ≥ V = off


def test_top_p_keeps_smallest_set_reaching_p():
    s = _log([[0.5, 0.05, 0.3, 0.15], [0.9, 0.04, 0.03, 0.03]])
    # row 0 sorted: .5 (before 0) .3 (before .5) .15 (before .8) .05 (before .95)
    assert _support(top_p_filter(s.clone(), 0.7)) == [[0, 2], [0]]
    assert _support(top_p_filter(s.clone(), 0.81)) == [[0, 2, 3], [0]]
    assert _support(top_p_filter(s.clone(), 0.92)) == [[0, 2, 3], [0, 1]]
    assert _support(top_p_filter(s.clone(), 0.01)) == [[0], [0]]  # the best token always survives
    assert _support(top_p_filter(s.clone(), 1.0)) == [[0, 1, 2, 3]] * 2


def test_min_p_is_relative_to_the_top_probability():
    s = _log([[0.6, 0.25, 0.1, 0.05]])
    assert _support(min_p_filter(s.clone(), 0.2)) == [[0, 1]]   # threshold 0.12
    assert _support(min_p_filter(s.clone(), 0.1)) == [[0, 1, 2]]  # threshold 0.06: drops 0.05
    assert _support(min_p_filter(s.clone(), 0.0)) == [[0, 1, 2, 3]]


def test_temperature_divides_scores():
    s = torch.randn(3, 7)
    torch.testing.assert_close(apply_temperature(s.clone(), 0.5), s * 2)
    torch.testing.assert_close(apply_temperature(s.clone(), 1.0), s)


def test_config_rejects_bad_values():
    for bad in ({"temperature": 0.0}, {"top_p": 0.0}, {"top_k": -1}, {"min_p": 1.0}, {"max_new_tokens": 0}):
        with pytest.raises(ValueError, match="SamplingConfig"):
            SamplingConfig(**bad)


# ── sample_next ──────────────────────────────────────────────────────────────────────────────────

@pytest.mark.parametrize("T", [1.0, 0.7, 1.6])
@pytest.mark.parametrize("filters", [{}, {"top_k": 5}, {"top_p": 0.6}, {"min_p": 0.1}])
def test_recorded_logprob_is_unfiltered_log_softmax_at_T(T, filters):
    torch.manual_seed(0)
    N, V = 13, 37
    logits = torch.randn(N, V) * 3
    bias = torch.zeros(V)
    bias[[2, 11]] = NEG
    cfg = SamplingConfig(temperature=T, seed=1, **filters)
    before = logits.clone()
    tok, lp = sample_next(logits, cfg, make_generator(cfg, "cpu"), bias)
    want = torch.log_softmax((logits.double() + bias.double()) / T, -1).gather(-1, tok[:, None]).squeeze(-1)
    torch.testing.assert_close(lp, want.float(), atol=1e-5, rtol=1e-5)
    assert lp.dtype == torch.float32 and tok.dtype == torch.int64 and tok.shape == (N,)
    assert torch.equal(logits, before), "sample_next must not modify its input logits"


def test_greedy_is_argmax_and_records_logprob_at_T():
    logits = torch.randn(6, 50)
    bias = torch.zeros(50)
    top = logits.argmax(-1)
    bias[top[0]] = NEG  # suppressing row 0's favourite must move its argmax
    cfg = SamplingConfig(greedy=True, temperature=0.5)
    tok, lp = sample_next(logits, cfg, None, bias)
    want = (logits + bias).argmax(-1)
    assert torch.equal(tok, want) and tok[0] != top[0]
    torch.testing.assert_close(lp, torch.log_softmax((logits + bias) / 0.5, -1).gather(-1, want[:, None]).squeeze(-1))


def test_minus_inf_bias_is_never_sampled():
    V = 20
    logits = torch.zeros(1, V)
    logits[0, :4] = 10.0  # the suppressed ids are by far the most likely ones
    bias = torch.zeros(V)
    bias[:4] = NEG
    for cfg in (SamplingConfig(seed=0), SamplingConfig(seed=0, temperature=5.0), SamplingConfig(seed=0, top_k=6),
                SamplingConfig(seed=0, top_p=0.99), SamplingConfig(greedy=True)):
        freq = _empirical(logits, cfg, bias, n=2000)
        assert freq[:4].sum() == 0, f"{cfg}: sampled a −inf-biased id"


def test_samples_follow_the_distribution():
    p = torch.tensor([0.5, 0.3, 0.15, 0.05])
    freq = _empirical(p.log()[None], SamplingConfig(seed=3), n=20000)
    torch.testing.assert_close(freq, p, atol=0.02, rtol=0)
    # temperature 2 flattens: p^(1/2) renormalised
    flat = p.sqrt() / p.sqrt().sum()
    freq = _empirical(p.log()[None], SamplingConfig(seed=3, temperature=2.0), n=20000)
    torch.testing.assert_close(freq, flat, atol=0.02, rtol=0)


@pytest.mark.parametrize(
    "cfg, support",
    [
        (SamplingConfig(seed=0, top_k=2), [0, 1]),
        (SamplingConfig(seed=0, top_p=0.7), [0, 1]),
        (SamplingConfig(seed=0, min_p=0.2), [0, 1, 2]),  # threshold 0.1 keeps 0.15
        (SamplingConfig(seed=0, top_k=3, top_p=0.5), [0]),
    ],
)
def test_filters_restrict_the_sampled_support(cfg, support):
    p = torch.tensor([0.5, 0.3, 0.15, 0.05])
    freq = _empirical(p.log()[None], cfg, n=4000)
    assert set(freq.nonzero().flatten().tolist()) == set(support)
    kept = p[support] / p[support].sum()  # renormalised over the kept set
    torch.testing.assert_close(freq[support], kept, atol=0.03, rtol=0)


def test_seed_reproducible_and_seed_sensitive():
    logits = torch.randn(64, 100)
    a = sample_next(logits, SamplingConfig(seed=7), make_generator(SamplingConfig(seed=7), "cpu"))[0]
    b = sample_next(logits, SamplingConfig(seed=7), make_generator(SamplingConfig(seed=7), "cpu"))[0]
    c = sample_next(logits, SamplingConfig(seed=8), make_generator(SamplingConfig(seed=8), "cpu"))[0]
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert make_generator(SamplingConfig(), "cpu") is None  # no seed: the global RNG
    torch.manual_seed(5)
    d = sample_next(logits, SamplingConfig(), None)[0]
    torch.manual_seed(5)
    assert torch.equal(d, sample_next(logits, SamplingConfig(), None)[0])


def test_logprob_of_certain_token_is_zero():
    logits = torch.full((2, 10), -1e4)
    logits[:, 3] = 0.0
    tok, lp = sample_next(logits, SamplingConfig(seed=0), make_generator(SamplingConfig(seed=0), "cpu"))
    assert tok.tolist() == [3, 3] and lp.abs().max() < 1e-6 and not math.isnan(lp.sum())


def test_inverse_cdf_never_draws_zero_weight_ids_and_follows_weights():
    g = torch.Generator().manual_seed(0)
    w = torch.tensor([[0.0, 2.0, 0.0, 6.0, 0.0],     # unnormalised, zeros between and at both ends
                      [0.0, 0.0, 0.0, 0.0, 1e-3],    # all mass on the last id
                      [5.0, 0.0, 0.0, 0.0, 0.0]])    # all mass on the first id
    draws = torch.stack([draw_inverse_cdf(w.clone(), g) for _ in range(4000)])  # (4000, 3)
    assert set(draws[:, 0].tolist()) == {1, 3}
    assert (draws[:, 1] == 4).all() and (draws[:, 2] == 0).all()
    assert abs((draws[:, 0] == 3).float().mean().item() - 0.75) < 0.03
