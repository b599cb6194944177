"""`python -m scaling.report RESULTS`: compute-vs-quality figures, fitted scaling laws and tables from Parquet.

RESULTS is a results.parquet or a study output folder holding one; `--paper` uses the DiT paper's
Table 4 instead. The report lands in reports/<study>/: index.html (self-contained), report.md, the
figures as PNG and SVG, and fits.json. Only ok trials enter the fits; diverged and failed ones are
listed, marked. A fit the data cannot support becomes a note, never an error.
"""
import argparse
import base64
import html
import json
import math
import re
import secrets
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from scaling import figures
from scaling.fits import (CHINCHILLA, CI_LEVEL, N_BOOT, POWER_LAW, SATURATING_POWER_LAW, Fit, FitError,
                          best_per_size_and_data, correlations, extrapolation_check, fit_law, frontier, isoflop,
                          parallel_fits, size_classes)
from scaling.report_folder import ReportDestinationError, check_report_destination, check_report_source, \
    default_report_dir, swap_in_report
from scaling.results import (RESULTS_SCHEMA, STATUSES, check_trial_rows, load_results, paper_results, results_path,
                             row_config, row_where, to_table)
from scaling.sigterm import Terminated, interruption, sigterm_interrupts  # a report being built goes, as on Ctrl-C

STATUS_RANK = {"ok": 0, "diverged": 1, "failed": 2}
FIT_TITLES = {  # fits.json keys -> how the tables name them
    "fid_vs_gflops": "FID(Gflops), Figure 1", "fid_vs_compute": "FID(C) on the frontier, Figure 2",
    "loss_vs_compute": "L(C) on the frontier, Figure 3",
    "loss_vs_params_and_images": "L(N, D), Chinchilla approach 3, best per N and D",
    "compute_optimal_params": "N*(C), Figure 5", "compute_optimal_steps": "D*(C), Figure 5",
}
ERROR_CHARS = 160  # a traceback belongs in the trial's logs, not in a table cell


@dataclass
class Analysis:
    """Everything the report shows: the rows, the per-trial summary, and the fits (None where not possible)."""

    study: str
    rows: pd.DataFrame  # every row, failed and diverged trials included
    trials: pd.DataFrame  # one row per trial: its last measurements and its status
    ok: pd.DataFrame  # rows of the trials that finished ok: the only ones fitted
    loss: str | None  # the loss column fitted: val_loss, else train_loss, else None
    final_fid: pd.DataFrame  # one point per model: FID at its last evaluated step
    correlation: dict | None = None
    fits: dict = field(default_factory=dict)  # name -> Fit
    not_fitted: dict = field(default_factory=dict)  # name -> why that fit is not in fits (for its figure)
    isoflop: object = None
    extrapolation: list = field(default_factory=list)
    fid_comparable: bool = True  # False where the ok trials' FIDs were measured with different settings
    loss_comparable: bool = True  # False where their losses measure different things (data, diffusion)
    notes: list = field(default_factory=list)
    n_boot: int = N_BOOT  # bootstrap resamples per fit; 0: point estimates, no intervals or bands


# The rows ------------------------------------------------------------------------------------------

class BadResults(ValueError):
    """Results the report cannot use; the message names the file (or "results") and what is wrong."""


# Counts and sizes, where given: finite, and above zero (> 0) or not below it (>= 0).
POSITIVE_COLUMNS = {"patch": "> 0", "params": "> 0", "gflops": "> 0", "batch_size": "> 0", "step": ">= 0",
                    "max_step": ">= 0", "train_compute": ">= 0"}
# The measurements the report fits and plots, where measured (null or NaN: not measured): a loss or a distance,
# finite and not below zero. Checked here, not in load_results: a study resuming must never stop over a value it
# measured itself, and the fits are where an impossible one does harm.
METRIC_COLUMNS = {"train_loss": ">= 0", "val_loss": ">= 0", "fid": ">= 0"}


def report_rows(results):
    """The rows of results (a results.parquet, a folder holding one, or a DataFrame), checked; BadResults if not."""
    try:
        if isinstance(results, pd.DataFrame):
            source, df = "results", to_table(results, RESULTS_SCHEMA).to_pandas()  # the columns a file has
            check_trial_rows(df, source)  # as load_results checks a file's
        else:
            source, df = results_path(results), load_results(results)
    except ValueError as e:  # load_results' and to_table's messages name the file and column already
        raise BadResults(str(e)) from None
    except OSError as e:  # missing, or in a folder that cannot be entered
        raise BadResults(str(e) if isinstance(e, FileNotFoundError) else f"{results}: {e.strerror}") from None
    if df.empty:
        raise BadResults(f"{source}: no rows")
    check_rows(df, source)
    return df


def check_rows(df, source):
    """Refuse rows the report cannot place beyond those check_trial_rows refuses: an unknown status, an impossible
    count, a measurement that cannot be."""
    unknown = ~df.status.isna() & ~df.status.isin(STATUSES)
    if unknown.any():
        raise BadResults(f"{source}: column 'status' has unknown values {sorted(set(df.status[unknown]))} "
                         f"({row_where(df, unknown.to_numpy())}); expected one of {list(STATUSES)}")
    # A diverged or failed row's loss may be what ended it (inf): no fit reads those rows, so their metrics pass.
    measured = df.status.isna().to_numpy() | (df.status == "ok").to_numpy()
    for col, rule in {**POSITIVE_COLUMNS, **METRIC_COLUMNS}.items():
        v = df[col].astype(float).to_numpy()
        with np.errstate(invalid="ignore"):
            bad = ~np.isnan(v) & ~(np.isfinite(v) & ((v > 0) if rule == "> 0" else (v >= 0)))
        if col in METRIC_COLUMNS:
            bad &= measured
        if bad.any():
            shown = ", ".join(f"{x:g}" for x in sorted(set(v[bad]))[:3])
            raise BadResults(f"{source}: column {col!r} must be finite and {rule} where given, but holds {shown} in "
                             f"{bad.sum()} of {len(df)} rows ({row_where(df, bad)})")


