"""Scaling-law fits in log space with bootstrap intervals, correlations, IsoFLOP profiles, extrapolation.

Three laws: y = a·x^b (a line in log-log), y = E + A·x^(−α) (a power law above a floor) and
L(N, D) = E + A/N^α + B/D^β (Chinchilla's approach 3). Intervals come from refitting on trials
drawn with replacement. A fit that the data cannot support raises FitError, whose message says why.
"""
import concurrent.futures
import contextlib
import functools
import itertools
import multiprocessing
import pickle
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
from scipy import optimize, special, stats
from threadpoolctl import threadpool_limits

from core.cpus import usable_cpus

CI_LEVEL = 0.95
N_BOOT = 1000
HUBER_DELTA = 1e-3  # Chinchilla's δ for the Huber loss on log loss
MAX_EXPONENT = 3.0  # scaling exponents are O(0.1-1); the bound stops degenerate resamples from wandering off
FLOOR_LOG = 12.0  # a term (or E) below e^-12 of the smallest value is zero for all purposes: its lower bound
# A bootstrap over fewer trials has no spread to speak of: one trial resampled is always itself, and two give a few
# distinct replicates, with the estimate at their interval's edge. Such a fit gets no interval. (Nor does one whose law
# needs every trial it has, whatever their number: see Fit.interval_problem.)
MIN_BOOT_TRIALS = 3
SAME_ESTIMATE = 1e-9  # replicates within this relative spread of each other are one estimate, refitted
MAX_ITERATIONS = 500  # L-BFGS-B's, per start
FLAT_TERM = 0.1  # a term A·x^(−α) whose α·ln(x_max/x_min) is below this changes by under 10% over the points


class FitError(ValueError):
    """The data cannot support the fit asked for (too few points, no spread, no convergence)."""


PROBE_ITEMS = 10  # fits done in this process first, to time what the rest would cost
PARALLEL_ABOVE_S = 1.0  # fits whose rest would take longer go to parallel_fits()'s worker processes


