"""Scaling-law fits recover the laws synthetic data were drawn from, inside their bootstrap intervals."""
import dataclasses
import json
import pickle

import numpy as np
import pytest
from threadpoolctl import threadpool_info

from scaling import fits
from scaling.fits import (CHINCHILLA, POWER_LAW, SATURATING_POWER_LAW, FitError, bootstrap, correlations,
                          extrapolation_check, fit_law, frontier, isoflop, parallel_fits, size_classes)
from scaling.results import paper_results

N_BOOT = 200  # enough for stable 95% intervals at this noise; the report's default is 1000


def assert_recovers(fit, truth, rtol):
    """Every true coefficient inside its interval, and the point estimate close to it."""
    intervals = fit.intervals()
    for (name, value), estimate in zip(truth.items(), fit.params):
        low, high = intervals[name]
        assert low <= value <= high, f"{name}: {value} not in [{low}, {high}]"
        assert estimate == pytest.approx(value, rel=rtol), name


def test_paper_correlation_of_fid_with_log_gflops():
    paper = paper_results()
    c = correlations(np.log10(paper.gflops), paper.fid)
    assert c["n"] == 12
    assert c["pearson_r"] == pytest.approx(-0.93, abs=0.005)
    assert c["spearman_rho"] == pytest.approx(-0.916, abs=0.001)
    assert c["pearson_p"] < 1e-4


def test_power_law_slope_is_the_least_squares_slope_in_log_log():
    paper = paper_results()
    fit = fit_law(POWER_LAW, paper.gflops, paper.fid, n_boot=N_BOOT)
    slope, intercept = np.polyfit(np.log10(paper.gflops), np.log10(paper.fid), 1)
    assert fit.params[1] == pytest.approx(slope, rel=1e-10)
    assert fit.params[0] == pytest.approx(10 ** intercept, rel=1e-10)
    low, high = fit.intervals()["b"]
    assert low < slope < high < 0


def test_power_law_recovers_known_coefficients():
    rng = np.random.default_rng(0)
    x = np.logspace(0, 3, 30)
    y = 80 * x ** -0.4 * np.exp(rng.normal(0, 0.05, x.size))
    assert_recovers(fit_law(POWER_LAW, x, y, n_boot=N_BOOT), {"a": 80, "b": -0.4}, rtol=0.05)


def test_saturating_power_law_recovers_known_coefficients():
    rng = np.random.default_rng(1)
    c = np.logspace(8, 12, 30)
    loss = (0.3 + 40 * c ** -0.2) * np.exp(rng.normal(0, 0.01, c.size))
    fit = fit_law(SATURATING_POWER_LAW, c, loss, n_boot=N_BOOT)
    assert_recovers(fit, {"E": 0.3, "A": 40, "alpha": 0.2}, rtol=0.1)
    low, high = fit.band(c)
    assert np.all(low <= fit.predict(c) + 1e-12) and np.all(fit.predict(c) <= high + 1e-12)


def test_chinchilla_approach_3_recovers_known_coefficients():
    rng = np.random.default_rng(2)
    n, d = np.meshgrid(np.logspace(7, 9, 6), np.logspace(8, 11, 6))
    n, d = n.ravel(), d.ravel()
    truth = {"E": 1.7, "A": 400.0, "alpha": 0.34, "B": 410.0, "beta": 0.28}
    loss = (truth["E"] + truth["A"] / n ** truth["alpha"] + truth["B"] / d ** truth["beta"])
    loss *= np.exp(rng.normal(0, 0.003, n.size))
    fit = fit_law(CHINCHILLA, np.column_stack([n, d]), loss, n_boot=N_BOOT)
    assert_recovers(fit, truth, rtol=0.15)
    assert fit.law.formula == "L = E + A/N^α + B/D^β"