# Analysis --------------------------------------------------------------------------------------------

def analyze(df, n_boot=N_BOOT, seed=0):
    """Summarise a results table and fit every law the data supports."""
    # Exact copies of a row (results concatenated twice, say) would weigh their measurement twice in the fits.
    copies = int(df.duplicated().sum())
    df = df.drop_duplicates().reset_index(drop=True)
    # A writer that left training compute out still gave everything it is made of.
    df["train_compute"] = df.train_compute.fillna(df.gflops * df.batch_size * df.step * 3)
    df["images"] = df.batch_size * df.step  # D in L(N, D): training images seen
    # Size and patch are in the model's name ("DiT-XL/2", "DiT-XL/2 depth=14") when a writer left them out.
    named = df.model.str.extract(r"^DiT-([^/ ]+)/(\d+)(?: |$)")
    df["size"] = df["size"].fillna(named[0]).fillna(df.model)
    df["patch"] = df.patch.fillna(pd.to_numeric(named[1]))
    trials = trial_summary(df)
    ok = df[df.trial_id.isin(trials.index[trials.status == "ok"]) & (df.status.fillna("ok") == "ok")]
    loss = next((c for c in ("val_loss", "train_loss") if np.isfinite(ok[c]).any()), None)
    a = Analysis(study_name(df), df, trials, ok, loss, final_points(ok), n_boot=n_boot)
    last_step = a.final_fid.trial_id.map(ok.groupby("trial_id").step.max()).astype(float)  # empty: of no dtype
    early = a.final_fid[a.final_fid.step.astype(float) < last_step]
    planned = a.final_fid.trial_id.map(trials.max_step).fillna(last_step)  # a study still running: its planned steps
    lengths = sorted(int(s) for s in planned.unique())
    if len(lengths) > 1:  # a compute sweep (sweep.compute), say: each model trained to a step count of its own
        shown = ", ".join(f"{n:,}" for n in lengths)
        a.notes.append(f"Figure 1's models trained for different numbers of steps ({shown}): its fit and correlations "
                       "compare them at unequal training, where the paper's Figure 8 compares models at one step "
                       "(400K); Figure 2 compares them along their training.")
    if len(early):
        a.notes.append("Figure 1 and its fit take each model's last FID, which for "
                       + ", ".join(f"{m} is at step {s:,} of {int(n):,}" for m, s, n in
                                   zip(early.model, early.step, last_step[early.index]))
                       + ": its later milestones have no FID.")
    recomputed = df.gflops * df.batch_size * df.step * 3
    off = df[~np.isclose(df.train_compute, recomputed, rtol=1e-6, atol=0) & recomputed.notna()]
    if len(off):
        first = off.iloc[0]
        a.notes.append(f"{len(off)} row(s) record a training compute other than forward Gflops × batch × steps × 3 "
                       f"(trial {first.trial_id} at step {first.step:,}: {first.train_compute:.4g} against "
                       f"{recomputed[off.index[0]]:.4g}); the figures and fits use the recorded values.")
    if not n_boot:
        a.notes.append("No bootstrap resamples (--n-boot 0): the fits are point estimates without intervals, the "
                       "figures have no bands, and the extrapolation check cannot say whether an observation falls "
                       "inside its interval.")
    if copies:
        a.notes.append(f"{copies} row(s) were exact copies of another row (the same trial and step, every column "
                       "equal): each measurement is counted once.")
    for col in filter(None, ("fid", loss)):
        zero = ok[ok[col] == 0]  # not below zero: check_rows refuses that
        if len(zero):
            a.notes.append(f"{len(zero)} row(s) record a {col} of 0 (trial {zero.trial_id.iloc[0]} at step "
                           f"{zero.step.iloc[0]:,}): a log scale has no place for it, so the figures and fits leave "
                           "it out.")
    bad = trials[trials.status != "ok"]
    if len(bad):
        a.notes.append(f"{len(bad)} trial(s) did not finish ok ({', '.join(sorted(set(bad.status)))}): "
                       "listed in the trials table and left out of every fit and figure.")
    unfinished = trials[(trials.status == "ok") & (trials.step < trials.max_step)]  # NaN max_step: not counted
    if len(unfinished):
        a.notes.append(f"{len(unfinished)} trial(s) not yet at their last step (the study is still running or was "
                       "stopped; running it again resumes them): their last measurement stands in for the final "
                       "one in the figures and fits.")
    if loss == "val_loss":
        without = sorted(set(ok.trial_id) - set(_finite(ok, loss).trial_id))
        if without:
            a.notes.append(f"{len(without)} ok trial(s) have no validation loss ({', '.join(without[:3])}"
                           f"{', ...' if len(without) > 3 else ''}): they are left out of the loss figures and fits, "
                           "which use the validation loss of the others.")
    if loss == "train_loss":
        a.notes.append("No validation loss in these results: the loss figures and fits use the training loss.")
    elif loss is None:
        measured = np.isfinite(df[["val_loss", "train_loss"]].astype(float)).any().any()  # by trials not ok
        where = "the trials that finished ok" if measured else "these results"
        a.notes.append(f"No loss in {where}: Figures 3 and 5 and the loss fits are left out.")

    def note_unsettled(what, result):
        unsettled = result.unsettled() if isinstance(result, Fit) else []
        if unsettled:
            a.notes.append(f"{what}: {'; '.join(unsettled)}. These points do not pin the law down: read it as a "
                           f"description of them, not as a law to extrapolate.")

    def attempt(what, fn, *args, name=None, **kwargs):
        """fn's result, or None with a note; name: the fits key under which the reason is kept for the figures."""
        try:
            result = fn(*args, **kwargs)
        except FitError as e:
            a.notes.append(f"{what}: not fitted: {e}.")
            if name:
                a.not_fitted[name] = str(e)
            return None
        note_unsettled(what, result)
        return result

    fit = dict(n_boot=n_boot, seed=seed)
    points = a.final_fid
    mixed = mixed_fid_settings(ok)
    a.fid_comparable = not mixed
    if mixed:
        a.notes.append(f"FID was measured with different settings in these trials ({'; '.join(mixed)}): FIDs of "
                       "different settings are not comparable, so the FID correlation, the FID fits and the FID "
                       "extrapolation are left out; Figures 1 and 2 show the points as measured.")
        a.not_fitted["fid_vs_gflops"] = a.not_fitted["fid_vs_compute"] = "FIDs of different settings (see the notes)"
    else:
        a.correlation = attempt("Correlation of FID with log10 Gflops", correlations, np.log10(points.gflops),
                                points.fid, ("log10 Gflops", "FID"))
        a.fits["fid_vs_gflops"] = attempt("FID against Gflops (Figure 1)", fit_law, POWER_LAW, points.gflops,
                                          points.fid, points.trial_id, name="fid_vs_gflops", **fit)
        fid_rows = _finite(ok, "fid")
        a.fits["fid_vs_compute"] = attempt("FID against training compute (Figure 2)", fit_law, POWER_LAW,
                                           fid_rows.train_compute, fid_rows.fid, fid_rows.trial_id, frontier,
                                           name="fid_vs_compute", **fit)
    mixed = mixed_loss_settings(ok, loss) if loss else []
    a.loss_comparable = not mixed
    if mixed:
        a.notes.append(f"The {figures.loss_label(loss)} measures different things in these trials ({'; '.join(mixed)}):"
                       " losses of other data or another diffusion are not on one scale, so the loss fits, the "
                       "IsoFLOP analysis and the loss extrapolation are left out; Figures 3 and 4 show the points as "
                       "measured.")
        a.not_fitted["loss_vs_compute"] = "losses that measure different things (see the notes)"
    elif loss:
        loss_rows = _finite(ok, loss)
        a.fits["loss_vs_compute"] = attempt("L(C) (Figure 3)", fit_law, SATURATING_POWER_LAW,
                                            loss_rows.train_compute, loss_rows[loss], loss_rows.trial_id,
                                            frontier, name="loss_vs_compute", **fit)
        a.fits["loss_vs_params_and_images"] = attempt(
            "L(N, D), Chinchilla's approach 3", fit_law, CHINCHILLA, loss_rows[["params", "images"]].to_numpy(float),
            loss_rows[loss], loss_rows.trial_id, best_per_size_and_data, **fit)
        a.isoflop = attempt("IsoFLOP profiles (Figure 5)", isoflop, loss_rows.train_compute, loss_rows.params,
                            loss_rows.step, loss_rows[loss], loss_rows.trial_id, **fit)
        if a.isoflop:
            a.fits["compute_optimal_params"] = a.isoflop.n_opt
            a.fits["compute_optimal_steps"] = a.isoflop.steps_opt
            note_unsettled("N*(C), IsoFLOP (Figure 5)", a.isoflop.n_opt)
            note_unsettled("D*(C), IsoFLOP (Figure 5)", a.isoflop.steps_opt)
            a.notes += [f"IsoFLOP (Figure 5): {n}." for n in a.isoflop.notes]
    a.fits = {k: v for k, v in a.fits.items() if v is not None}
    a.extrapolation = extrapolations(a, attempt, fit)
    return a