def _single_threaded(fn):
    """Run fn with one BLAS thread: these problems are tiny, and on a busy machine the idle threads'
    contention made the bootstrap ten times slower."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with threadpool_limits(1):
            return fn(*args, **kwargs)
    return wrapper


@dataclass(frozen=True)
class Law:
    """A functional form: its formula, coefficient names, prediction, and estimation from data."""

    formula: str
    names: tuple
    predict: Callable  # predict(params, x) -> y
    estimate: Callable  # estimate(x, y, start=None) -> params; raises FitError
    min_points: int  # distinct x values needed
    limits: Callable = None  # limits(y) -> {name: (low, high)}: where estimate confines a coefficient (None: free)
    exponents: dict = None  # {exponent name: the column of x it applies to}, for the laws with a floor E


@dataclass
class Fit:
    """A law fitted to data: the point estimate and the bootstrap replicates behind its intervals."""

    law: Law
    params: np.ndarray
    boot: np.ndarray  # one row of coefficients per resample whose fit succeeded
    n_points: int
    n_groups: int  # trials the points came from
    n_boot: int  # resamples drawn
    limits: dict = field(default_factory=dict)  # the law's limits(y) for these points
    spans: dict = field(default_factory=dict)  # {exponent name: ln(max/min) of its x over these points}
    boot_sets: int = None  # distinct sets of trials among the resamples fitted (None: not counted)

    def predict(self, x):
        """The law's prediction at x with the point-estimate coefficients."""
        return self.law.predict(self.params, x)

    def interval_problem(self):
        """Why the bootstrap gives this fit no interval (None when it gives one, or drew no resamples)."""
        if self.n_boot and self.n_groups < MIN_BOOT_TRIALS:
            return (f"no interval: its points come from {self.n_groups} trial(s), and a bootstrap over trials needs "
                    f"{MIN_BOOT_TRIALS} to vary")
        # A law needing as many distinct points as its trials give (3 for y = a·x^b over 3 one-point trials; 3 model
        # sizes for L(N, D)) fits only resamples holding every trial: reorderings of the data, whose refits differ by
        # rounding (1e-16), so an exact comparison passed them as an interval of no width.
        if len(self.boot) and self.boot_sets is not None and self.boot_sets < 2:
            return (f"no interval: the {len(self.boot)} resamples that could be fitted all hold the same trials and "
                    f"refit one estimate: the law needs more trials than these {self.n_groups} to vary")
        if len(self.boot) >= 2 and np.all(np.ptp(self.boot, axis=0) <= SAME_ESTIMATE * np.abs(self.params)):
            return f"no interval: the {len(self.boot)} resamples that converged all gave the estimate itself"
        return None

    def has_intervals(self):
        """Whether the bootstrap gives this fit intervals and bands."""
        return len(self.boot) >= 2 and not self.interval_problem()

    def band(self, x, level=CI_LEVEL):
        """Pointwise percentile interval of the prediction at x over the bootstrap replicates."""
        if not self.has_intervals():
            nan = np.full(np.shape(self.predict(x)), np.nan)
            return nan, nan.copy()
        with np.errstate(over="ignore", invalid="ignore"):
            preds = np.array([self.law.predict(p, x) for p in self.boot])
        tail = 50 * (1 - level)
        return np.nanpercentile(preds, tail, axis=0), np.nanpercentile(preds, 100 - tail, axis=0)

    def intervals(self, level=CI_LEVEL):
        """Percentile interval of every coefficient: {name: (low, high)}."""
        if not self.has_intervals():
            return {n: (np.nan, np.nan) for n in self.law.names}
        tail = 50 * (1 - level)
        lo, hi = np.percentile(self.boot, [tail, 100 - tail], axis=0)
        return {n: (float(a), float(b)) for n, a, b in zip(self.law.names, lo, hi)}

    def unsettled(self, level=CI_LEVEL):
        """What the data leave open: no interval where the bootstrap can give none (interval_problem), coefficients
        that sit at a limit of the estimation, or whose interval reaches one, and exponents too near 0 for their term
        to change over the points (a sentence each; empty when every coefficient is inside its limits, with an
        interval, and every term changes)."""
        ci = self.intervals(level)
        out = [problem] if (problem := self.interval_problem()) else []
        if self.n_boot and len(self.boot) < 0.9 * self.n_boot and not problem:
            out.append(f"{self.n_boot - len(self.boot)} of {self.n_boot} resamples could not be fitted and are left "
                       "out: the intervals may be narrower than the data allow")
        flat = self._flat_terms()
        for name, (low, high) in self.limits.items():
            if name in flat:  # an exponent at (or near) 0: its sentence says more than "at its limit 0"
                continue
            value = self.params[self.law.names.index(name)]
            at = [b for b in (low, high) if b is not None and np.isclose(value, b, rtol=1e-6, atol=0)]
            reached = [b for b, end in ((low, ci[name][0]), (high, ci[name][1]))
                       if b is not None and np.isclose(end, b, rtol=1e-6, atol=0)]
            # A resample's floor is its own lowest y's (higher where it lacks the data's lowest): an E that far
            # below every y (1e-4 of the lowest) is one at a floor, whichever.
            if name == "E" and not reached and ci[name][0] < 1e-4 * low * np.exp(FLOOR_LOG):
                reached = [low]
            interval = f"{name}'s {level:.0%} interval [{ci[name][0]:.3g}, {ci[name][1]:.3g}]"
            if name == "E" and at:
                out.append(f"E = {value:.3g} is at its floor: these points show no irreducible part above 0")
            elif name == "E" and reached:
                out.append(f"{interval} reaches its floor: these points cannot tell an irreducible part from 0")
            elif at:
                out.append(f"{name} = {value:.3g} is at its limit {at[0]:g}")
            elif reached:
                out.append(f"{interval} reaches its limit {reached[0]:g}")
        return out + list(flat.values())

    def _flat_terms(self):
        """{name: sentence} of each exponent so near 0 that its term is almost constant over the points."""
        # E and that term's coefficient then trade off along a flat valley, unidentified; the bootstrap's refits,
        # started at the estimate, stay where they start, so their intervals can even have zero width.
        out = {}
        for name, span in self.spans.items():
            value = self.params[self.law.names.index(name)]
            if value * span < FLAT_TERM:
                change = ("is at its limit 0, its term constant" if value == 0 else
                          f"leaves its term within {np.expm1(value * span):.1%} of constant")
                out[name] = (f"{name} = {value:.3g} {change} over the points: E and that term's coefficient cannot be "
                             "told apart, whatever their intervals say")
        return out

    def to_dict(self, level=CI_LEVEL):
        """JSON-ready summary: formula, coefficients with intervals, and how much data stood behind them."""
        ci = self.intervals(level)
        return {
            "formula": self.law.formula,
            "coefficients": {n: {"value": float(v), "ci_low": _json_float(ci[n][0]), "ci_high": _json_float(ci[n][1])}
                             for n, v in zip(self.law.names, self.params)},
            "ci_level": level, "n_points": self.n_points, "n_trials": self.n_groups,
            "n_boot": self.n_boot, "n_boot_converged": len(self.boot), "unsettled": self.unsettled(level),
        }


def _json_float(v):
    return float(v) if np.isfinite(v) else None


# The laws ----------------------------------------------------------------------------------------

def _power_law_predict(p, x):
    return p[0] * np.asarray(x, float) ** p[1]


