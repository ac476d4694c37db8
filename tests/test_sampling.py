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
    before = w.clone()
    draws = torch.stack([draw_inverse_cdf(w, g) for _ in range(4000)])  # (4000, 3)
    assert torch.equal(w, before)                                     # the weights are not consumed
    assert set(draws[:, 0].tolist()) == {1, 3}
    assert (draws[:, 1] == 4).all() and (draws[:, 2] == 0).all()
    assert abs((draws[:, 0] == 3).float().mean().item() - 0.75) < 0.03


# ── counter-based uniforms ───────────────────────────────────────────────────────────────────────

def _lowbias32(x: int) -> int:
    """Plain-Python reference of the hash (C. Wellons' lowbias32) on one 32-bit int."""
    m = 0xFFFFFFFF
    x ^= x >> 16
    x = (x * 0x7FEB352D) & m
    x ^= x >> 15
    x = (x * 0x846CA68B) & m
    return x ^ (x >> 16)


def _uniform_ref(key: int, prompt: int, sample: int, t: int) -> float:
    h = _lowbias32(_lowbias32(key & 0xFFFFFFFF) ^ (key >> 32))
    h = _lowbias32(_lowbias32(_lowbias32(h ^ prompt) ^ sample) ^ t)
    h2 = _lowbias32(h ^ 0x9E3779B9)
    return ((h >> 5) * 2**26 + (h2 >> 6)) / 2.0**53


def test_counter_uniforms_match_the_plain_reference():
    from grpo_core.sampling import counter_uniforms

    key = 0xDEADBEEF12345678
    prompt, sample = torch.tensor([0, 0, 3, 70000]), torch.tensor([0, 1, 5, 2**31 + 7])
    u = counter_uniforms(key, prompt, sample, 6)                           # (4, 6)
    rows = zip(prompt.tolist(), sample.tolist())
    want = [[_uniform_ref(key, p, s, t) for t in range(6)] for p, s in rows]
    assert u.dtype == torch.float64 and u.tolist() == want


def test_counter_uniforms_are_per_row_and_uniform():
    from grpo_core.sampling import counter_uniforms

    n, T = 512, 64
    prompt, sample = torch.arange(n) // 8, torch.arange(n) % 8
    u = counter_uniforms(7, prompt, sample, T)                             # (n, T)
    sub = torch.tensor([5, 300, 17])
    alone = counter_uniforms(7, prompt[sub], sample[sub], T)
    assert torch.equal(alone, u[sub]), "depends on other rows"

    assert ((u >= 0) & (u < 1)).all() and u.unique().numel() == n * T
    assert not torch.equal(counter_uniforms(8, prompt, sample, T), u), "key ignored"
    # 32 equal bins over 32,768 draws: each count is Binomial(32768, 1/32), sd ≈ 31; 6 sd apart
    counts = torch.histc(u.float(), bins=32, min=0, max=1)
    assert (counts - n * T / 32).abs().max() < 6 * math.sqrt(n * T / 32), counts
    # neighbouring positions / samples are uncorrelated (|r| ~ 1/sqrt(n·T) ≈ 0.006 if independent)
    for a, b in ((u[:, 1:], u[:, :-1]), (u[1:], u[:-1])):
        r = torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1]
        assert abs(float(r)) < 0.03, f"correlation {float(r):.3f}"


def test_given_uniforms_pick_the_first_id_whose_cdf_exceeds_u():
    torch.manual_seed(1)
    logits = torch.randn(40, 9)
    u = torch.rand(40, dtype=torch.float64)
    tok, _ = sample_next(logits, SamplingConfig(), None, None, u)
    p = torch.softmax(logits.double(), -1)
    cdf = p.cumsum(-1)
    want = (cdf <= u[:, None]).sum(-1).clamp(max=8)                        # first j with cdf_j > u
    # fp32 vs fp64 cdf: a draw may differ only when u lies within fp32 rounding of a boundary
    near = ((cdf - u[:, None]).abs() < 1e-5).any(-1)
    assert torch.equal(tok[~near], want[~near]) and (~near).sum() > 30