def trial_summary(df):
    """One row per trial: its identity, last step, last finite measurements, and worst status."""
    # A failure after a trial's last milestone changes none of its results (drivers before the recorder
    # skipped such rows wrote one past max_step): the trial stays ok.
    done = set(df.trial_id[(df.status.fillna("ok") == "ok") & (df.step == df.max_step)])
    rows = df[~((df.status == "failed") & (df.step > df.max_step) & df.trial_id.isin(done))].sort_values("step")
    g = rows.groupby("trial_id", sort=False)
    out = g[["model", "size", "patch", "params", "gflops", "batch_size", "max_step"]].last()
    out["step"] = g.step.max()
    out["train_compute"] = g.train_compute.max()
    for col in ("train_loss", "val_loss", "fid"):
        last = _finite(rows, col).groupby("trial_id").tail(1).set_index("trial_id")
        out[col] = last[col]
        if col == "fid":
            out["fid_step"] = last.step
    out["status"] = g.status.agg(lambda s: max(s.fillna("ok"), key=STATUS_RANK.__getitem__))
    out["error"] = g.error.agg(lambda s: next((e for e in s if isinstance(e, str) and e), ""))
    rank = {m: i for i, m in enumerate(figures.model_order(out))}
    return out.iloc[np.lexsort((out.step, out.model.map(rank)))]


def final_points(ok):
    """FID of each model at its last evaluated step (the best trial there where a model has several)."""
    rows = _positive(ok, "fid", "gflops")
    last = rows[rows.step == rows.groupby("trial_id").step.transform("max")]
    # A shorter trial of the model (a step count of its own under a decaying lr) is no final point beside a longer one.
    last = last[last.step == last.groupby("model").step.transform("max")]
    return last.sort_values("fid").drop_duplicates("model").sort_values("gflops")