def _power_law_estimate(x, y, start=None):
    res = stats.linregress(np.log10(x), np.log10(y))
    return np.array([10 ** res.intercept, res.slope])


POWER_LAW = Law("y = a·x^b", ("a", "b"), _power_law_predict, _power_law_estimate, min_points=3)


def _lse_terms(theta, u):
    """Exponents whose logsumexp is log(E + Σ_k A_k·x_k^(−α_k)), in centred logs u: e and a_k − α_k·u_k."""
    e, a, alpha = theta[0], theta[1::2], theta[2::2]
    return np.column_stack([np.full(len(u), e), a - alpha * u])


def _objective(theta, u, log_y, delta, scale):
    """Summed Huber loss of the log residuals (squared loss when δ is infinite), and its gradient."""
    z = _lse_terms(theta, u)
    lse = np.logaddexp.reduce(z, axis=1)
    r = lse - log_y
    w = np.exp(z - lse[:, None])  # d logsumexp / d z: the softmax of z
    dr = np.clip(r, -delta, delta)  # the Huber loss's derivative
    grad = np.empty_like(theta)
    grad[0] = dr @ w[:, 0]
    grad[1::2] = dr @ w[:, 1:]
    grad[2::2] = -(dr[:, None] * w[:, 1:] * u).sum(0)
    return special.huber(delta, r).sum() / scale, grad / scale


def _fit_lse(x, y, delta, start=None):
    """Fit y = E + Σ_k A_k·x_k^(−α_k) in log space with L-BFGS-B, from start or from a grid of starts.

    Logs of x are centred so that the same grid of starts suits any range of compute or size.
    """
    log_x = np.log(np.asarray(x, float).reshape(len(y), -1))
    centre = log_x.mean(0)
    u, log_y = log_x - centre, np.log(y)
    k = u.shape[1]
    # The constant model's loss: dividing by it makes the objective O(1), so the tolerances mean something.
    scale = max(special.huber(delta, log_y - np.median(log_y)).sum(), 1e-12)
    if start is None:
        m = np.median(log_y)
        grid = [[m + np.log(f) for f in (0.05, 0.5, 0.9)]] + [[m + np.log(f) for f in (0.2, 1.0)], [0.1, 0.4, 1.0]] * k
        starts = [np.array(s) for s in itertools.product(*grid)]
    else:
        starts = [_to_internal(np.asarray(start, float), centre)]
    # A term (or E) below e^-12 of the smallest loss is zero for all purposes: bounding it there stops the
    # optimizer creeping along a flat valley towards -inf; no term exceeds the largest loss at the centre.
    level = (log_y.min() - FLOOR_LOG, log_y.max() + 1)
    bounds = [level] + [level, (0.0, MAX_EXPONENT)] * k  # a negative exponent would mean worse with scale
    solutions = _map(functools.partial(_minimize_from, u=u, log_y=log_y, delta=delta, scale=scale, bounds=bounds),
                     starts)
    finite = [(fun, x) for fun, x in solutions if np.isfinite(fun)]
    if not finite:
        raise FitError("the optimizer found no finite solution it converged to")
    return _to_external(min(finite, key=lambda r: r[0])[1], centre)


def _minimize_from(start, u, log_y, delta, scale, bounds):
    """(objective, θ) at the L-BFGS-B minimum reached from start; an infinite objective where it stopped at its
    iteration limit, not at a minimum (2 of 590 runs in the default study's report): such a start does not count,
    and a resample with no other is dropped as any the fit cannot handle."""
    res = optimize.minimize(_objective, start, args=(u, log_y, delta, scale), jac=True, method="L-BFGS-B",
                            bounds=bounds, options={"maxiter": MAX_ITERATIONS, "ftol": 1e-9, "gtol": 1e-6})
    return (np.inf if res.status == 1 else res.fun), res.x  # 1: the iteration (or evaluation) limit


def _to_external(theta, centre):
    """(e, a_k, α_k) in centred logs -> (E, A_k, α_k) in the data's units."""
    out = theta.copy()
    out[0] = np.exp(theta[0])
    out[1::2] = np.exp(theta[1::2] + theta[2::2] * centre)
    return out


def _to_internal(params, centre):
    theta = params.copy()
    theta[0] = np.log(params[0])
    theta[1::2] = np.log(params[1::2]) - params[2::2] * centre
    return theta


def _lse_limits(names, y):
    """Limits of a law fitted by _fit_lse to y: E no lower than its floor there, exponents in [0, MAX_EXPONENT].

    A module function, bound with functools.partial: a Law holding a closure could not be pickled, and its
    bootstrap would then never reach parallel_fits()'s worker processes.
    """
    floor = float(np.min(y)) * np.exp(-FLOOR_LOG)  # _fit_lse's lower bound on E
    return {n: (floor, None) if n == "E" else (0.0, MAX_EXPONENT) for n in names if n in ("E", "alpha", "beta")}


