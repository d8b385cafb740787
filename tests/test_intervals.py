"""Score uncertainty (debias.metrics.intervals) on synthetic Gaussian features, whose population FID
is known in closed form: the fast Fréchet route, the bootstrap interval's coverage, FID∞, KID's
standard error."""

from dataclasses import asdict

import numpy as np
import pytest
import torch
from torch_fidelity.metric_kid import kid_features_to_metric

from debias.metrics.intervals import (FrechetToReference, bootstrap_fid, fid_infinity, fid_infinity_counts,
                                      kid_interval)
from debias.metrics.scores import frechet_distance


def two_gaussians(dim: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """μ1 (D,), Σ1 (D, D) of the 'generator' and μ2, Σ2 of the 'reference', both well conditioned."""
    rng = np.random.default_rng(seed)
    a, b = rng.standard_normal((2, dim, dim)) / np.sqrt(dim)
    return 0.3 * rng.standard_normal(dim), a @ a.T + 0.1 * np.eye(dim), np.zeros(dim), b @ b.T + 0.1 * np.eye(dim)


def draw(mu: np.ndarray, sigma: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """n samples (n, D) of N(μ, Σ)."""
    return mu + rng.standard_normal((n, len(mu))) @ np.linalg.cholesky(sigma).T


@pytest.mark.parametrize("n,dim,repeats", [(64, 16, False), (64, 16, True), (300, 64, True), (64, 64, False)])
def test_the_fast_route_equals_frechet_distance(n, dim, repeats):
    """N ≥ D: the D×D route, bit for bit the same formula as scores.frechet_distance."""
    mu1, sigma1, mu2, sigma2 = two_gaussians(dim)
    rng = np.random.default_rng(1)
    x = draw(mu1, sigma1, n, rng)
    rows = rng.integers(0, n, n) if repeats else np.arange(n)
    expected = frechet_distance(mu2, sigma2, x[rows].mean(axis=0), np.cov(x[rows], rowvar=False))
    assert FrechetToReference(x, mu2, sigma2)(rows) == pytest.approx(expected, rel=1e-9, abs=0)


@pytest.mark.parametrize("n,dim", [(10, 32), (40, 64), (24, 96)])
def test_below_d_the_n_by_n_route_holds_the_nonzero_eigenvalues(n, dim):
    """N < D: the N×N Gram matrix Y Yᵀ/(N−1) has the N − 1 nonzero eigenvalues of Σ_r^½ Σ Σ_r^½. It
    equals frechet_distance to 1e-7 relative (measured: ~5e-9 at D = 32, 3e-8 at N = 128, D = 2048): the
    D×D route's D − N + 1 zero eigenvalues come out as ±ε‖Σ‖ and their square roots, √ε each, add up.
    With only the top N − 1 of them kept it agrees to 1e-12."""
    mu1, sigma1, mu2, sigma2 = two_gaussians(dim)
    x = draw(mu1, sigma1, n, np.random.default_rng(2))
    fast = FrechetToReference(x, mu2, sigma2)()
    mu, sigma = x.mean(axis=0), np.cov(x, rowvar=False)
    assert fast == pytest.approx(frechet_distance(mu2, sigma2, mu, sigma), rel=1e-7, abs=0)
    w, v = np.linalg.eigh(sigma2)
    root = (v * np.sqrt(w)) @ v.T
    top = np.linalg.eigvalsh(root @ sigma @ root)[-(n - 1):]
    exact = (mu - mu2) @ (mu - mu2) + np.trace(sigma) + np.trace(sigma2) - 2 * np.sqrt(top).sum()
    assert fast == pytest.approx(exact, rel=1e-12, abs=0)


def test_the_basic_bootstrap_interval_covers_the_population_fid():
    """300 data sets of N = 128 samples of a D = 16 Gaussian against exact reference statistics, B = 200
    replicates each: the 95 % basic interval covers the closed-form FID in 95.3 % of them (286/300), the
    percentile interval (its reflection about FID) in only 41.0 % (123/300), since the replicates sit
    about FID's upward bias (≈ 0.5 here, the interval ≈ ±0.8) above FID, itself that much above the
    population FID."""
    mu1, sigma1, mu2, sigma2 = two_gaussians(16)
    true = frechet_distance(mu1, sigma1, mu2, sigma2)
    rng, trials = np.random.default_rng(3), 300
    basic = percentile = 0
    for trial in range(trials):
        result = bootstrap_fid(draw(mu1, sigma1, 128, rng), mu2, sigma2, replicates=200, seed=trial)
        assert 0 < result.low < result.high
        basic += result.low <= true <= result.high
        percentile += 2 * result.estimate - result.high <= true <= 2 * result.estimate - result.low
    assert 0.92 <= basic / trials <= 0.98, f"basic interval covered {basic}/{trials}"
    assert percentile / trials < 0.6, f"percentile interval covered {percentile}/{trials}"


def test_the_bootstrap_is_reproducible_and_reports_the_bias():
    mu1, sigma1, mu2, sigma2 = two_gaussians(8)
    x = draw(mu1, sigma1, 64, np.random.default_rng(4))
    first, again = (bootstrap_fid(x, mu2, sigma2, replicates=50, seed=7) for _ in range(2))
    assert first == again and first != bootstrap_fid(x, mu2, sigma2, replicates=50, seed=8)
    assert first.estimate == FrechetToReference(x, mu2, sigma2)() and first.bias > 0 and first.std > 0
    assert set(asdict(first)) == {"estimate", "low", "high", "std", "level", "bias", "n", "replicates"}
    with pytest.raises(ValueError):
        bootstrap_fid(x, mu2, sigma2, level=1.0)


def test_default_fid_infinity_counts():
    """Chong & Forsyth's 15 counts from 5 000 to 50 000 at N = 50 000; the upper half at N = 128, D = 2048."""
    assert fid_infinity_counts(50_000, 2048) == tuple(np.linspace(5000, 50_000, 15).astype(int))
    assert fid_infinity_counts(128, 2048) == tuple(np.linspace(64, 128, 15).astype(int))
    assert fid_infinity_counts(1000, 16)[0] == 100 and fid_infinity_counts(6, 16) == (3, 4, 5, 6)


def test_fid_infinity_is_nearer_the_large_n_fid_than_fid_at_small_n():
    """200 data sets of N = 128 samples, D = 16: averaged over them, FID_128 is 0.52 above the FID of
    40 000 samples and FID∞ 0.04 below it (their spreads: 0.46 and 0.54)."""
    mu1, sigma1, mu2, sigma2 = two_gaussians(16)
    rng = np.random.default_rng(5)
    large = FrechetToReference(draw(mu1, sigma1, 40_000, rng), mu2, sigma2)()
    assert large == pytest.approx(frechet_distance(mu1, sigma1, mu2, sigma2), abs=0.1)
    plain, infinity = [], []
    for trial in range(200):
        x = draw(mu1, sigma1, 128, rng)
        plain.append(FrechetToReference(x, mu2, sigma2)())
        result = fid_infinity(x, mu2, sigma2, seed=trial)
        assert result.counts == fid_infinity_counts(128, 16) and len(result.fids) == len(result.counts)
        infinity.append(result.value)
    plain_error, infinity_error = abs(np.mean(plain) - large), abs(np.mean(infinity) - large)
    assert plain_error > 0.3 and infinity_error < plain_error / 3, (plain_error, infinity_error)


def test_fid_infinity_refuses_counts_it_cannot_fit():
    mu1, sigma1, mu2, sigma2 = two_gaussians(4)
    x = draw(mu1, sigma1, 20, np.random.default_rng(6))
    for counts in [(10, 10), (1, 20), (10, 21)]:
        with pytest.raises(ValueError):
            fid_infinity(x, mu2, sigma2, counts=counts)


def population_kid(mu: np.ndarray, scale: float, dim: int, rng: np.random.Generator, pairs: int = 500_000) -> float:
    """MMD² of the cubic kernel k(x, y) = (x·y/D + 1)³ between N(μ, I) and N(0, scale² I), by Monte Carlo
    over independent pairs (each term's error ≈ 1e-3, a fiftieth of KID's standard error below)."""
    def k(a, b):
        return np.mean((np.sum(a * b, axis=1) / dim + 1) ** 3)
    x1, x2 = mu + rng.standard_normal((2, pairs, dim))
    y1, y2 = scale * rng.standard_normal((2, pairs, dim))
    return k(x1, x2) + k(y1, y2) - k(x1, y1) - k(x2, y2)


def test_kid_interval_covers_the_population_kid():
    """400 pairs of sets of N = 400 samples (D = 8), torch-fidelity's KID over 50 subsets of 100: the 95 %
    interval covers the population MMD² in 94.0 % of them (376/400), its standard error is within 15 % of
    the spread of kid over the data sets (measured 0.068 vs 0.064), while kid ± 1.96·kid_std/√50 covers
    in 37.5 %."""
    dim, n, size, subsets, trials = 8, 400, 100, 50, 400
    rng, mu = np.random.default_rng(7), np.full(dim, 0.3)
    true = population_kid(mu, 1.1, dim, rng)
    kids, errors, covered, naive = [], [], 0, 0
    for trial in range(trials):
        gen, ref = mu + rng.standard_normal((n, dim)), 1.1 * rng.standard_normal((n, dim))
        out = kid_features_to_metric(torch.from_numpy(gen), torch.from_numpy(ref), kid_subsets=subsets,
                                     kid_subset_size=size, rng_seed=trial, verbose=False)
        kid, kid_std = out["kernel_inception_distance_mean"], out["kernel_inception_distance_std"]
        result = kid_interval(kid, kid_std, subset_size=size, subsets=subsets, n_generated=n, n_reference=n)
        kids.append(kid)
        errors.append(result.std)
        covered += result.low <= true <= result.high
        naive += abs(kid - true) <= 1.96 * kid_std / np.sqrt(subsets)
    assert 0.92 <= covered / trials <= 0.98, f"covered {covered}/{trials}"
    assert np.mean(errors) == pytest.approx(np.std(kids), rel=0.15)
    assert naive / trials < 0.6


def test_kid_from_whole_sets_has_no_interval():
    """With subset_size = N every subset is the whole set: kid_std is 0 and says nothing."""
    result = kid_interval(0.01, 0.0, subset_size=1000, subsets=100, n_generated=1000, n_reference=5000)
    assert (result.estimate, result.low, result.high, result.std) == (0.01, None, None, None)