def extrapolations(a, attempt, fit):
    """Fit without the largest-compute model of those that measured the quantity (for L(N, D), without every model
    of its size), predict its final loss and FID, compare with what it measured; the frontier laws, where that is off
    the frontier, its last point."""
    ok = a.ok
    if ok.model.nunique() < 2:
        a.notes.append("Extrapolation check: needs at least 2 models.")
        return []
    if ok.train_compute.isna().all():
        a.notes.append("Extrapolation check: no training compute in these results.")
        return []
    checks = []
    cases = [("FID", "fid", POWER_LAW, ["train_compute"], frontier)] if a.fid_comparable else []
    if a.loss and a.loss_comparable:
        cases = [(figures.loss_label(a.loss), a.loss, SATURATING_POWER_LAW, ["train_compute"], frontier),
                 (figures.loss_label(a.loss), a.loss, CHINCHILLA, ["params", "images"], best_per_size_and_data)] + cases
    for what, col, law, x_cols, select in cases:
        rows = _finite(ok, col)
        if law is CHINCHILLA:  # rows without a parameter count or a batch size (given where known) it cannot fit
            rows = _positive(rows, "params", "images")
        # The largest compute among the rows that measured it: a larger one's point left in (a model whose later
        # milestones skipped it, or a size without a batch size) would make the check an interpolation.
        measured = rows.dropna(subset=["train_compute"])
        if measured.empty:
            continue
        held_model = measured.loc[measured.train_compute.idxmax(), "model"]
        last = _last_measurement(rows, col, held_model)
        target = _frontier_end(rows, col, last) if select is frontier else last
        held = (rows.model == target.model).to_numpy()
        if law is CHINCHILLA:
            # The other patch sizes of the held-out size share its N (within 2.3%) and, at their last step, its D:
            # left in, they would make the check an interpolation. Held out with it, the fit must reach its N.
            classes = size_classes(rows.params.to_numpy(float))
            held = classes == classes[held][0]
            # The law is the best configuration's at each N and D (best_per_size_and_data): so is what it predicts.
            same = rows[held & (rows.images == target.images).to_numpy()]
            target = same.loc[same[col].idxmin()]
        held_out, cut = figures.model_order(rows[held]), None
        if select is frontier and target.name != last.name:  # all of as much compute out too: an extrapolation still
            cut = float(target.train_compute)
            held = held | (rows.train_compute >= target.train_compute).to_numpy()
            a.notes.append(f"Extrapolation check of {what} with {law.formula}: {held_model}'s last point is off the "
                           "compute-efficient frontier the law describes (a smaller compute did better), so it "
                           f"predicts the frontier's last point, {target.model} at step {int(target.step):,}, fitted "
                           "without that model and without every point of as much compute or more.")
        x = rows[x_cols].to_numpy(float)
        x = x[:, 0] if len(x_cols) == 1 else x
        check = attempt(f"Extrapolation of {what} to {target.model} with {law.formula}", extrapolation_check, law, x,
                        rows[col], rows.trial_id, held, target[x_cols].to_numpy(float).squeeze(), target[col],
                        select, **fit)
        if check and check["unsettled"]:
            a.notes.append(f"Extrapolation of {what} to {target.model} with {law.formula}, its fit without the "
                           f"held-out points: {'; '.join(check['unsettled'])}. Its interval, and whether the "
                           "observation falls inside it, say little of the law.")
        if check:
            checks.append({"quantity": what, "model": target.model, "step": int(target.step), "held_out": held_out,
                           "held_out_from_compute": cut, **check})
    return checks


def _last_measurement(rows, col, model):
    """A model's row at its last step (of its trials there the best, as Figure 1), None when it has none."""
    mine = rows[rows.model == model]
    if mine.empty:
        return None
    last = mine[mine.step == mine.step.max()]
    return last.loc[last[col].idxmin()]


def _frontier_end(rows, col, row):
    """row where it is on the compute-efficient frontier, else the frontier's last point: a law of the frontier says
    nothing of a point off it (a smaller compute did better), fitted with it or not."""
    rows = _positive(rows, col, "train_compute")  # as the fits: a 0, which no log scale shows, would dominate it
    if row.name not in rows.index:  # itself no point of a log scale: compared as it is (its error, none)
        return row
    front = rows[frontier(rows.train_compute.to_numpy(float), rows[col].to_numpy(float))]
    return row if row.name in front.index else front.loc[front.train_compute.idxmax()]


def _finite(df, col):
    return df[np.isfinite(df[col].astype(float))]


# What an FID was measured with: FIDs that differ in any of these are not on one scale (FID's bias falls with the
# sample count; features, references, sampler and guidance change what it measures).
FID_SETTINGS = ("fid_samples", "feature_extractor", "fid_basis", "sampler", "cfg_scale")


def mixed_fid_settings(rows):
    """Each FID setting that takes several values among the rows with an FID, as "column: value, value"."""
    with_fid = _finite(rows, "fid")
    out = []
    for col in FID_SETTINGS:
        values = with_fid[col].dropna().unique() if col in with_fid else []
        if len(values) > 1:  # fid_basis is JSON of digests: counted, not shown
            shown = f"{len(values)} different" if col == "fid_basis" else ", ".join(sorted(map(_setting, values)))
            out.append(f"{col}: {shown}")
    return out


# What a loss measures: losses that differ in any of these are not on one scale (other images, another resolution or
# encode of them; another diffusion chain, or the variational bound's term that learn_sigma adds).
LOSS_SETTINGS = {"dataset": None, "data.image_size": ("data", "image_size"), "data_encode": ("data_encode",),
                 "train.diffusion_steps": ("train", "diffusion_steps"), "train.learn_sigma": ("train", "learn_sigma")}


def mixed_loss_settings(rows, loss):
    """Each loss setting that takes several values among the rows with a loss, as "name: value, value" (the study
    file's settings read from each row's config_json; rows without one count for none)."""
    with_loss = _finite(rows, loss)
    configs = [row_config(text) or {} for text in with_loss.get("config_json", pd.Series([None] * len(with_loss)))]
    out = []
    for name, path in LOSS_SETTINGS.items():
        if path is None:
            values = set(with_loss[name].dropna()) if name in with_loss else set()
        else:
            values = {v for v in (_nested(c, path) for c in configs) if v is not None}
        if len(values) > 1:  # data_encode is a digest: counted, not shown
            shown = f"{len(values)} different" if name == "data_encode" else ", ".join(sorted(map(_setting, values)))
            out.append(f"{name}: {shown}")
    return out


def _nested(config, path):
    for key in path:
        config = config.get(key) if isinstance(config, dict) else None
    return config if isinstance(config, (str, int, float, bool)) else None