def test_fits_in_worker_processes_equal_the_fits_in_one(monkeypatch):
    """The grid of starts and the bootstrap of L(N, D), spread over 2 spawned processes: the same numbers."""
    rng = np.random.default_rng(5)
    n, d = (v.ravel() for v in np.meshgrid(np.logspace(7, 9, 4), np.logspace(8, 11, 4)))
    loss = (1.7 + 400 / n ** 0.34 + 410 / d ** 0.28) * np.exp(rng.normal(0, 0.01, n.size))
    trials = np.repeat(np.arange(4), 4)
    monkeypatch.setattr(fits, "PARALLEL_ABOVE_S", 0.0)  # however fast this machine fits
    serial = fit_law(CHINCHILLA, np.column_stack([n, d]), loss, trials, n_boot=60)
    with parallel_fits(2):
        parallel = fit_law(CHINCHILLA, np.column_stack([n, d]), loss, trials, n_boot=60)
        assert fits._parallel[1] is not None  # the workers were used
        pool, _ = fits._executor()  # and their BLAS runs one thread each, as in this process
        assert {lib["num_threads"] for lib in pool.submit(threadpool_info).result()} == {1}
    np.testing.assert_array_equal(parallel.params, serial.params)
    np.testing.assert_array_equal(parallel.boot, serial.boot)
    assert len(serial.boot) > 20  # resamples with fewer than 3 sizes cannot be fitted
    # Every law pickles, so its bootstrap can reach the workers (a closure in a law kept it in this process).
    for law in (POWER_LAW, SATURATING_POWER_LAW, CHINCHILLA, fits.N_OPT_LAW, fits.STEPS_OPT_LAW):
        again = pickle.loads(pickle.dumps(law))
        assert law.limits is None or again.limits([2.0, 3.0]) == law.limits([2.0, 3.0])


def test_too_few_points_raise_fit_error_with_the_reason():
    with pytest.raises(FitError, match="needs at least 4 distinct points, got 3"):
        fit_law(SATURATING_POWER_LAW, [1, 2, 3], [3.0, 2.0, 1.5])
    with pytest.raises(FitError, match="needs at least 3 distinct points, got 2"):
        fit_law(POWER_LAW, [1, 2, 2, np.nan], [3.0, 2.0, 2.1, 5.0])  # NaN dropped, repeats are one x
    with pytest.raises(FitError, match="3 distinct model sizes N, got 2"):
        fit_law(CHINCHILLA, np.column_stack([[1e6, 1e7] * 5, np.logspace(8, 9, 10)]), np.linspace(3, 2, 10))
    with pytest.raises(FitError, match="at least 3 points"):
        correlations([1.0, 2.0], [3.0, 1.0])
    # "needs at least 3 points with spread, got 3" named neither the cause nor the quantity.
    with pytest.raises(FitError, match="^a correlation needs points that differ; every FID of the 3 is 20$"):
        correlations([1.0, 2.0, 3.0], [20.0, 20.0, 20.0], ("log10 Gflops", "FID"))


def test_bootstrap_resamples_whole_groups_and_drops_failed_fits():
    groups = np.array(["a", "a", "b", "c", "c", "c"])
    seen = []

    def estimate(idx):
        seen.append(idx)
        if len(set(groups[idx])) == 1:
            raise FitError("one trial only")
        return [len(idx)]

    boot, sets = bootstrap(groups, estimate, 1, n_boot=300, seed=0)
    for idx in seen:  # every resample is a union of complete trials, duplicates included
        for g in set(groups[idx]):
            assert (idx[groups[idx] == g].size % (groups == g).sum()) == 0
    single = sum(len(set(groups[idx])) == 1 for idx in seen)
    assert single > 0 and boot.shape == (300 - single, 1)
    # The sets of trials fitted, however often each was drawn: {a, b}, {a, c}, {b, c} and {a, b, c}.
    assert sets == len({frozenset(groups[idx]) for idx in seen if len(set(groups[idx])) > 1}) == 4
    again, _ = bootstrap(groups, estimate, 1, n_boot=300, seed=0)
    np.testing.assert_array_equal(again, boot)  # seeded


def test_a_bootstrap_whose_every_resample_fails_gives_no_intervals():
    # One model size, three patch sizes: L(N, D) fits the whole, but no resample of 3 trials keeps 3 sizes
    # often enough in 3 draws (and none in this seed); the fit stands, its intervals are NaN, not an error.
    n = np.repeat([1e7, 2e7, 4e7], 4)
    d = np.tile(np.logspace(8, 10, 4), 3)
    loss = 1.7 + 400 / n ** 0.34 + 410 / d ** 0.28
    fit = fit_law(CHINCHILLA, np.column_stack([n, d]), loss, np.repeat([0, 1, 2], 4), n_boot=2, seed=0)
    assert fit.boot.shape == (0, 5) and np.isfinite(fit.params).all()
    assert all(np.isnan(v).all() for v in fit.intervals().values())