def _saturating_predict(p, x):
    return p[0] + p[1] * np.asarray(x, float) ** -p[2]


def _saturating_estimate(x, y, start=None):
    return _fit_lse(x, y, np.inf, start)


SATURATING_POWER_LAW = Law("y = E + A·x^(−α)", ("E", "A", "alpha"), _saturating_predict, _saturating_estimate,
                           min_points=4, limits=functools.partial(_lse_limits, ("E", "A", "alpha")),
                           exponents={"alpha": 0})


def size_classes(params):
    """A model-size label per parameter count: counts within 2.3% (0.01 in log10) of the next smaller one are one
    size, as DiTs of one width and depth but different patch sizes differ by a few embedding weights. (Rounding
    log10 to 0.01 instead would split two near-identical counts on either side of a rounding boundary.)"""
    logs = np.log10(np.asarray(params, float))
    labels = np.empty_like(logs)
    label = previous = None
    for i in np.argsort(logs, kind="stable"):
        if label is None or logs[i] - previous > 0.01:
            label = logs[i]  # a gap: the next model size, labelled by its smallest count
        labels[i], previous = label, logs[i]
    return labels


def _chinchilla_predict(p, x):
    n, d = np.asarray(x, float).T
    return p[0] + p[1] / n ** p[2] + p[3] / d ** p[4]


def _chinchilla_estimate(x, y, start=None):
    x = np.asarray(x, float)
    for name, column in (("model sizes N", size_classes(x[:, 0])), ("data sizes D", x[:, 1])):
        if len(np.unique(column)) < 3:
            raise FitError(f"L(N, D) needs at least 3 distinct {name}, got {len(np.unique(column))}")
    return _fit_lse(x, y, HUBER_DELTA, start)


CHINCHILLA = Law("L = E + A/N^α + B/D^β", ("E", "A", "alpha", "B", "beta"), _chinchilla_predict,
                 _chinchilla_estimate, min_points=8,
                 limits=functools.partial(_lse_limits, ("E", "A", "alpha", "B", "beta")),
                 exponents={"alpha": 0, "beta": 1})


# Fitting with bootstrap ----------------------------------------------------------------------------

def bootstrap(groups, estimate, width, n_boot=N_BOOT, seed=0):
    """Estimates on resamples of whole groups (trials) drawn with replacement; failed fits are dropped.

    A trial's points (its evaluation steps) are not independent, so trials are the unit resampled;
    scipy.stats.bootstrap resamples observations and cannot skip a resample the fit cannot handle.
    Inside parallel_fits(), a long bootstrap of a picklable estimate is spread over worker
    processes; the resamples are all drawn here first, so the result does not depend on that.
    Returns an array of width columns, one row per resample that succeeded (none: no intervals, not an error), and
    how many distinct sets of groups those resamples hold.
    """
    labels, inverse = np.unique(np.asarray(groups), return_inverse=True)
    members = [np.flatnonzero(inverse == g) for g in range(len(labels))]
    rng = np.random.default_rng(seed)
    picks = [rng.integers(len(labels), size=len(labels)) for _ in range(n_boot)]
    results = _map(_Attempt(estimate), [np.concatenate([members[g] for g in p]) for p in picks])
    out = [np.ravel(r) for r in results if r is not None]
    # Sets, not multisets: an IsoFLOP estimate takes each trial once however often it is drawn.
    sets = {tuple(np.unique(p)) for p, r in zip(picks, results) if r is not None}
    return np.array(out, dtype=float).reshape(len(out), width), len(sets)


class _Attempt:
    """estimate(idx), or None where the data of that resample cannot support the fit (picklable)."""

    def __init__(self, estimate):
        self.estimate = estimate

    def __call__(self, idx):
        try:
            return self.estimate(idx)
        except FitError:
            return None