def _setting(value):
    return f"{value:g}" if isinstance(value, (float, np.floating)) else str(value)


def _positive(df, *cols):
    """Rows where every column is finite and positive: what a log axis can show."""
    keep = np.ones(len(df), bool)
    for col in cols:
        v = df[col].astype(float).to_numpy()
        keep &= np.isfinite(v) & (v > 0)
    return df[keep]


def study_name(df):
    names = sorted(set(df.study.dropna()))
    return "+".join(names) if names else "study"


# Tables: one structure, rendered to Markdown and HTML ---------------------------------------------

@dataclass
class Table:
    """A titled table of display strings, rendered alike to Markdown and HTML."""

    title: str
    headers: list
    rows: list  # lists of cell strings
    marks: list = None  # per row: a CSS class ("diverged", "failed") or None


def _num(v, digits=4):
    """A number for a table cell: whole numbers with separators, others to 4 significant digits, – if none."""
    if v is None or (isinstance(v, float) and not math.isfinite(v)) or pd.isna(v):
        return "–"
    if isinstance(v, (int, np.integer)) or float(v).is_integer() and abs(v) < 1e7:
        return f"{int(v):,}"
    return f"{float(v):.{digits}g}"


NO_INTERVAL_COLUMNS = ("interval", "inside", "resamples")  # empty in a report without bootstrap resamples


def tables(a):
    """The report's tables, in the order they appear (without interval columns when there are no resamples)."""
    out = [trials_table(a)]
    if a.correlation:
        out.append(correlation_table(a))
    if a.fits:
        out.append(fits_table(a))
    if a.isoflop:
        out.append(Table("IsoFLOP profiles", ["budget C (Gflops)", "models", "N* (parameters)", "D* (steps)"],
                         [[_num(p.budget), str(len(p.params)), _num(p.n_opt), _num(p.steps_opt)]
                          for p in a.isoflop.profiles]))
    if a.extrapolation:
        out.append(extrapolation_table(a))
    return out if a.n_boot else [_drop_columns(t, NO_INTERVAL_COLUMNS) for t in out]


def correlation_table(a):
    """Pearson and Spearman correlations of final FID with log10 Gflops, and the log-log slope."""
    c, f = a.correlation, a.fits.get("fid_vs_gflops")
    slope = _num(f.params[1]) if f else "–"
    if f and a.n_boot:
        low, high = f.intervals()["b"]
        slope += f" [{_num(low)}, {_num(high)}]"  # – for a fit with no interval (Fit.interval_problem)
    return Table("Correlation of final FID with log10 Gflops",
                 ["n", "Pearson r", "p", "Spearman ρ", "p", "log-log slope" + _ci_label(a, " ({} CI)")],
                 [[str(c["n"]), f"{c['pearson_r']:.4f}", f"{c['pearson_p']:.3g}", f"{c['spearman_rho']:.4f}",
                   f"{c['spearman_p']:.3g}", slope]])


def fits_table(a):
    """Every fitted coefficient with its bootstrap interval and the data behind it."""
    rows = []
    for name, f in a.fits.items():
        ci = f.intervals()
        for coef, v in zip(f.law.names, f.params):
            rows.append([FIT_TITLES.get(name, name), f.law.formula, coef, _num(v),
                         f"[{_num(ci[coef][0])}, {_num(ci[coef][1])}]", str(f.n_points), str(f.n_groups),
                         f"{len(f.boot)}/{f.n_boot}"])
    title = (f"Fitted laws ({CI_LEVEL:.0%} bootstrap intervals, resampling the trials behind each fit: for a "
             f"frontier fit, the trials on the frontier)" if a.n_boot
             else "Fitted laws (point estimates: no bootstrap resamples, so no intervals)")
    return Table(title, ["fit", "law", "coefficient", "value", "interval", "points", "trials", "resamples"], rows)


def extrapolation_table(a):
    """Each law fitted without the largest-compute model, its prediction for it, and what it measured."""
    title = "Extrapolation check: fitted without the largest-compute model"
    if any(n.startswith("Extrapolation check of") for n in a.notes):
        title += " (unless a note says otherwise)"
    if any(len(e["x"]) > 1 for e in a.extrapolation):  # an L(N, D) row
        title += " (L(N, D) also without the other patch sizes of its model size, which share its N)"
    if a.n_boot:
        title += " (the interval is the fit's uncertainty, not the scatter of a single run)"
    return Table(title, ["quantity", "law", "held-out model", "at", "predicted", "interval", "observed", "error",
                         "inside", "resamples"],
                 [[e["quantity"], e["law"], _held_out(e), _at(e), _num(e["predicted"]),
                   f"[{_num(e['ci_low'])}, {_num(e['ci_high'])}]", _num(e["observed"]),
                   "–" if e["relative_error"] is None else f"{e['relative_error']:+.1%}",
                   {True: "yes", False: "no", None: "–"}[e["inside_interval"]],
                   f"{e['n_boot_converged']}/{e['n_boot']}"]
                  for e in a.extrapolation])


def _drop_columns(t, names):
    """The table without the named columns."""
    keep = [i for i, h in enumerate(t.headers) if h not in names]
    return Table(t.title, [t.headers[i] for i in keep], [[row[i] for i in keep] for row in t.rows], t.marks)


def _ci_label(a, template):
    """template filled with the interval's level ("95%"), or nothing when there are no resamples."""
    return template.format(f"{CI_LEVEL:.0%}") if a.n_boot else ""


def _held_out(e):
    """The model predicted, and the others held out with it (L(N, D): the other patch sizes of its size)."""
    others = [m for m in e["held_out"] if m != e["model"]]
    if e.get("held_out_from_compute") is not None:
        others.append(f"every point from C = {e['held_out_from_compute']:.3g} Gflops on")
    return e["model"] + (f" (and {', '.join(others)})" if others else "")


