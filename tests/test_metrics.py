import numpy as np
import pytest
import torch

from difflab import metrics


def test_frechet_distance_matches_the_closed_form_for_known_gaussians():
    # For commuting (here diagonal) covariances FD = |mu_a - mu_b|^2 + sum (sqrt(a_i) - sqrt(b_i))^2.
    mu_a, mu_b = np.array([0.0, 1.0, -2.0]), np.array([1.0, 1.0, 0.5])
    va, vb = np.array([1.0, 4.0, 0.25]), np.array([2.0, 1.0, 0.25])
    closed = ((mu_a - mu_b) ** 2).sum() + ((np.sqrt(va) - np.sqrt(vb)) ** 2).sum()
    got = metrics.gaussian_frechet(mu_a, np.diag(va), mu_b, np.diag(vb))
    assert abs(got - closed) / closed < 1e-6
    # a full (non-diagonal) covariance against itself, shifted: only the mean term is left
    rng = np.random.default_rng(0)
    m = rng.normal(size=(4, 4))
    s = m @ m.T + np.eye(4)
    assert abs(metrics.gaussian_frechet(np.zeros(4), s, np.ones(4), s) - 4.0) < 1e-6


def test_frechet_distance_on_samples_converges():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(20000, 2, generator=g)
    b = torch.randn(20000, 2, generator=g) * 2 + 1
    # closed form: |(1,1)|^2 + 2 * (1 - 2)^2 = 4
    assert abs(metrics.frechet_distance(a, b) - 4.0) < 0.1


def test_kid_is_unbiased_and_detects_a_shift():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2000, 8, generator=g)
    y = torch.randn(2000, 8, generator=g)
    mean, std = metrics.kid(x, y, subsets=50, subset_size=200)
    assert abs(mean) < 3 * std / np.sqrt(50) + 1e-3   # within noise of 0
    shifted, _ = metrics.kid(x, y + 0.5, subsets=50, subset_size=200)
    assert shifted > 20 * abs(mean) and shifted > 0.01


def test_two_afc_by_hand():
    d0 = [0.1, 0.5, 0.3, 0.2]
    d1 = [0.2, 0.4, 0.3, 0.1]
    p1 = [0.0, 1.0, 1.0, 0.5]
    # agree, agree, tie (half), soft vote 0.5 -> 0.5
    assert metrics.two_afc(d0, d1, p1) == pytest.approx((1 + 1 + 0.5 + 0.5) / 4)


def test_average_precision_and_recall_by_hand():
    scores = [0.9, 0.8, 0.7, 0.6, 0.5]
    rel = [1, 0, 1, 0, 0]
    assert metrics.average_precision(scores, rel) == pytest.approx((1 / 1 + 2 / 3) / 2)
    assert metrics.recall_at_k(scores, rel, 1) == 0.5 and metrics.recall_at_k(scores, rel, 3) == 1.0
    out = metrics.retrieval_metrics([scores, scores[::-1]], [rel, rel], ks=(1,))
    # second ranking: relevant at ranks 3 and 5 -> AP (1/3 + 2/5) / 2
    assert out["map"] == pytest.approx(((1 + 2 / 3) / 2 + (1 / 3 + 2 / 5) / 2) / 2)


def test_clip_score_and_diversity():
    e = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert metrics.clip_score(e, e) == pytest.approx(100.0)
    assert metrics.clip_score(e, -e) == 0.0
    assert metrics.diversity(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])) == pytest.approx((1 + 2 + 1) / 3)


def test_cluster_bootstrap_interval_widens_with_correlated_clusters_and_covers_the_mean():
    # 8 models x 16 queries, every query of a model scoring the same (4 models 0, 4 models 1): 8 independent
    # values, not 128, so the interval must be far wider than the one that treats queries as independent
    values = np.repeat([0, 1, 0, 1, 1, 0, 0, 1], 16).astype(float)
    models = np.repeat(np.arange(8), 16)
    lo, hi = metrics.cluster_bootstrap_ci(values, models)
    lo_iid, hi_iid = metrics.cluster_bootstrap_ci(values, np.arange(128))
    assert lo < 0.5 < hi and lo_iid < 0.5 < hi_iid
    assert hi - lo > 2 * (hi_iid - lo_iid)
    assert metrics.cluster_bootstrap_ci(np.full(32, 0.7), np.repeat(np.arange(4), 8)) == pytest.approx((0.7, 0.7))
    # calibration: a 90 % interval covers the true mean of clustered data about 90 % of the time
    rng = np.random.default_rng(0)
    covered = []
    for _ in range(200):
        effect = rng.normal(0, 1, 20)   # 20 clusters of 10 values, true mean 0
        x = np.repeat(effect, 10) + rng.normal(0, 0.5, 200)
        lo, hi = metrics.cluster_bootstrap_ci(x, np.repeat(np.arange(20), 10), level=0.9, draws=1000,
                                              seed=int(rng.integers(1 << 30)))
        covered.append(lo <= 0 <= hi)
    assert 0.8 <= np.mean(covered) <= 0.97
