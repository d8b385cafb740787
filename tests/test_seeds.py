"""Seeds as an axis (debias.seeds): recipes grouped on everything but the seeds, intervals over seeds
only where there are seeds to make one, paired differences and their one-line summaries."""

import numpy as np
import pytest
from scipy import stats

from debias.seeds import (format_difference, format_summary, group_recipes, metric_title, paired_difference,
                          summarize, t_quantile)


def run(weighting: str, seed: int, fid: float, sample_seed: int = 0, **params) -> dict:
    return {"name": f"{weighting}-{seed}-{sample_seed}",
            "params": {"weighting": weighting, "target": "eps", "train.steps": 1000, "seed": seed,
                       "sample.seed": sample_seed, **params},
            "metrics": {"ddim.fid": fid, "ddim.kid": fid / 1000, "ddim.provenance.extractor": "inception"}}


@pytest.mark.parametrize("df", [*range(1, 31), 57, 100, 1000])
@pytest.mark.parametrize("level", [0.5, 0.9, 0.95, 0.99, 0.999])
def test_t_quantile_matches_scipy(df, level):
    assert t_quantile(level, df) == pytest.approx(stats.t.ppf((1 + level) / 2, df), rel=1e-11)


def test_the_interval_over_seeds_is_students():
    values = [10.0, 11.5, 12.0, None]  # None: a seed without the metric
    summary = summarize(values)
    low, high = stats.t.interval(0.95, 2, loc=np.mean(values[:3]), scale=stats.sem(values[:3]))
    assert summary.n == 3 and summary.mean == pytest.approx(11.1666666666)
    assert summary.std == pytest.approx(np.std(values[:3], ddof=1))
    assert (summary.low, summary.high) == pytest.approx((low, high), rel=1e-12)
    assert format_summary(summary) == "11.2 [8.6, 13.8], 3 seeds"


def test_one_seed_has_a_mean_and_no_made_up_spread():
    one = summarize([12.345])
    assert (one.n, one.mean, one.std, one.low, one.high) == (1, 12.345, None, None, None)
    assert format_summary(one) == "12.3, 1 seed (no interval)"
    recipe, = group_recipes([run("p2", 0, 12.345)])
    assert recipe.summary("ddim.fid") == one and recipe.label == "all runs"
    assert summarize([]).mean is None and format_summary(summarize([])) == "no values"


def test_grouping_ignores_only_the_seed_keys():
    runs = [run("constant", s, 10.0 + s) for s in range(3)] + [run("p2", s, 9.0 + s) for s in range(3)]
    runs += [run("p2", 0, 8.0, **{"train.steps": 2000}), run("p2", 0, 8.5, sample_seed=1, **{"train.steps": 2000})]
    constant, p2, longer = group_recipes(runs)
    assert constant.seeds == p2.seeds == ((0, 0), (1, 0), (2, 0))
    assert longer.seeds == ((0, 0), (0, 1)) and longer.values["ddim.fid"] == (8.0, 8.5)
    assert [r.label for r in (constant, p2, longer)] == ["weighting=constant, train.steps=1000",
                                                         "weighting=p2, train.steps=1000",
                                                         "weighting=p2, train.steps=2000"]
    assert p2.params == {"weighting": "p2", "target": "eps", "train.steps": 1000}
    assert p2.names == ("p2-0-0", "p2-1-0", "p2-2-0") and set(p2.values) == {"ddim.fid", "ddim.kid"}
    by_sample_seed = group_recipes(runs[:3], seed_keys=("sample.seed",))  # the training seed sets a recipe
    assert [r.label for r in by_sample_seed] == ["seed=0", "seed=1", "seed=2"]
    assert all(r.seeds == ((0,),) for r in by_sample_seed)


def test_a_seed_counts_once_and_an_unset_param_is_none():
    """The workspace and the commit it ran at are one draw, not two; a param one run lacks and another
    sets to None is the same recipe."""
    runs = [run("p2", 0, 9.0), run("p2", 0, 9.0), run("p2", 1, 9.4, ema=None)]
    recipe, = group_recipes(runs)
    assert recipe.seeds == ((0, 0), (1, 0)) and recipe.values["ddim.fid"] == (9.0, 9.4)
    a, b = group_recipes([run("p2", 0, 9.0), run("p2", 0, 9.1, ema=0.999)])
    assert (a.label, b.label) == ("ema=None", "ema=0.999")


def test_paired_differences_of_identical_recipes_contain_zero():
    fids = [10.0, 12.5, 9.0]
    same, twin = group_recipes([run("a", s, f) for s, f in enumerate(fids)] + [run("b", s, f) for s, f in enumerate(fids)])
    difference = paired_difference(same, twin, "ddim.fid")
    assert difference.summary.n == 3 and difference.summary.low <= 0 <= difference.summary.high
    assert format_difference(difference) == "weighting=a − weighting=b, FID ddim: +0.0 [+0.0, +0.0], 3 seeds"


def test_pairing_matches_seeds_and_removes_what_a_seed_does_to_both():
    """Seed effects of ±3 shared by both recipes: the paired interval is the t-interval of the
    per-seed differences, far narrower than either recipe's own."""
    seed_effect, gap = [3.0, -3.0, 0.5, -1.0], [1.1, 0.9, 1.0, 1.2]
    runs = [run("debias", s, 10 + e) for s, e in enumerate(seed_effect)]
    runs += [run("constant", s, 10 + e + g) for s, (e, g) in reversed(list(enumerate(zip(seed_effect, gap))))]
    debias, constant = group_recipes(runs)
    difference = paired_difference(debias, constant, "ddim.fid")
    diffs = -np.array(gap)
    low, high = stats.t.interval(0.95, 3, loc=diffs.mean(), scale=stats.sem(diffs))
    assert difference.seeds == ((0, 0), (1, 0), (2, 0), (3, 0))
    assert (difference.summary.low, difference.summary.high) == pytest.approx((low, high), rel=1e-12)
    own = debias.summary("ddim.fid")
    assert difference.summary.high - difference.summary.low < (own.high - own.low) / 10


def test_the_difference_in_one_line():
    half = 1.4 / (t_quantile(0.95, 2) / np.sqrt(3))  # the sample std giving a half-width of 1.4
    gaps = [-1.2 - half, -1.2, -1.2 + half]
    runs = [run("debias", s, 20.0 + g) for s, g in enumerate(gaps)] + [run("constant", s, 20.0) for s in range(3)]
    debias, constant = group_recipes(runs)
    line = format_difference(paired_difference(debias, constant, "ddim.fid"), names=("debias", "constant"))
    assert line == "debias − constant, FID ddim: −1.2 [−2.6, +0.2], 3 seeds"


def test_one_or_no_shared_seed_gives_no_interval():
    debias, constant = group_recipes([run("debias", 0, 9.0), run("debias", 1, 9.5), run("constant", 1, 10.0),
                                      run("constant", 2, 10.5)])
    one = paired_difference(debias, constant, "ddim.fid")
    assert one.seeds == ((1, 0),) and (one.summary.mean, one.summary.low) == (-0.5, None)
    assert format_difference(one).endswith("FID ddim: −0.500, 1 seed (no interval)")
    none = paired_difference(debias, constant, "ddim.sfid")
    assert none.summary.n == 0 and format_difference(none).endswith("no shared seeds")


def test_metric_titles():
    assert [metric_title(m) for m in ("ddim.fid", "fid", "dpm_solver.10.kid", "ddim.recall")] == [
        "FID ddim", "FID", "KID dpm_solver.10", "recall ddim"]