def _at(e):
    """Where an extrapolation was made: the compute, or the size and data of L(N, D)."""
    if len(e["x"]) == 1:
        return f"C = {e['x'][0]:.3g} Gflops (step {e['step']:,})"
    return f"N = {e['x'][0]:.3g}, D = {e['x'][1]:.3g} images"


def trials_table(a):
    """Every trial, failed and diverged ones marked with their error."""
    t = a.trials
    marks = [None if s == "ok" else s for s in t.status]
    rows = [[r.model, str(tid)[:12], _num(r.params / 1e6, 4) + "M" if pd.notna(r.params) else "–", _num(r.gflops),
             _num(r.batch_size), f"{_num(r.step)} / {_num(r.max_step)}", _num(r.train_compute), _num(r.train_loss),
             _num(r.val_loss), _num(r.fid) + (f" @ {int(r.fid_step):,}" if pd.notna(r.fid_step) else ""),
             ("✓ ok" if r.status == "ok" else f"✗ {r.status}" + (f": {r.error[:ERROR_CHARS]}" if r.error else ""))]
            for tid, r in t.iterrows()]
    return Table("Trials (last measurement of each)",
                 ["model", "trial", "params", "Gflops", "batch", "steps", "compute (Gflops)", "train loss",
                  "val loss", "FID @ step", "status"], rows, marks)


# Characters that Markdown reads as markup inside a line: emphasis (N*(C) ... D*(C)), links, code, GitHub's
# strikethrough and $math$; a backslash before each shows it as written.
MARKDOWN_MARKUP = re.compile(r"([\\`*_\[\]~$])")


def _md_text(s):
    """s as one line of Markdown text: names come from the results, and GitHub renders a raw HTML tag or markup in
    them."""
    text = html.escape(str(s), quote=False).replace("\r", " ").replace("\n", " ")
    return MARKDOWN_MARKUP.sub(r"\\\1", text)


def _md_cell(s):
    return _md_text(s).replace("|", "\\|")


def table_markdown(t):
    """A GitHub-flavoured Markdown table (marks are in the status column already)."""
    lines = [f"### {_md_text(t.title)}", "", "| " + " | ".join(map(_md_cell, t.headers)) + " |",
             "|" + "---|" * len(t.headers)]
    lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in t.rows]
    return "\n".join(lines) + "\n"


def table_html(t):
    """An HTML table whose marked rows carry their mark as a CSS class."""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in t.headers)
    body = []
    for i, row in enumerate(t.rows):
        mark = t.marks[i] if t.marks else None
        cls = f' class="{mark}"' if mark else ""
        body.append(f"<tr{cls}>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>")
    return (f"<h3>{html.escape(t.title)}</h3>\n<table><thead><tr>{head}</tr></thead>"
            f"<tbody>{''.join(body)}</tbody></table>")


# Figures ---------------------------------------------------------------------------------------------

@dataclass
class Figure:
    """A figure written as <stem>.png and <stem>.svg, and what it shows."""

    stem: str
    caption: str


def _final_step_words(points):
    """Where Figure 1's points are: their one step, or each model's own."""
    steps = points.step.unique()
    return f"step {int(steps[0]):,}" if len(steps) == 1 else "each model's final step (steps differ: see the notes)"


def draw_figures(a, folder):
    """Every figure the data allows, into folder; a figure without data becomes a note."""
    out = []
    fid_label = _fid_label(a.ok)
    if len(a.final_fid):
        fit = a.fits.get("fid_vs_gflops")
        drawn = [f"the power-law fit{_band_words(fit, ', its {} band')}"] if fit else []
        drawn += ["the correlations"] if a.correlation else []
        out.append(Figure(figures.fid_vs_gflops(a.final_fid, fit, a.correlation, folder, fid_label,
                                                _no_fit_words(a, "fid_vs_gflops")),
                          f"Figure 1. FID against forward Gflops at {_final_step_words(a.final_fid)}, one point per "
                          f"model (the paper's Figure 8){', with ' + ' and '.join(drawn) if drawn else ''}."))
    else:
        a.notes.append("No FID with Gflops in the ok trials: no Figure 1.")
    rows = _positive(a.ok, "fid", "train_compute")
    if len(rows):
        fit = a.fits.get("fid_vs_compute")
        law = f" and a power law fitted to it{_band_words(fit, ' with its {} bootstrap band')}" if fit else ""
        out.append(Figure(figures.fid_vs_compute(rows, frontier(rows.train_compute, rows.fid), fit, folder, fid_label,
                                                 _no_fit_words(a, "fid_vs_compute")),
                          "Figure 2. FID against training compute, one curve per model (the paper's Figure 9), with "
                          f"the compute-efficient frontier{law}."))
    else:
        a.notes.append("No FID with training compute in the ok trials: no Figure 2.")
    rows = _positive(a.ok, a.loss, "train_compute") if a.loss else a.ok.iloc[:0]
    if len(rows):
        fit = a.fits.get("loss_vs_compute")
        band = _band_words(fit, " with its {} bootstrap band") if fit else ""
        law = f", and L(C) = E + A·C^(−α) fitted to it{band}" if fit else ""
        out.append(Figure(figures.loss_vs_compute(rows, a.loss, frontier(rows.train_compute, rows[a.loss]), fit,
                                                  folder, _no_fit_words(a, "loss_vs_compute")),
                          f"Figure 3. {figures.loss_label(a.loss).capitalize()} against training compute, the "
                          f"frontier{law}."))
    for col, name in (("fid", "fig4_fid_vs_steps"), (a.loss, "fig4_loss_vs_steps")):
        rows = _finite(a.ok, col) if col else a.ok.iloc[:0]
        if (rows.groupby("trial_id").step.nunique() > 1).any():
            label = fid_label if col == "fid" else figures.loss_label(col)
            out.append(Figure(figures.metric_vs_steps(rows, col, label, folder, name),
                              f"Figure 4. {label} against training steps: top, one panel per patch size (curves by "
                              "model size); bottom, one panel per model size (curves by patch)."))
        elif len(rows):
            a.notes.append(f"{col}: one evaluation step per trial, so no curve against steps (Figure 4).")
    if a.isoflop:
        iso = a.isoflop
        if iso.n_opt and iso.steps_opt:  # both or neither: a budget's N* and D* are found together
            banded = [s for s, f in (("N*(C)", iso.n_opt), ("D*(C)", iso.steps_opt)) if f.has_intervals()]
            bands = (f" with {CI_LEVEL:.0%} bootstrap bands" if len(banded) == 2 else
                     f" (a {CI_LEVEL:.0%} bootstrap band for {banded[0]} only)" if banded else "")
            optima = f"the compute-optimal size N*(C) and steps D*(C) as power laws{bands}"
        else:
            optima = "too few budgets with a minimum inside the sizes measured for N*(C) and D*(C) as power laws"
        out.append(Figure(figures.isoflop_profiles(iso, a.loss, folder),
                          "Figure 5. IsoFLOP profiles: loss against parameters at fixed training compute (the best "
                          f"patch size of each model size), a parabola in log parameters per budget; {optima}."))
    return out