def _map(fn, items):
    """[fn(item) for item in items]; inside parallel_fits(), the items after the first few go to
    its worker processes when those few say the rest would take more than PARALLEL_ABOVE_S."""
    started = time.perf_counter()
    out = [fn(item) for item in items[:PROBE_ITEMS]]
    rest = items[PROBE_ITEMS:]
    per_item = (time.perf_counter() - started) / max(1, len(out))
    parallel = rest and per_item * len(rest) > PARALLEL_ABOVE_S and _picklable(fn) and _executor()
    if parallel:
        pool, processes = parallel
        try:
            return out + list(pool.map(fn, rest, chunksize=-(-len(rest) // (4 * processes))))
        except concurrent.futures.process.BrokenProcessPool:  # a worker was killed: do the rest here
            pass
    return out + [fn(item) for item in rest]


def _picklable(obj):
    try:
        pickle.dumps(obj)
        return True
    except (pickle.PicklingError, AttributeError, TypeError):  # closures, lambdas
        return False


_parallel = None  # [processes, executor or None] of the innermost parallel_fits() block


@contextlib.contextmanager
def parallel_fits(processes=None):
    """Within this block, the many small fits of a bootstrap or of a grid of starts run in `processes`
    worker processes (None: one per CPU; 1: none), started when first needed.

    Each is an L-BFGS fit of a few points: Python-bound, so threads would not help. Workers
    are spawned, not forked, since the caller (the study's driver) runs Ray's threads; spawning
    imports the main module again, so a script using this must guard its entry point.
    """
    global _parallel
    if processes is None:
        processes = usable_cpus()
    outer, _parallel = _parallel, [processes, None]
    try:
        yield
    finally:
        state, _parallel = _parallel, outer
        if state[1] is not None:  # after an interrupt, the fits not yet started are dropped, not waited for
            state[1].shutdown(cancel_futures=True)


def _executor():
    """(executor, processes) of the current parallel_fits() block, or None outside one."""
    if _parallel is None or _parallel[0] <= 1:
        return None
    if _parallel[1] is None:
        _parallel[1] = concurrent.futures.ProcessPoolExecutor(
            _parallel[0], mp_context=multiprocessing.get_context("spawn"), initializer=_one_blas_thread)
    return _parallel[1], _parallel[0]


def _one_blas_thread():
    """A worker's BLAS on one thread. threadpoolctl limits the libraries loaded when it is called, and
    a spawned worker may not have loaded numpy's yet (under `python -m scaling.run` it had not: each
    fit then ran about 4× slower, its BLAS threads contending with the other worker's)."""
    import scipy.optimize  # noqa: F401  (loads numpy's and scipy's BLAS)

    threadpool_limits(1)


@_single_threaded
def fit_law(law, x, y, groups=None, select=None, n_boot=N_BOOT, seed=0):
    """Fit law to the points (x, y) with bootstrap intervals over groups (one group per point if None).

    Points with a non-positive or non-finite value are dropped (the fits work in log space).
    select(x, y) -> mask picks the points to fit, e.g. the compute frontier; only their trials are resampled.
    """
    x, y = np.asarray(x, float), np.asarray(y, float)
    groups = np.arange(len(y)) if groups is None else np.asarray(groups)
    usable = np.isfinite(y) & (y > 0) & np.all(np.isfinite(x) & (x > 0), axis=tuple(range(1, x.ndim)))
    x, y, groups = x[usable], y[usable], groups[usable]
    if select is not None:
        # Selected once, not in every resample: the frontier of a resample can only lose points (one better than
        # everything cheaper stays so in any subset holding it), and where it loses one it rises, so refitting
        # each resample's frontier puts the replicates on one side of the fit, its estimate at their interval's
        # edge (the default study's L(C): no replicate's A below the estimate's). The intervals are the law's
        # given the frontier: its points, resampled by trial.
        keep = select(x, y)
        x, y, groups = x[keep], y[keep], groups[keep]

    estimate = _LawEstimate(law, x, y)
    params = estimate(np.arange(len(y)))
    boot, sets = bootstrap(groups, _LawEstimate(law, x, y, params), len(params), n_boot, seed)
    limits = law.limits(y) if law.limits else {}
    columns = np.log(x.reshape(len(y), -1))
    spans = {name: float(np.ptp(columns[:, k])) for name, k in (law.exponents or {}).items()}
    return Fit(law, params, boot, len(y), len(np.unique(groups)), n_boot, limits, spans, sets)


class _LawEstimate:
    """The law fitted to the points idx, from start: a picklable bootstrap estimate."""

    def __init__(self, law, x, y, start=None):
        self.law, self.x, self.y, self.start = law, x, y, start

    def __call__(self, idx):
        xi, yi = self.x[idx], self.y[idx]
        distinct = len(np.unique(xi, axis=0))
        if distinct < self.law.min_points:
            raise FitError(f"{self.law.formula} needs at least {self.law.min_points} distinct points, got {distinct}")
        return self.law.estimate(xi, yi, self.start)


def frontier(x, y):
    """Mask of the compute-efficient frontier: points better (lower y) than every point of less x and than every
    other point of the same x (of exact repeats, the first)."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    order = np.lexsort((y, x))  # by x, and at equal x best first, so each point is compared with those too
    best_before = np.concatenate([[np.inf], np.minimum.accumulate(y[order])[:-1]])
    mask = np.zeros(len(x), bool)
    mask[order] = y[order] < best_before
    return mask


def best_per_size_and_data(x, y):
    """Mask of the best point (lowest y) of each model size and data size, x = [N, D] rows: L(N, D) has no term for
    what else tells points of one N and D apart (the patch size, a swept lr), so pooled they pull it toward their
    mean; the law is the best configuration's, as the frontier laws are (of exact repeats, the first)."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    sizes = size_classes(x[:, 0])
    order = np.lexsort((y, x[:, 1], sizes))  # by size and data, best first within each
    key = np.column_stack([sizes, x[:, 1]])[order]
    first = np.ones(len(y), bool)
    first[1:] = np.any(key[1:] != key[:-1], axis=1)
    mask = np.zeros(len(y), bool)
    mask[order] = first
    return mask


def correlations(x, y, names=("x", "y")):
    """Pearson and Spearman correlations of y with x, with two-sided p-values; names: theirs in a FitError."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    if len(x) < 3:
        raise FitError(f"a correlation needs at least 3 points, got {len(x)}")
    for name, v in zip(names, (x, y)):
        if np.ptp(v) == 0:
            raise FitError(f"a correlation needs points that differ; every {name} of the {len(x)} is {v[0]:.4g}")
    pearson, spearman = stats.pearsonr(x, y), stats.spearmanr(x, y)
    return {"n": len(x), "pearson_r": float(pearson.statistic), "pearson_p": float(pearson.pvalue),
            "spearman_rho": float(spearman.statistic), "spearman_p": float(spearman.pvalue)}


def extrapolation_check(law, x, y, groups, held_out, x_target, observed, select=None, n_boot=N_BOOT, seed=0):
    """Fit law without the held-out points (a boolean mask), predict at x_target, compare with observed.

    The interval is the fit's: it covers the uncertainty of the law, not the scatter of one measurement. What the
    fit leaves open (Fit.unsettled) comes with it: the check means little where its fit does.
    """
    groups = np.asarray(groups)
    keep = ~np.asarray(held_out, bool)
    fit = fit_law(law, np.asarray(x, float)[keep], np.asarray(y, float)[keep], groups[keep], select, n_boot, seed)
    target = np.asarray([x_target], float)
    predicted = float(fit.predict(target)[0])
    low, high = (float(b[0]) for b in fit.band(target))
    return {
        "law": law.formula, "x": np.ravel(x_target).tolist(),
        "predicted": predicted, "ci_low": _json_float(low), "ci_high": _json_float(high),
        "observed": float(observed), "relative_error": (predicted - observed) / observed if observed else None,
        "inside_interval": bool(low <= observed <= high) if np.isfinite([low, high]).all() else None,
        "n_points": fit.n_points, "n_trials": fit.n_groups, "n_boot": fit.n_boot, "n_boot_converged": len(fit.boot),
        "unsettled": fit.unsettled(),
    }


# IsoFLOP profiles ------------------------------------------------------------------------------------

@dataclass
class IsoFlopProfile:
    """Loss against model size at one training-compute budget, and its parabola in log10 N."""

    budget: float
    params: np.ndarray  # one value per model size: its best trial at this budget
    steps: np.ndarray  # the steps that trial takes to spend the budget
    loss: np.ndarray
    parabola: np.ndarray  # loss = c0·log10(N)² + c1·log10(N) + c2 (NaN when it cannot be fitted)
    n_opt: float  # the parabola's minimum; NaN when it is not inside the sizes measured
    steps_opt: float  # the steps the budget buys a model of n_opt parameters (see _steps_at); NaN with n_opt


@dataclass
class IsoFlop:
    """IsoFLOP profiles and the compute-optimal model size N*(C) and steps D*(C) fitted over budgets."""

    profiles: list
    n_opt: Fit | None  # None when too few budgets have an interior optimum; notes say why
    steps_opt: Fit | None
    notes: list


def _vertex(log_x, loss):
    """Parabola coefficients and the log10 x of its minimum; NaN where there is no interior minimum."""
    if len(np.unique(log_x)) < 3:
        return np.full(3, np.nan), np.nan
    c = np.polyfit(log_x, loss, 2)
    # A flat profile's c0 is rounding noise (1e-16 of the loss), whose sign would make a minimum of it: the
    # curvature must move the loss by more than a part in 10^9 across the sizes measured.
    if c[0] * np.ptp(log_x) ** 2 <= 1e-9 * np.mean(np.abs(loss)):
        return c, np.nan
    v = -c[1] / (2 * c[0])
    return c, v if log_x.min() <= v <= log_x.max() else np.nan


N_OPT_LAW = Law("N* = a·C^b", ("a", "b"), _power_law_predict, _power_law_estimate, 3)
STEPS_OPT_LAW = Law("D* = a·C^b (steps)", ("a", "b"), _power_law_predict, _power_law_estimate, 3)


@_single_threaded
def isoflop(compute, params, steps, loss, groups, n_budgets=6, min_models=3, n_boot=N_BOOT, seed=0):
    """IsoFLOP analysis (Chinchilla's approach 2) over trials measured at several steps, or each at one budget.

    Each trial's loss curve is interpolated in log-log at log-spaced compute budgets that trials of
    min_models model sizes reach (never extrapolated). Trials measured once (a compute study under a decaying
    learning rate: one trial per size and budget) give a budget where those of min_models sizes spent the same
    compute (within SAME_BUDGET: their steps are rounded), each at its own point. At each budget the best trial of each size
    (patch size changes compute, not parameters) gives one point; a parabola in log10 N through them
    gives the compute-optimal size N*, and the steps the budget buys that size the compute-optimal steps.
    Each optimum is fitted as a power law of compute, with intervals from resampling trials, where 3
    budgets have one.
    Raises FitError only when there are no profiles to draw.
    """
    compute, params, steps, loss = (np.asarray(a, float) for a in (compute, params, steps, loss))
    groups = np.asarray(groups)
    ok = np.isfinite(loss) & (loss > 0) & (compute > 0) & np.isfinite(compute) & np.isfinite(params) & (params > 0)
    trials = [np.flatnonzero(ok & (groups == g)) for g in np.unique(groups[ok])]
    trials = [t[np.argsort(compute[t])] for t in trials]
    trials = [t for t in trials if len(np.unique(compute[t])) >= 2] + [t[-1:] for t in trials
                                                                       if len(np.unique(compute[t])) == 1]
    sizes = np.array([params[t[0]] for t in trials])
    size_class = size_classes(sizes)
    if len(np.unique(size_class)) < min_models:
        raise FitError(f"IsoFLOP profiles need trials of at least {min_models} model sizes, got "
                       f"{len(np.unique(size_class))}")
    spans = np.log10([[compute[t[0]], compute[t[-1]]] for t in trials])
    curve = np.array([len(t) >= 2 for t in trials])
    budgets = _budgets(spans[curve], size_class[curve], n_budgets, min_models) if curve.any() else np.array([])
    single_budgets, member = _single_point_budgets(spans[~curve, 0], size_class[~curve], min_models)
    if (member < 0).any():  # trials of no profile: out, not counted as trials of the fits or resampled with them
        keep = curve.copy()
        keep[np.flatnonzero(~curve)[member >= 0]] = True
        trials, sizes, size_class, spans, curve = ([t for t, k in zip(trials, keep) if k], sizes[keep],
                                                   size_class[keep], spans[keep], curve[keep])
        member = member[member >= 0]
    budgets = np.concatenate([budgets, single_budgets])
    if len(budgets) == 0:
        raise FitError(f"IsoFLOP profiles need a compute budget that {min_models} model sizes all reach: trials "
                       "evaluated at 2 or more steps, or trained to one budget")
    log_b = np.log10(budgets)
    # One row per trial, one column per budget: loss there (NaN where the trial does not reach it).
    loss_at = np.full((len(trials), len(budgets)), np.nan)
    steps_at = budgets * np.array([steps[t[-1]] / compute[t[-1]] for t in trials])[:, None]
    for i, t in enumerate(trials):
        if curve[i]:
            inside = (log_b >= spans[i, 0]) & (log_b <= spans[i, 1])
            loss_at[i, inside] = 10 ** np.interp(log_b[inside], np.log10(compute[t]), np.log10(loss[t]))
    for i, column in zip(np.flatnonzero(~curve), member):  # a single point counts at its own budget, as measured
        b = len(budgets) - len(single_budgets) + column
        loss_at[i, b], steps_at[i, b] = loss[trials[i][0]], steps[trials[i][0]]
    order = np.argsort(budgets)  # the profiles from the smallest budget up, however they were found
    budgets, loss_at, steps_at = budgets[order], loss_at[:, order], steps_at[:, order]

    def best_per_size(rows, b):
        """Of the given trials, the one with the lowest loss at budget b in each model size."""
        r = rows[np.isfinite(loss_at[rows, b])]
        r = r[np.lexsort((loss_at[r, b], size_class[r]))]
        return r[np.unique(size_class[r], return_index=True)[1]]

    def optima(rows):
        """Per budget, over the given trials: the best trial of each size, the parabola in log10 N, and the
        compute-optimal parameters and steps (NaN where the minimum is not inside what was measured)."""
        out = {"rows": [], "parabola": [], "params": [], "steps": []}
        for b in range(len(budgets)):
            r = best_per_size(rows, b)
            parabola, log_n = _vertex(np.log10(sizes[r]), loss_at[r, b])
            out["rows"].append(r)
            out["parabola"].append(parabola)
            out["params"].append(10 ** log_n)
            out["steps"].append(_steps_at(10 ** log_n, sizes[r], steps_at[r, b]))
        return out

    def law_estimate(axis):
        def estimate(rows):
            opt = np.array(optima(rows)[axis])
            valid = np.isfinite(opt)
            if valid.sum() < 3:  # as the point estimate below: a replicate through 2 points is no fit of it
                raise FitError("fewer than 3 budgets with an interior optimum")
            return _power_law_estimate(budgets[valid], opt[valid])
        return estimate

    everyone = np.arange(len(trials))
    point = optima(everyone)
    profiles = [IsoFlopProfile(budgets[b], sizes[r], steps_at[r, b], loss_at[r, b], point["parabola"][b],
                               point["params"][b], point["steps"][b]) for b, r in enumerate(point["rows"])]
    fits, notes = {}, []
    for axis, law in (("params", N_OPT_LAW), ("steps", STEPS_OPT_LAW)):
        valid = int(np.isfinite(point[axis]).sum())
        if valid < 3:
            notes.append(f"{law.formula}: not fitted: {valid} of {len(budgets)} budgets have a loss minimum "
                         "inside the model sizes measured; 3 are needed")
            fits[axis] = None
            continue
        estimate = law_estimate(axis)
        params = estimate(everyone)
        boot, sets = bootstrap(everyone, estimate, len(params), n_boot, seed)
        fits[axis] = Fit(law, params, boot, valid, len(trials), n_boot, boot_sets=sets)
    # Kept in N*(C), not left out: with min_models 3 a small study's every budget may be such a one. Named, since
    # nothing there tests the parabola's shape.
    exact = [p.budget for p in profiles if len(p.params) == 3 and np.isfinite(p.n_opt)]
    if exact:
        notes.append(f"the parabolas at {len(exact)} of {len(budgets)} budgets (C = "
                     f"{', '.join(f'{b:.3g}' for b in exact)} Gflops) pass through exactly 3 model sizes: their minima "
                     "are fixed by those points, with no residual to test the parabola's shape against")
    return IsoFlop(profiles, fits["params"], fits["steps"], notes)


def _steps_at(n_opt, params, steps):
    """The steps a budget buys a model of n_opt parameters, from the profile's points (params, steps) at it.

    Not a parabola in log10 steps through the points: where patch sizes are swept, each point's steps depend
    on the patch of its size's best trial, so they are not even monotone in size, and that parabola's minimum
    means nothing. N* is the optimum; its steps come from the point of the nearest size (its patch: the one
    chosen there), scaled by params/n_opt, since at a fixed patch the compute per step grows in proportion to
    the parameters (C = 6ND; for DiT's Gflops nearly so). Where that holds, with one patch this is C/(6·N*), so
    N*·D* spends the budget.
    """
    if not np.isfinite(n_opt):
        return np.nan
    near = np.argmin(np.abs(np.log10(params) - np.log10(n_opt)))
    return steps[near] * params[near] / n_opt


# log10 compute: single points within 4.7% of a budget's smallest count as its (each trial's steps are rounded: by
# 0.5% at 100 steps); paper models differ by 10% and more (DiT-S/2 6.06 Gflops, B/4 5.56, L/8 5.01).
SAME_BUDGET = 0.02


def _single_point_budgets(log_c, sizes, min_models):
    """(budgets, the index into them of each point or -1) for trials measured once at log10 compute log_c: points
    within SAME_BUDGET of the smallest of theirs are one budget, at their geometric mean, where min_models sizes are
    (measured from the smallest, not point to point: a chain of near points would span any width)."""
    order = np.argsort(log_c)
    cluster, start, k = np.empty(len(log_c), int), -np.inf, -1
    for i in order:
        if log_c[i] - start > SAME_BUDGET:
            start, k = log_c[i], k + 1
        cluster[i] = k
    budgets, member = [], np.full(len(log_c), -1)
    for k in np.unique(cluster):
        inside = cluster == k
        if len(np.unique(sizes[inside])) >= min_models:
            member[inside] = len(budgets)
            budgets.append(10 ** log_c[inside].mean())
    return np.array(budgets), member


def _budgets(spans, sizes, n_budgets, min_models):
    """Log-spaced budgets over the range that trials of min_models distinct sizes reach."""
    grid = np.linspace(spans[:, 0].min(), spans[:, 1].max(), 200)
    reach = (grid[:, None] >= spans[:, 0]) & (grid[:, None] <= spans[:, 1])
    enough = np.array([len(np.unique(sizes[r])) >= min_models for r in reach])
    if not enough.any():
        return np.array([])
    candidates = np.linspace(grid[enough][0], grid[enough][-1], n_budgets)
    reach = (candidates[:, None] >= spans[:, 0]) & (candidates[:, None] <= spans[:, 1])
    keep = [len(np.unique(sizes[r])) >= min_models for r in reach]
    return 10 ** candidates[keep]