def test_a_law_that_needs_every_trial_has_no_interval():
    # A law needing as many distinct points as its trials give fits only resamples that hold every trial: reorderings
    # of the data, whose refits differ by 1e-16. Compared exactly, they passed as a "95% interval" of zero width, and
    # the extrapolation check said "inside: no" of a prediction off by 0.2%.
    x, y = np.array([1.4, 5.6, 23.0]), np.array([128.8, 66.3, 44.4])
    fit = fit_law(POWER_LAW, x, y, n_boot=200)
    assert 0 < len(fit.boot) < 200 and fit.boot_sets == 1
    assert all(np.isnan(v).all() for v in fit.intervals().values()) and np.isnan(fit.band(np.array([80.0]))).all()
    assert fit.unsettled() == [f"no interval: the {len(fit.boot)} resamples that could be fitted all hold the same "
                               "trials and refit one estimate: the law needs more trials than these 3 to vary"]
    four = fit_law(POWER_LAW, np.append(x, 80.7), np.append(y, 23.3), n_boot=200)  # 4 trials: 3 of them fit
    low, high = four.intervals()["b"]
    assert four.boot_sets > 1 and low < four.params[1] < high
    check = extrapolation_check(POWER_LAW, np.append(x, 80.7), np.append(y, 23.3), np.arange(4), np.arange(4) == 3,
                                80.7, 23.3, n_boot=200)
    assert check["ci_low"] is None and check["inside_interval"] is None
    assert check["unsettled"] == fit.unsettled()
    assert (check["n_boot"], check["n_boot_converged"]) == (200, len(fit.boot))
    # L(N, D) over 3 model sizes, one trial each: only resamples of all 3 have 3 sizes.
    n, d = (v.ravel() for v in np.meshgrid([1e7, 1e8, 1e9], np.logspace(8, 11, 4), indexing="ij"))
    loss = (1.7 + 400 / n ** 0.34 + 410 / d ** 0.28) * np.exp(np.random.default_rng(0).normal(0, 0.003, n.size))
    sizes = fit_law(CHINCHILLA, np.column_stack([n, d]), loss, np.repeat([0, 1, 2], 4), n_boot=20)
    assert sizes.boot_sets == 1 and np.isnan(sizes.intervals()["alpha"]).all()


def test_a_fit_of_fewer_than_3_trials_or_of_identical_resamples_has_no_interval():
    # One trial resampled is always itself: its interval had no width, and did not even hold the estimate. Two
    # trials gave a few distinct replicates, the estimate at their interval's edge.
    x = np.array([1e3, 2e3, 4e3, 8e3, 1e3, 2e3, 4e3, 8e3])
    y = 50 * x ** -0.4 * np.array([1.02, 0.97, 1.01, 0.99, 1.1, 1.05, 1.12, 1.07])
    for trials in (np.zeros(8, int), np.repeat([0, 1], 4)):
        fit = fit_law(POWER_LAW, x, y, trials, n_boot=50, seed=0)
        assert all(np.isnan(v).all() for v in fit.intervals().values())
        assert np.isnan(fit.band(np.array([1e4]))).all()
        assert fit.unsettled()[0] == (f"no interval: its points come from {len(set(trials))} trial(s), and a "
                                      f"bootstrap over trials needs 3 to vary")
        assert fit.to_dict()["coefficients"]["b"]["ci_low"] is None
    held = extrapolation_check(POWER_LAW, np.append(x, 1.6e4), np.append(y, 1.0), np.append(np.zeros(8, int), 1),
                               np.arange(9) == 8, 1.6e4, 1.0, n_boot=50)
    assert held["ci_low"] is None and held["inside_interval"] is None  # not a "no" against an interval of no width
    three = fit_law(POWER_LAW, np.tile(x[:4], 3), np.concatenate([y[:4], y[4:], y[:4] * 0.9]), np.repeat([0, 1, 2], 4),
                    n_boot=50, seed=0)
    assert three.interval_problem() is None and np.ptp(three.boot[:, 1]) > 0
    # Every converged resample the estimate, to rounding: refits that did not move from where they started.
    rounding = 1 + 1e-14 * np.random.default_rng(0).standard_normal((40, 2))
    same = dataclasses.replace(three, boot=three.params * rounding)
    assert same.unsettled()[0] == "no interval: the 40 resamples that converged all gave the estimate itself"


