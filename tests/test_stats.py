"""grpo_core.stats: pass@k and McNemar against hand computations, interval coverage on seeded
synthetic Bernoulli data, the paired test on constructed pairs."""

import math

import numpy as np
import pytest

from grpo_core import stats


def test_pass_at_k_by_hand():
    # n = 4 samples, 1 correct, k = 2: 1 − C(3,2)/C(4,2) = 1 − 3/6
    assert stats.pass_at_k(4, 1, 2) == pytest.approx(0.5, abs=1e-15)
    # n = 5, c = 2, k = 2: 1 − C(3,2)/C(5,2) = 1 − 3/10
    assert stats.pass_at_k(5, 2, 2) == pytest.approx(0.7, abs=1e-15)
    assert stats.pass_at_k(8, 3, 1) == pytest.approx(3 / 8, abs=1e-15)  # pass@1 = c / n
    assert stats.pass_at_k(8, 0, 8) == 0.0 and stats.pass_at_k(8, 1, 8) == 1.0
    for n, c, k in [(10, 3, 4), (16, 5, 8), (200, 7, 16)]:
        want = 1 - math.comb(n - c, k) / math.comb(n, k)
        assert stats.pass_at_k(n, c, k) == pytest.approx(want, rel=1e-12)
    assert 0.0 < stats.pass_at_k(2000, 1, 10) < 0.01  # large n: no overflow
    with pytest.raises(ValueError, match="c ≤ n"):
        stats.pass_at_k(4, 5, 1)
    assert (
        stats.ks_for(8) == [1, 2, 4, 8]
        and stats.ks_for(6) == [1, 2, 4, 6]
        and stats.ks_for(1) == [1]
    )


def test_mcnemar_exact_by_hand():
    # b = 7, c = 1: P(X ≤ 1) for Binomial(8, ½) = (1 + 8)/256, two-sided 18/256
    assert stats.mcnemar_exact(7, 1) == pytest.approx(18 / 256, rel=1e-15)
    assert stats.mcnemar_exact(1, 7) == stats.mcnemar_exact(7, 1)
    assert stats.mcnemar_exact(10, 0) == pytest.approx(2 / 1024, rel=1e-15)
    assert stats.mcnemar_exact(3, 3) == 1.0 and stats.mcnemar_exact(0, 0) == 1.0


def test_item_bootstrap_covers_true_p():
    """95 % intervals from 100 Bernoulli(p) items cover p in ≥ 90 % of 200 seeded repetitions."""
    rng = np.random.default_rng(0)
    for p in (0.3, 0.6):
        covered = 0
        for rep in range(200):
            x = (rng.random(100) < p).astype(float)
            lo, hi = stats.bootstrap_ci(x, resamples=1000, seed=rep)
            covered += lo <= p <= hi
        assert covered >= 180, (p, covered)


def test_seed_bootstrap_covers_and_is_wider_than_items_alone():
    """Seeds whose own accuracy varies (p_s ~ p + N(0, 0.1)): the nested interval covers p in
    ≥ 85 % of 100 repetitions with 8 seeds, where the pooled item interval does not."""
    rng = np.random.default_rng(1)
    p, nested, pooled = 0.5, 0, 0
    for rep in range(100):
        ps = np.clip(p + rng.normal(0, 0.1, 8), 0, 1)
        groups = [(rng.random(50) < q).astype(float) for q in ps]
        lo, hi = stats.bootstrap_ci(groups, resamples=500, seed=rep)
        nested += lo <= p <= hi
        lo, hi = stats.bootstrap_ci(np.concatenate(groups), resamples=500, seed=rep)
        pooled += lo <= p <= hi
    assert nested >= 85 and pooled < nested, (nested, pooled)


def test_paired_test_binary_and_graded():
    a = [1] * 30 + [1] * 10 + [0] * 2 + [0] * 58  # A right on 40, B right on 32 (30 shared)
    b = [1] * 30 + [0] * 10 + [1] * 2 + [0] * 58
    t = stats.paired_test(a, b)
    assert t["test"] == "mcnemar_exact" and (t["a_only"], t["b_only"]) == (10, 2)
    assert t["difference"] == pytest.approx(0.08) and t["p_value"] == pytest.approx(
        stats.mcnemar_exact(10, 2)
    )
    assert t["ci"][0] < 0.08 < t["ci"][1]
    same = stats.paired_test(a, a)
    assert same["difference"] == 0.0 and same["p_value"] == 1.0 and same["ci"] == [0.0, 0.0]
    g = stats.paired_test([0.5, 0.9, 0.7, 0.8] * 10, [0.4, 0.5, 0.6, 0.7] * 10)  # F1-like scores
    assert g["test"] == "sign_flip_permutation" and g["p_value"] < 0.01 and g["ci"][0] > 0
    assert "A − B = +17.5 points" in stats.describe(g)
    with pytest.raises(ValueError, match="equal-length"):
        stats.paired_test([1, 0], [1])