def _no_fit_words(a, name):
    """What a figure says where its fit is missing, and why (None where it is drawn)."""
    return None if name in a.fits else f"no fit: {a.not_fitted.get(name, 'see the notes')}"


def _band_words(fit, template):
    """template filled with the interval's level where the figure draws fit's bootstrap band, else nothing."""
    return template.format(f"{CI_LEVEL:.0%}") if fit.has_intervals() else ""


def _fid_label(rows):
    """FID with what it was measured with, when one setting covers all rows (FID depends on both)."""
    samples, extractor = rows.fid_samples.dropna().unique(), rows.feature_extractor.dropna().unique()
    parts = []
    if len(samples) == 1:
        parts.append(f"{int(samples[0]):,} samples")
    if len(extractor) == 1:
        parts.append(str(extractor[0]))
    return f"FID ({', '.join(parts)})" if parts else "FID"


# Writing -----------------------------------------------------------------------------------------------

def summary_lines(a):
    """The report's opening facts: how much was measured, on what, and how."""
    counts = a.trials.status.value_counts()
    status = ", ".join(f"{counts[s]} {s}" for s in STATUS_RANK if s in counts)
    lines = [f"{len(a.rows)} rows from {len(a.trials)} trials ({status})."]
    for col, what in (("dataset", "dataset"), ("feature_extractor", "FID features"), ("sampler", "sampler"),
                      ("cfg_scale", "guidance scale")):
        values = sorted(map(str, a.rows[col].dropna().unique()))
        if values:
            lines.append(f"{what}: {', '.join(values)}")
    return lines


def markdown(a, figs, tabs):
    """report.md: the same content as the page, the figures as PNG links."""
    parts = [f"# Scaling report: {_md_text(a.study)}", "", *[f"- {_md_text(s)}" for s in summary_lines(a)], ""]
    for f in figs:
        caption = _md_text(f.caption)
        parts += [f"![{caption}]({f.stem}.png)", "", f"*{caption}* ([SVG]({f.stem}.svg))", ""]
    parts += [table_markdown(t) for t in tabs]
    if a.notes:
        parts += ["## Notes", "", *[f"- {_md_text(n)}" for n in a.notes], ""]
    return "\n".join(parts)


CSS = """
body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}
figure{margin:2em 0}figure img{max-width:100%;height:auto}figcaption{font-size:.9em;color:#444}
table{border-collapse:collapse;font-size:.85em;margin-bottom:1.5em}td,th{border:1px solid #ccc;padding:3px 8px;
text-align:right}th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}
tr.diverged td{background:#fff3cd}tr.failed td{background:#f8d7da}.notes li{margin:.3em 0}
"""


def page(a, figs, tabs, folder):
    """index.html: the SVGs inlined as data URIs, so the page needs nothing beside it to display."""
    body = [f"<h1>Scaling report: {html.escape(a.study)}</h1>",
            "<ul>" + "".join(f"<li>{html.escape(s)}</li>" for s in summary_lines(a)) + "</ul>"]
    for f in figs:
        svg = base64.b64encode((folder / f"{f.stem}.svg").read_bytes()).decode()
        body.append(f'<figure><img alt="{html.escape(f.caption)}" src="data:image/svg+xml;base64,{svg}">'
                    f"<figcaption>{html.escape(f.caption)} <a href=\"{f.stem}.png\">PNG</a> · "
                    f"<a href=\"{f.stem}.svg\">SVG</a></figcaption></figure>")
    body += [table_html(t) for t in tabs]
    if a.notes:
        body.append('<h2>Notes</h2><ul class="notes">' + "".join(f"<li>{html.escape(n)}</li>" for n in a.notes)
                    + "</ul>")
    body.append('<p>Coefficients and intervals in machine-readable form: <a href="fits.json">fits.json</a>; '
                'this page as Markdown: <a href="report.md">report.md</a>.</p>')
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>Scaling report: "
            f"{html.escape(a.study)}</title><style>{CSS}</style></head><body>\n" + "\n".join(body)
            + "\n</body></html>\n")


def fits_json(a, results=None):
    """fits.json: every coefficient with its interval, the correlations, IsoFLOP optima, checks and notes; results:
    the results file the rows were read from (absolute; None: rows given as they are), whose report a study of
    another output keeps out of its default folder (scaling.report_folder.check_report_source)."""
    iso = None
    if a.isoflop:
        iso = [{"budget": p.budget, "params": p.params.tolist(), "steps": p.steps.tolist(), "loss": p.loss.tolist(),
                "parabola_log10_params": p.parabola.tolist(), "params_opt": p.n_opt, "steps_opt": p.steps_opt}
               for p in a.isoflop.profiles]
    doc = {"study": a.study, "results": None if results is None else str(results), "rows": len(a.rows),
           "trials": a.trials.status.value_counts().to_dict(), "loss_column": a.loss,
           "correlation_fid_log10_gflops": a.correlation,
           "fits": {k: f.to_dict() for k, f in a.fits.items()}, "isoflop_profiles": iso,
           "extrapolation": a.extrapolation, "notes": a.notes}
    return json.dumps(_jsonable(doc), indent=2, ensure_ascii=False) + "\n"