def test_frontier_keeps_points_better_than_everything_cheaper():
    compute = np.array([1, 2, 3, 4, 5, 6])
    loss = np.array([5.0, 6.0, 4.0, 4.0, 4.5, 3.0])
    assert frontier(compute, loss).tolist() == [True, False, True, False, False, True]
    # Trials of one model in an lr sweep share their compute at every step: of points with the same compute only
    # the best can be on the frontier, whatever their order.
    compute = np.array([1e3, 1e3, 2e3, 2e3, 4e3, 4e3])
    loss = np.array([10.0, 8.0, 9.0, 7.0, 8.5, 6.0])
    assert frontier(compute, loss).tolist() == [False, True, False, True, False, True]
    assert frontier(compute[::-1], loss[::-1]).tolist() == [True, False, True, False, True, False]
    assert frontier([1, 1, 2], [3.0, 3.0, 2.0]).tolist() == [True, False, True]  # an exact repeat counts once


# A run of the default study (make run, 2026-12-03): (model, step, training compute in Gflop, val loss, FID).
DEFAULT_STUDY = [
    ("DiT-N/2", 400, 581.09, 0.13093, 243.51), ("DiT-N/2", 800, 1162.19, 0.11501, 131.60),
    ("DiT-N/2", 1600, 2324.38, 0.09525, 28.62), ("DiT-N/4", 400, 159.25, 0.12800, 176.74),
    ("DiT-N/4", 800, 318.50, 0.11877, 61.07), ("DiT-N/4", 1600, 637.01, 0.10540, 33.20),
    ("DiT-P/2", 400, 132.75, 0.14076, 240.20), ("DiT-P/2", 800, 265.50, 0.12365, 210.21),
    ("DiT-P/2", 1600, 531.00, 0.10676, 77.51), ("DiT-P/4", 400, 37.43, 0.13601, 195.45),
    ("DiT-P/4", 800, 74.87, 0.12386, 115.64), ("DiT-P/4", 1600, 149.74, 0.10950, 53.86),
    ("DiT-T/2", 400, 2384.86, 0.13154, 248.06), ("DiT-T/2", 800, 4769.71, 0.11002, 92.90),
    ("DiT-T/2", 1600, 9539.42, 0.09281, 21.41), ("DiT-T/4", 400, 650.77, 0.12169, 129.14),
    ("DiT-T/4", 800, 1301.54, 0.11596, 49.59), ("DiT-T/4", 1600, 2603.09, 0.10483, 28.36),
]


@pytest.mark.parametrize("law, column", [(SATURATING_POWER_LAW, 3), (POWER_LAW, 4)], ids=["L(C)", "FID(C)"])
def test_frontier_fit_estimate_lies_within_its_replicates(law, column):
    # Refitting each resample's own frontier put every replicate of this study's L(C) on one side of the fit
    # (no A below the estimate's): the frontier of a resample only loses points, and rises where it does.
    trial, compute, value = (np.array([row[i] for row in DEFAULT_STUDY]) for i in (0, 2, column))
    fit = fit_law(law, compute, value, trial, frontier, n_boot=N_BOOT)
    on_frontier = frontier(compute, value)
    assert fit.n_points == on_frontier.sum() and fit.n_groups == len(set(trial[on_frontier]))
    assert len(fit.boot) > N_BOOT // 2
    intervals = fit.intervals()
    for i, name in enumerate(law.names):
        below = np.mean(fit.boot[:, i] < fit.params[i])
        assert 0.1 < below < 0.9, f"{name}: {below:.0%} of the replicates below the estimate"
        assert intervals[name][0] < fit.params[i] < intervals[name][1]


def test_size_classes_join_patch_variants_and_split_sizes():
    paper = paper_results()
    labels = size_classes(paper.params)
    assert len(np.unique(labels)) == 4  # S, B, L, XL: each at patch 2, 4 and 8
    assert all(len(np.unique(labels[(paper["size"] == s).to_numpy()])) == 1 for s in ("S", "B", "L", "XL"))
    # 0.014% apart but on either side of a 0.01 boundary of log10 (8.115): still one size.
    assert len(np.unique(size_classes([130_300_424, 130_318_880]))) == 1


