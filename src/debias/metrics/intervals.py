"""How sure a score is: a bootstrap interval for FID (and sFID), FID∞, and KID's standard error.

FID and sFID are Fréchet distances between the Gaussian fit of generated features X float64 (N, D)
and FIXED reference statistics μ_r (D,), Σ_r (D, D): every run being compared is scored against the
same reference, so only the generated side is resampled and the reference's own noise is left out.

- :func:`bootstrap_fid` — FID (any feature width: sFID too) with a basic bootstrap interval for the
  population FID, the bootstrap standard deviation and the bootstrap estimate of FID's upward bias.
- :func:`fid_infinity` — Chong & Forsyth's effectively unbiased FID∞: FID at several sample counts,
  fitted linearly in 1/N and read at 1/N = 0.
- :func:`kid_interval` — the standard error and interval of torch-fidelity's KID, from its ``kid_std``.

All three return frozen dataclasses of plain floats and tuples, for ``dataclasses.asdict`` and JSON.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from statistics import NormalDist

import numpy as np

from debias.metrics.frechet import sqrt_psd


_ROOTS: dict[str, np.ndarray] = {}  # Σ_r^½ by the digest of Σ_r: one square root per reference and process


def reference_root(sigma_ref: np.ndarray) -> np.ndarray:
    """Σ_r^½ of a reference covariance (D, D), computed once per process for the few references it scores
    against (the FID and sFID statistics of the pipeline's reference, at every step count and solver)."""
    key = hashlib.sha256(np.ascontiguousarray(sigma_ref).tobytes()).hexdigest()
    if key not in _ROOTS:
        if len(_ROOTS) >= 4:
            _ROOTS.pop(next(iter(_ROOTS)))
        _ROOTS[key] = sqrt_psd(sigma_ref)
    return _ROOTS[key]


class FrechetToReference:
    """Fréchet distances from subsets of generated features X (N, D) to fixed reference statistics
    μ_r (D,), Σ_r (D, D), at the cost of one D×D square root for all subsets.

    For the rows S (n of them, repeats allowed),
    FID = ‖μ_S − μ_r‖² + tr Σ_r + tr Σ_S − 2 tr (Σ_r^½ Σ_S Σ_r^½)^½
    (Heusel et al. 2017, in the symmetric form of :func:`debias.metrics.frechet.frechet_distance`). With
    Z = X Σ_r^½ (once) and Y = Z_S − mean(Z_S), Σ_r^½ Σ_S Σ_r^½ = YᵀY / (n − 1), whose nonzero eigenvalues
    are those of Y Yᵀ / (n − 1): an n×n eigenproblem when n < D, the D×D one otherwise, so a subset
    costs O(n·D·min(n, D)). Eigenvalues below the numerical-rank tolerance (``np.linalg.matrix_rank``'s,
    λ_max·size·ε) are taken as the exact zeros they are (rank ≤ n − 1): as ±ε round-off, each would add
    √ε to the trace, as it does in the D×D route of :func:`debias.metrics.frechet.frechet_distance`.
    """

    def __init__(self, features: np.ndarray, mu_ref: np.ndarray, sigma_ref: np.ndarray):
        x = np.asarray(features, np.float64)
        mu_ref, sigma_ref = np.asarray(mu_ref, np.float64), np.asarray(sigma_ref, np.float64)
        if x.ndim != 2 or mu_ref.shape != x.shape[1:] or sigma_ref.shape != mu_ref.shape * 2:
            raise ValueError(f"need features (N, D), mu (D,) and sigma (D, D); got {x.shape}, {mu_ref.shape}, "
                             f"{sigma_ref.shape}")
        self.features = x
        self._rooted = x @ reference_root(sigma_ref)  # Z = X Σ_r^½, (N, D)
        self._mu_ref = mu_ref
        self._trace_ref = float(np.trace(sigma_ref))

    def __len__(self) -> int:
        return len(self.features)

    def __call__(self, rows: np.ndarray | None = None) -> float:
        """FID of the feature rows ``rows`` int (n,), n >= 2, repeats allowed (all N rows when None)."""
        x = self.features if rows is None else self.features[rows]
        z = self._rooted if rows is None else self._rooted[rows]
        n, d = x.shape
        if n < 2:
            raise ValueError(f"FID needs at least 2 samples, got {n}")
        centred, y = x - x.mean(axis=0), z - z.mean(axis=0)
        gram = y @ y.T if n < d else y.T @ y  # same nonzero eigenvalues; the smaller of n×n and D×D
        eig = np.linalg.eigvalsh(gram / (n - 1))
        tolerance = max(eig.max(), 0.0) * len(eig) * np.finfo(np.float64).eps  # below: round-off of exact zeros
        tr_covmean = np.sqrt(eig[eig > tolerance]).sum()
        diff = x.mean(axis=0) - self._mu_ref
        return float(diff @ diff + self._trace_ref + np.sum(centred * centred) / (n - 1) - 2 * tr_covmean)


@dataclass(frozen=True)
class Interval:
    """A score as reported (``estimate``), its standard deviation ``std`` and the interval [low, high]
    at ``level`` for the population value; low/high/std are None where the data cannot give them."""

    estimate: float
    low: float | None
    high: float | None
    std: float | None
    level: float


@dataclass(frozen=True)
class BootstrapInterval(Interval):
    """:class:`Interval` from ``replicates`` bootstrap resamples of the N generated samples; ``bias``
    is the bootstrap's estimate of the estimate's bias, mean(FID*) − FID."""

    bias: float
    n: int
    replicates: int


def _check_level(level: float) -> None:
    if not 0 < level < 1:
        raise ValueError(f"the level must be in (0, 1), got {level}")


def bootstrap_fid(features: np.ndarray, mu_ref: np.ndarray, sigma_ref: np.ndarray, *, replicates: int = 200,
                  level: float = 0.95, seed: int = 0) -> BootstrapInterval:
    """FID of generated features (N, D) against fixed reference statistics μ_r (D,), Σ_r (D, D) — sFID
    with the spatial features and statistics — with a bootstrap interval over the generated samples.

    The rows are resampled with replacement ``replicates`` times (``np.random.default_rng(seed)``) and
    FID* recomputed. FID at finite N is biased upward (Chong & Forsyth 2020): the replicates are
    centred near FID + bias, not near FID, so the percentile interval [q_lo, q_hi] of FID* sits about
    twice the bias above the population FID and misses it (41 % coverage of the true FID at D = 16,
    N = 128 in tests/test_intervals.py). The basic (reverse-percentile) interval
    [2·FID − q_hi, 2·FID − q_lo] (Davison & Hinkley 1997, §5.2) reflects the replicates about FID and
    so subtracts the bias once: it covers the population FID — the distance between the generator's and
    the reference's Gaussians, N → ∞ — at its nominal rate while FID's bias is near linear in 1/N
    (95.3 % for 95 % there, 300 trials). It is intersected with [0, ∞), where FID lies.

    Far below the features' effective dimension the bias is as large as FID itself and no longer
    linear in 1/N: the bootstrap underestimates it and the interval lies above the population FID.
    Measured on Gaussians (200 trials): with a flat spectrum 83 % at D = 32, N = 24 and 0 % at D = 64,
    N = 32; with a decaying one (eigenvalues ∝ k^−1.5, closer to Inception features) 90 % at N = D/2,
    77 % at N = D/4. FID of N = 128 Inception features (D = 2048) is in that regime: there compare
    runs at equal N with ``std``, the spread of FID at this N (an overestimate, since resamples repeat
    rows), or over seeds (:mod:`debias.seeds`), not with the interval.
    Cost: one D×D square root, then O(N·D·min(N, D)) per replicate: 200 replicates at N = 128,
    D = 2048 took 5.6 s on one CPU thread (3.2 s of it the square root). Efron & Tibshirani (1993)
    advise B ≥ 1000 for an interval's endpoints; 200 is the default for speed.
    """
    _check_level(level)
    if replicates < 2:
        raise ValueError(f"need at least 2 bootstrap replicates, got {replicates}")
    fid = FrechetToReference(features, mu_ref, sigma_ref)
    n, rng = len(fid), np.random.default_rng(seed)
    estimate = fid()
    boot = np.array([fid(rng.integers(0, n, n)) for _ in range(replicates)])
    q_low, q_high = np.quantile(boot, [(1 - level) / 2, (1 + level) / 2])
    return BootstrapInterval(estimate=estimate, low=float(max(2 * estimate - q_high, 0.0)),
                             high=float(max(2 * estimate - q_low, 0.0)), std=float(boot.std(ddof=1)), level=level,
                             bias=float(boot.mean() - estimate), n=n, replicates=replicates)


FID_INFINITY_POINTS = 15  # Chong & Forsyth's code fits 15 counts


def fid_infinity_counts(n: int, dim: int, points: int = FID_INFINITY_POINTS) -> tuple[int, ...]:
    """The sample counts FID∞ is fitted on: ``points`` counts evenly spaced from N_min to N, with
    N_min = max(N/10, min(N/2, 2D)).

    Chong & Forsyth use 15 counts evenly spaced from 5 000 to 50 000 — [N/10, N] at N = 50 000, whose
    smallest subset is about 2.4 D for D = 2048, where FID's bias is close to linear in 1/N. At small N
    the lower end is raised towards 2D, at most to N/2 (N = 128, D = 2048: 64…128): below D the bias is
    far from linear in 1/N. On Gaussians with a flat spectrum (D = 512, N = 128, true FID 257, 30 trials)
    FID_N was 397 too high, FID∞ fitted on [N/10, N] 427, on [N/2, N] 263; with a decaying spectrum
    0.29, 0.28 and 0.14 too high (true FID 9.0). Fewer counts when N is too small for ``points`` distinct ones.
    """
    low = max(n // 10, min(n // 2, 2 * dim), 2)
    return tuple(int(k) for k in np.unique(np.linspace(low, n, points).astype(int)))


@dataclass(frozen=True)
class FIDInfinity:
    """FID∞ (``value``), the fitted ``slope`` of FID in 1/N, and the points (``counts``, ``fids``) it was
    fitted on."""

    value: float
    slope: float
    counts: tuple[int, ...]
    fids: tuple[float, ...]


def fid_infinity(features: np.ndarray, mu_ref: np.ndarray, sigma_ref: np.ndarray, *,
                 counts: tuple[int, ...] | None = None, seed: int = 0) -> FIDInfinity:
    """Effectively unbiased FID∞ of generated features (N, D) against fixed reference statistics μ_r (D,),
    Σ_r (D, D) (Chong & Forsyth, "Effectively Unbiased FID and Inception Score and where to find them",
    CVPR 2020).

    FID_N ≈ FID∞ + k / N to first order in 1/N: FID is computed on a random subset of each size N_i in
    ``counts`` (default :func:`fid_infinity_counts`; a fresh permutation from
    ``np.random.default_rng(seed)`` per count, as the authors' code shuffles per count), a line is fitted
    to (1/N_i, FID_i) by least squares, and FID∞ is its value at 1/N = 0. It removes most of the bias
    while N is above the features' effective dimension (D = 16, N = 128: FID_N 0.52 above the FID of
    40 000 samples, FID∞ 0.04 below, at a slightly larger spread, 0.54 vs 0.46; tests/test_intervals.py);
    far below it (N = 128 Inception features) the bias is not linear in 1/N and FID∞ keeps much of it.
    """
    fid = FrechetToReference(features, mu_ref, sigma_ref)
    n = len(fid)
    counts = fid_infinity_counts(n, fid.features.shape[1]) if counts is None else tuple(int(k) for k in counts)
    if len(set(counts)) < 2 or min(counts) < 2 or max(counts) > n:
        raise ValueError(f"need at least 2 distinct counts in [2, {n}], got {counts}")
    rng = np.random.default_rng(seed)
    fids = tuple(fid(rng.permutation(n)[:k]) for k in counts)
    slope, value = np.polyfit(1 / np.array(counts, np.float64), fids, 1)
    return FIDInfinity(value=float(value), slope=float(slope), counts=counts, fids=fids)


def kid_interval(kid: float, kid_std: float, *, subset_size: int, subsets: int, n_generated: int,
                 n_reference: int, level: float = 0.95) -> Interval:
    """KID with its standard error and a normal interval for the population KID (MMD²), from
    torch-fidelity's ``kid`` and ``kid_std``.

    torch-fidelity draws ``subsets`` subsets of m = ``subset_size`` rows from each set (without
    replacement within a subset, independently across subsets), computes the unbiased MMD² U_s of each
    (Bińkowski et al. 2018) and returns kid = mean U_s and kid_std = std U_s (ddof = 0). kid_std is the
    spread of a KID computed from m samples — not the uncertainty of kid: ±1.96·kid_std is far too wide
    when m ≪ N, and kid_std/√subsets far too narrow, since the subsets share samples.

    Var(kid) = Var(E[kid | data]) + E[Var(kid | data)]. The second term is s²/S with s² = kid_std²·S/(S−1).
    E[kid | data] is the unbiased MMD² of all the samples, and MMD² of n samples has variance ≈ c/n
    (Hoeffding 1948, a non-degenerate U-statistic); with Var U_m = Var U_N + E s², that gives
    Var U_N ≈ s²·m/(N − m). So SE² = s²·(m/(N − m) + 1/S), N = min(n_generated, n_reference) —
    conservative for unequal sets and when the two distributions are close (a degenerate U-statistic,
    variance ∝ 1/n²). As an unbiased estimate, KID needs no bias correction. The interval is
    kid ± z·SE, intersected with [0, ∞) (tests/test_intervals.py: 94.0 % coverage for 95 %, 400 trials).
    With subset_size = N every subset is the whole set and kid_std is 0: no interval (None).
    """
    _check_level(level)
    n = min(n_generated, n_reference)
    if subsets < 2 or subset_size >= n:
        return Interval(estimate=kid, low=None, high=None, std=None, level=level)
    spread = kid_std * np.sqrt(subsets / (subsets - 1))
    se = float(spread * np.sqrt(subset_size / (n - subset_size) + 1 / subsets))
    z = NormalDist().inv_cdf((1 + level) / 2)
    return Interval(estimate=kid, low=max(kid - z * se, 0.0), high=max(kid + z * se, 0.0), std=se, level=level)


def score_intervals(features: dict[str, np.ndarray], reference: dict[str, tuple[np.ndarray, np.ndarray]],
                    scores: dict[str, float], *, replicates: int, level: float, infinity: bool, kid_subset_size: int,
                    kid_subsets: int, n_generated: int, n_reference: int | None, seed: int) -> dict[str, dict]:
    """The uncertainty of the ``scores`` :func:`debias.metrics.scores.compute_metrics` found, as plain dicts
    for JSON: ``fid`` and ``sfid`` — :func:`bootstrap_fid` of the generated ``features`` {"fid": (N, 2048),
    "sfid": (N, 2023)} against the ``reference`` {metric: (μ, Σ)} with ``replicates`` resamples (none when 0);
    ``kid`` — :func:`kid_interval` from ``kid`` and ``kid_std`` (with a reference of known size);
    ``fid_infinity`` — :func:`fid_infinity` when ``infinity``. Each holds its ``method``."""
    out: dict[str, dict] = {}
    for metric in ("fid", "sfid"):
        if replicates and metric in scores:
            found = bootstrap_fid(features[metric], *reference[metric], replicates=replicates, level=level, seed=seed)
            out[metric] = {**asdict(found), "method": "basic bootstrap of the generated samples against the fixed "
                                                      "reference statistics"}
    if replicates and "kid" in scores and n_reference is not None:
        found = kid_interval(scores["kid"], scores["kid_std"], subset_size=kid_subset_size, subsets=kid_subsets,
                             n_generated=n_generated, n_reference=n_reference, level=level)
        out["kid"] = {**asdict(found), "method": "normal interval of the standard error over the KID subsets"}
    if infinity and "fid" in scores:
        out["fid_infinity"] = {**asdict(fid_infinity(features["fid"], *reference["fid"], seed=seed)),
                               "method": "FID at several sample counts, extrapolated linearly in 1/N "
                                         "(Chong & Forsyth 2020)"}
    return out