def _jsonable(v):
    """JSON has no NaN: non-finite numbers become null, numpy scalars plain numbers."""
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, (np.integer, int)) and not isinstance(v, bool):
        return int(v)
    if isinstance(v, (np.floating, float)):
        return float(v) if math.isfinite(v) else None
    return v


def build_report(results, out=None, n_boot=N_BOOT, seed=0, processes=1, source=None):
    """Write the report of results (a path or a DataFrame) to out (default reports/<study>); returns out.

    source: the results file a DataFrame's rows were read from (a path's is itself), recorded in fits.json: the
    default folder holding the report of another results file is refused (check_report_source), as a study's second
    output (`--set output=...`) has the first one's name.

    out must be new, empty, or an earlier report (check_report_destination): anything else is refused with a
    ValueError before any work. processes: worker processes for the fits (None: one per CPU). They are
    spawned, which imports the caller's main module again: a script must guard its entry point (`if __name__ ==
    "__main__":`) to use them. The command-line entry points do.
    """
    df = report_rows(results)
    if not isinstance(results, pd.DataFrame):
        source = results_path(results)
    source = None if source is None else Path(source).resolve()
    default = not out
    out = Path(out) if out else default_report_dir(study_name(df))
    target = check_report_destination(out)
    if default and source is not None:
        check_report_source(out, source, "--out")
    with parallel_fits(processes):  # the L-BFGS fits: most of a report's time
        a = analyze(df, n_boot, seed)
    target.parent.mkdir(parents=True, exist_ok=True)
    # Named before it is made, unlike mkdtemp's: a Ctrl-C or SIGTERM arriving as it is made would leave it.
    tmp = target.parent / f".{target.name}.tmp-{secrets.token_hex(4)}"
    try:
        tmp.mkdir(mode=0o700)
        figs = draw_figures(a, tmp)
        tabs = tables(a)
        (tmp / "report.md").write_text(markdown(a, figs, tabs), encoding="utf-8")
        (tmp / "fits.json").write_text(fits_json(a, source), encoding="utf-8")
        (tmp / "index.html").write_text(page(a, figs, tabs, tmp), encoding="utf-8")
        swap_in_report(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _whole_number(text):
    """text as an integer >= 0, else None."""
    try:
        n = int(text)
    except ValueError:
        return None
    return n if n >= 0 else None


MAX_N_BOOT = 100_000  # resamples per fit: each fit's bootstrap holds them all (1e9 ran out of memory)


def n_boot_count(text):
    """--n-boot: 0 (no intervals) or 2 (a percentile interval needs two) to MAX_N_BOOT resamples."""
    n = _whole_number(text)
    if n is None or n == 1 or n > MAX_N_BOOT:
        raise argparse.ArgumentTypeError(f"{text}: give 0 (no intervals) or a count from 2 to {MAX_N_BOOT:,}")
    return n


def seed_number(text):
    """--seed: numpy's generators take whole numbers >= 0."""
    seed = _whole_number(text)
    if seed is None:
        raise argparse.ArgumentTypeError(f"{text}: give a whole number >= 0")
    return seed


def main(argv=None):
    """The command line: 0 when the report is written, 2 (one line on stderr) when the input is bad, 130 or 143
    when interrupted (Ctrl-C, SIGTERM), the report folder then left as it was."""
    parser = argparse.ArgumentParser(
        prog="python -m scaling.report",
        description="Compute-vs-quality figures, fitted scaling laws and tables from a results.parquet.")
    # Not required=True: argparse checks a required group before it names unknown arguments, so `--bogus` alone
    # was reported as a missing RESULTS. Checked after parsing instead, with argparse's own wording.
    source = parser.add_mutually_exclusive_group()
    source.add_argument("results", nargs="?", help="a results.parquet or a study output folder holding one")
    source.add_argument("--paper", action="store_true", help="build the report on the DiT paper's Table 4")
    parser.add_argument("--out", help="report folder: new, empty, or an earlier report, which is replaced "
                                      "(default: reports/<study> under the current directory)")
    parser.add_argument("--n-boot", type=n_boot_count, default=N_BOOT,
                        help=f"bootstrap resamples per fit (default {N_BOOT}; 0: no intervals, a quicker report)")
    parser.add_argument("--seed", type=seed_number, default=0, help="bootstrap seed (an integer >= 0)")
    args = parser.parse_args(argv)
    if args.results is None and not args.paper:
        parser.error("one of the arguments results --paper is required")
    try:
        if args.out == "":  # an unset variable, say: not the default folder
            raise ReportDestinationError("is empty; give a folder, or leave the flag out for reports/<study>")
        if args.out:  # before reading anything: a bad destination costs nothing
            check_report_destination(args.out)
        with sigterm_interrupts():
            df = paper_results() if args.paper else report_rows(args.results)
            source = None if args.paper else results_path(args.results)
            out = build_report(df, args.out, args.n_boot, args.seed, processes=None, source=source)
    except (KeyboardInterrupt, ImportError) as e:
        interrupt = interruption(e)
        if interrupt is None:
            raise
        print("interrupted: no report written; the report folder is as it was", file=sys.stderr)
        return 143 if isinstance(interrupt, Terminated) else 130
    except ReportDestinationError as e:
        print(f"error: {'--out' if args.out is not None else 'report folder'} {e}", file=sys.stderr)
        return 2
    except (FileNotFoundError, BadResults) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(out / "index.html")
    return 0


if __name__ == "__main__":
    sys.exit(main())