def test_isoflop_recovers_the_compute_optimal_exponents():
    """With C = 6ND, L = E + A/N^α + B/D^β has N* ∝ C^(β/(α+β)) and D* ∝ C^(α/(α+β))."""
    rng = np.random.default_rng(3)
    e, a, alpha, b, beta = 1.7, 400.0, 0.34, 410.0, 0.28
    sizes, steps = np.logspace(7, 9, 9), np.logspace(8, 11, 16)
    n, d = (v.ravel() for v in np.meshgrid(sizes, steps, indexing="ij"))
    trial = np.repeat(np.arange(sizes.size), steps.size)
    loss = (e + a / n ** alpha + b / d ** beta) * np.exp(rng.normal(0, 0.002, n.size))
    iso = isoflop(6 * n * d, n, d, loss, trial, n_budgets=6, n_boot=N_BOOT)
    # The smallest and largest budgets are those only 3 sizes reach: their parabolas fit those points exactly.
    edges = [f"{p.budget:.3g}" for p in iso.profiles if len(p.params) == 3]
    assert len(iso.profiles) == 6 and edges == [f"{p.budget:.3g}" for p in iso.profiles[::5]]
    assert [n.split(" Gflops)")[0] for n in iso.notes] == [f"the parabolas at 2 of 6 budgets (C = {', '.join(edges)}"]
    n_exp, d_exp = iso.n_opt.params[1], iso.steps_opt.params[1]
    assert n_exp == pytest.approx(beta / (alpha + beta), abs=0.03)
    assert d_exp == pytest.approx(alpha / (alpha + beta), abs=0.03)
    assert n_exp + d_exp == pytest.approx(1.0, abs=1e-6)  # N*·D* = C/6 at every budget
    for fit, exponent in ((iso.n_opt, beta / (alpha + beta)), (iso.steps_opt, alpha / (alpha + beta))):
        low, high = fit.intervals()["b"]
        assert low <= exponent <= high


def test_isoflop_of_trials_each_trained_to_one_budget():
    # A compute study under a cosine lr trains each size to each budget in a trial of its own, measured once: every
    # trial was left out ("need trials ... evaluated at 2 or more steps"), and Figure 5 never drawn for the design
    # IsoFLOP profiles come from.
    rng = np.random.default_rng(5)
    e, a, alpha, b, beta = 1.7, 400.0, 0.34, 410.0, 0.28
    sizes, budgets = np.logspace(7, 9, 9), np.logspace(16, 19, 5)
    n, c = (v.ravel() for v in np.meshgrid(sizes, budgets, indexing="ij"))
    d = np.maximum(np.round(c / (6 * n)), 1)  # the study rounds each budget's steps
    loss = (e + a / n ** alpha + b / d ** beta) * np.exp(rng.normal(0, 0.002, n.size))
    iso = isoflop(6 * n * d, n, d, loss, np.arange(n.size), n_boot=N_BOOT)
    assert [p.budget for p in iso.profiles] == pytest.approx(budgets, rel=1e-3) and iso.notes == []
    assert all(len(p.params) == 9 for p in iso.profiles)
    assert iso.n_opt.params[1] == pytest.approx(beta / (alpha + beta), abs=0.03)
    assert iso.steps_opt.params[1] == pytest.approx(alpha / (alpha + beta), abs=0.03)
    # Beside trials measured at several steps, each budget's points join the interpolated profiles.
    curves = isoflop(np.r_[6 * n * d, [2e17, 2e18] * 3], np.r_[n, [1e6, 1e6, 1e10, 1e10, 1e11, 1e11]],
                     np.r_[d, [1, 2] * 3], np.r_[loss, [3, 2.9, 2.5, 2.4, 2.6, 2.5]],
                     np.r_[np.arange(n.size), [100, 100, 101, 101, 102, 102]], n_budgets=3, n_boot=0)
    assert len(curves.profiles) == 3 + 5 and [p.budget for p in curves.profiles] == sorted(
        p.budget for p in curves.profiles)
    # A steps sweep under a decaying lr is no IsoFLOP design: the paper's models at one step count spend computes 10%
    # and more apart (S/2, B/4 and L/8: 6.06, 5.56, 5.01 Gflops), which a chain of near points had made one budget.
    paper = paper_results()
    with pytest.raises(FitError, match="need a compute budget that 3 model sizes all reach"):
        isoflop(paper.gflops * 256 * 3 * 1e5, paper.params, np.full(12, 1e5), np.linspace(1, 2, 12),
                np.arange(12))
    # Trials that join no budget are not counted as the fits' trials: 45 in profiles, 12 of no budget.
    extra = isoflop(np.r_[6 * n * d, paper.gflops * 3e7], np.r_[n, paper.params], np.r_[d, np.full(12, 1e5)],
                    np.r_[loss, np.linspace(3, 4, 12)], np.arange(n.size + 12), n_boot=0)
    assert extra.n_opt.n_groups == n.size and len(extra.profiles) == 5


def test_isoflop_names_the_budgets_whose_parabola_passes_through_every_point():
    # Three model sizes at a budget: the parabola passes through all three, and its minimum was reported as any other.
    e, a, alpha, b, beta = 1.7, 400.0, 0.34, 410.0, 0.28
    n, d = (v.ravel() for v in np.meshgrid(np.logspace(7, 9, 3), np.logspace(8, 11, 16), indexing="ij"))
    iso = isoflop(6 * n * d, n, d, e + a / n ** alpha + b / d ** beta, np.repeat(np.arange(3), 16), n_boot=0)
    exact = [p.budget for p in iso.profiles if np.isfinite(p.n_opt)]
    assert exact and all(len(p.params) == 3 for p in iso.profiles)
    assert (f"the parabolas at {len(exact)} of {len(iso.profiles)} budgets (C = {', '.join(f'{c:.3g}' for c in exact)} "
            "Gflops) pass through exactly 3 model sizes: their minima are fixed by those points, with no residual to "
            "test the parabola's shape against") in iso.notes


def test_isoflop_needs_several_sizes_measured_at_several_steps():
    with pytest.raises(FitError, match="at least 3 model sizes"):
        isoflop([1e3, 1e4, 2e3, 2e4], [1e6, 1e6, 1e7, 1e7], [1, 10, 1, 10], [3.0, 2.0, 2.5, 1.8], [0, 0, 1, 1])


def test_extrapolation_check_predicts_the_held_out_point():
    rng = np.random.default_rng(4)
    c = np.logspace(8, 12, 25)
    loss = (0.3 + 40 * c ** -0.2) * np.exp(rng.normal(0, 0.005, c.size))
    held = c == c.max()
    check = extrapolation_check(SATURATING_POWER_LAW, c, loss, np.arange(c.size), held, c.max(), loss[held][0],
                                n_boot=N_BOOT)
    assert check["n_points"] == 24  # the held-out point is not in the fit
    assert check["ci_low"] < check["predicted"] < check["ci_high"]
    assert abs(check["relative_error"]) < 0.02
    assert check["predicted"] == pytest.approx(0.3 + 40 * c.max() ** -0.2, rel=0.02)
    json.dumps(check, allow_nan=False)  # json's default writes NaN and Infinity, which JSON readers refuse


def test_fit_summary_is_json():
    paper = paper_results()
    doc = fit_law(POWER_LAW, paper.gflops, paper.fid, n_boot=50).to_dict()
    assert doc["n_points"] == 12 and doc["n_boot_converged"] == 50
    assert set(doc["coefficients"]) == {"a", "b"}
    json.dumps(doc, allow_nan=False)


def test_a_law_the_points_do_not_pin_down_says_so():
    # Points of a bare power law have no floor: the fit puts E at its lower limit and says so (the
    # report then warns against extrapolating); points drawn with a floor leave every coefficient free.
    rng = np.random.default_rng(3)
    c = np.logspace(8, 12, 20)
    no_floor = fit_law(SATURATING_POWER_LAW, c, 40 * c ** -0.2 * np.exp(rng.normal(0, 0.01, c.size)), n_boot=50)
    unsettled = no_floor.unsettled()
    assert unsettled[0].startswith("E's 95% interval [") and "reaches its floor" in unsettled[0]
    assert no_floor.intervals()["E"][0] == pytest.approx(no_floor.limits["E"][0], rel=1e-6)
    assert no_floor.to_dict()["unsettled"] == unsettled
    at_limits = fits.Fit(SATURATING_POWER_LAW, np.array([1e-6, 40.0, 3.0]), no_floor.boot, 20, 20, 50,
                         {"E": (1e-6, None), "alpha": (0.0, 3.0)})
    assert at_limits.unsettled() == ["E = 1e-06 is at its floor: these points show no irreducible part above 0",
                                     "alpha = 3 is at its limit 3"]
    floor = fit_law(SATURATING_POWER_LAW, c, (0.3 + 40 * c ** -0.2) * np.exp(rng.normal(0, 0.01, c.size)),
                    n_boot=50)
    assert floor.unsettled() == []
    # A resample without the lowest point has a higher floor (its own lowest y's): an interval whose low end is there,
    # 1.2 times the data's floor, was no interval "reaching its floor", and read as a sound one.
    low = no_floor.limits["E"][0]
    resampled = no_floor.boot.copy()
    resampled[:, 0] = np.maximum(resampled[:, 0], 1.2 * low)
    above = fits.Fit(SATURATING_POWER_LAW, no_floor.params, resampled, 20, 20, 50, no_floor.limits, no_floor.spans)
    assert above.intervals()["E"][0] == pytest.approx(1.2 * low)
    assert above.unsettled()[0].startswith("E's 95% interval [") and "reaches its floor" in above.unsettled()[0]
    line = 40 * c ** -0.2
    assert fit_law(POWER_LAW, c, line * np.exp(rng.normal(0, 0.01, c.size)), n_boot=10).unsettled() == []  # no limits
    # Points exactly on the line: every resample refits it, to rounding (an interval of no width, once passed as one).
    assert fit_law(POWER_LAW, c, line, n_boot=10).unsettled() == [
        "no interval: the 10 resamples that converged all gave the estimate itself"]


def patch_sweep(seed=6):
    """Trials of 9 sizes at patches 2, 4 and 8 (16, 4 and 1 tokens): compute per step 6·N·tokens, and a loss in
    which more tokens help as more parameters would, so the best patch of a size changes with size and budget."""
    rng = np.random.default_rng(seed)
    sizes, steps, tokens = np.logspace(6, 10, 9), np.logspace(5, 11, 19), (16, 4, 1)
    n, t, d = (v.ravel() for v in np.meshgrid(sizes, tokens, steps, indexing="ij"))
    trial = np.repeat(np.arange(sizes.size * len(tokens)), steps.size)
    loss = (1.7 + 400 / (n * np.sqrt(t)) ** 0.34 + 410 / d ** 0.28) * np.exp(rng.normal(0, 0.002, n.size))
    return 6 * n * t * d, n, d, loss, trial, np.array(tokens)


def test_isoflop_steps_are_those_the_budget_buys_the_optimal_size():
    # With a patch sweep, the steps of a profile's points depend on the patch of each size's best trial, not on
    # the size: a parabola through them put D* where no configuration spends the budget.
    compute, n, d, loss, trial, tokens = patch_sweep()
    iso = isoflop(compute, n, d, loss, trial, n_budgets=6, n_boot=50)
    found = [p for p in iso.profiles if np.isfinite(p.n_opt)]
    assert len(found) >= 3 and iso.steps_opt is not None
    for p in iso.profiles:
        assert np.isfinite(p.steps_opt) == np.isfinite(p.n_opt)
    for p in found:  # N* trained for D* steps spends the budget at one of the patches measured
        spent = 6 * tokens * p.n_opt * p.steps_opt / p.budget
        assert np.min(np.abs(np.log(spent))) < 1e-9, spent


def test_isoflop_leaves_out_points_without_a_parameter_count():
    # A row may lack params (the results schema allows it): log10 of NaN reached np.polyfit, whose SVD failed
    # (LinAlgError), and the whole report with it.
    compute, n, d, loss, trial, _ = patch_sweep()
    n = n.astype(float)
    n[trial == trial[0]] = np.nan
    iso = isoflop(compute, n, d, loss, trial, n_budgets=6, n_boot=0)
    whole = isoflop(*patch_sweep()[:5], n_budgets=6, n_boot=0)
    assert iso.n_opt is not None and len(iso.profiles) == len(whole.profiles)
    assert all(np.isfinite(p.params).all() for p in iso.profiles)


def test_a_flat_isoflop_profile_has_no_optimum():
    # Equal losses at every size: the parabola's curvature is rounding noise (1e-16), whose sign made a minimum
    # of it, and three such "optima" a fitted law N*(C).
    compute, n, d, _, trial, _ = patch_sweep()
    iso = isoflop(compute, n, d, np.full(len(n), 0.3), trial, n_budgets=6, n_boot=0)
    assert all(np.isnan(p.n_opt) for p in iso.profiles)
    assert iso.n_opt is None and iso.steps_opt is None


def test_isoflop_replicates_need_3_budgets_as_the_estimate_does(monkeypatch):
    # The point estimate needs 3 budgets with an interior optimum; replicates through 2 were kept, a line through
    # 2 points with no scatter behind it. Now such a resample is dropped, as any the fit cannot handle.
    fitted = []

    def recording(x, y, start=None):
        fitted.append(len(x))
        return POWER_LAW.estimate(x, y, start)

    monkeypatch.setattr(fits, "_power_law_estimate", recording)
    compute, n, d, loss, trial, _ = patch_sweep()
    iso = isoflop(compute, n, d, loss, trial, n_budgets=6, n_boot=200)
    assert min(fitted) >= 3
    for fit in (iso.n_opt, iso.steps_opt):
        assert 0 < len(fit.boot) < 200  # some resamples lack 3 budgets with an optimum: dropped
        assert fit.to_dict()["n_boot_converged"] == len(fit.boot)
        # More than a tenth dropped is said: the resamples left are the well-behaved ones.
        note = (f"{200 - len(fit.boot)} of 200 resamples could not be fitted and are left out: the intervals may be "
                "narrower than the data allow")
        assert (note in fit.unsettled()) == (len(fit.boot) < 180)


def test_a_fit_whose_resamples_often_fail_says_its_intervals_may_be_too_narrow():
    # Four trials: a third of the resamples hold fewer than 3 distinct ones and cannot be fitted. Dropped silently,
    # they left an interval from the well-behaved resamples alone, narrower than the data allow.
    x = np.array([1e9, 1e10, 1e11, 1e12])
    fit = fit_law(POWER_LAW, x, 100 * x ** -0.35 * np.array([1.05, 0.97, 1.02, 0.96]), n_boot=200)
    dropped = 200 - len(fit.boot)
    assert 40 < dropped < 120
    assert f"{dropped} of 200 resamples could not be fitted and are left out: the intervals may be narrower than " \
           "the data allow" in fit.unsettled()
    assert fit_law(POWER_LAW, x, 100 * x ** -0.35, n_boot=0).unsettled() == []
    # Three trials: no interval at all, and only that is said (not also how narrow the one it has not may be).
    three = fit_law(POWER_LAW, x[:3], 100 * x[:3] ** -0.35 * np.array([1.05, 0.97, 1.02]), n_boot=200)
    assert len(three.unsettled()) == 1 and three.unsettled()[0].startswith("no interval: ")


def test_an_exponent_near_0_says_its_floor_is_not_identified():
    # Nearly flat points: E + A·C^(−α) fits them with α ≈ 0.0004, its term constant to 0.4%, so E and A trade off
    # freely; the replicates, started at the estimate, did not move (E's interval had zero width), and nothing said
    # so. Fixing E at 0 fits them better.
    c = np.logspace(8, 12, 8)
    fit = fit_law(SATURATING_POWER_LAW, c, 0.2 - 1e-4 * np.arange(8), n_boot=50)
    assert fit.unsettled() == [f"alpha = {fit.params[2]:.3g} leaves its term within 0.4% of constant over the "
                               "points: E and that term's coefficient cannot be told apart, whatever their intervals "
                               "say"]
    assert fit.to_dict()["unsettled"] == fit.unsettled() and fit.params[2] * np.log(1e4) < fits.FLAT_TERM
    at_zero = fits.Fit(SATURATING_POWER_LAW, np.array([0.1, 0.1, 0.0]), fit.boot, 8, 8, 50, {"alpha": (0.0, 3.0)},
                       fit.spans)
    # At its limit 0, said once, and what it means: the bootstrap's intervals of E and A are no measure there.
    assert at_zero.unsettled() == ["alpha = 0 is at its limit 0, its term constant over the points: E and that term's "
                                   "coefficient cannot be told apart, whatever their intervals say"]


def test_a_start_that_stops_at_the_iteration_limit_is_no_solution(monkeypatch):
    # L-BFGS-B's result was taken whatever its status: a run stopped at its iteration limit, not at a minimum, could be
    # reported as the law (two of the default study's 590 runs stop there, in resamples).
    c = np.logspace(8, 12, 8)
    loss = 0.1 + 5 * c ** -0.2
    fit = fit_law(SATURATING_POWER_LAW, c, loss, n_boot=0)
    assert fit.params[2] == pytest.approx(0.2, rel=1e-3)
    monkeypatch.setattr(fits, "MAX_ITERATIONS", 1)  # no start gets anywhere in one iteration
    with pytest.raises(FitError, match="the optimizer found no finite solution it converged to"):
        fit_law(SATURATING_POWER_LAW, c, loss, n_boot=0)


def test_best_per_size_and_data_keeps_each_size_and_data_sizes_lowest_point():
    from scaling.fits import best_per_size_and_data

    # Two sizes (the second's counts within 2%: one size, as a DiT's patches), two data sizes, repeats of a point.
    n = [1e6, 1e6, 1.01e6, 5e6, 5.05e6, 1e6, 1e6]
    d = [1e8, 2e8, 1e8, 1e8, 1e8, 2e8, 2e8]
    y = [3.0, 2.5, 2.9, 2.0, 2.2, 2.5, 2.6]
    assert best_per_size_and_data(np.column_stack([n, d]), y).tolist() == [False, True, True, True, False, False,
                                                                           False]
