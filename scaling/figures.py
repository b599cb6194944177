"""The report's figures, each saved as PNG and SVG: compute against quality, loss and steps.

Every function takes tidy rows (and the fits, or None) and returns the file stem it wrote. Where the
points are models, colour means model size and marker/line style patch size, so one legend reads across
figures; Figure 5's points are budgets, coloured by budget.
"""
import matplotlib

matplotlib.use("Agg")  # files only: a report must build on a machine without a display
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker as ticker  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from scaling.fits import CI_LEVEL  # noqa: E402

# Set around each figure's drawing and saving, not at import: the process importing this module (the study's driver,
# a notebook) keeps its own matplotlib settings.
STYLE = {
    "figure.dpi": 100, "savefig.dpi": 150, "axes.grid": True, "grid.alpha": 0.3, "font.size": 10,
    "legend.fontsize": 8, "svg.hashsalt": "dit-scaling",  # stable SVG ids: the same data, the same file
    "text.parse_math": False,  # names are text: a "$" in a model's name is not TeX (an odd count raised)
}
PATCH_STYLE = {1: ("D", ":"), 2: ("o", "-"), 4: ("s", "--"), 8: ("^", "-."), 16: ("v", ":")}
COMPUTE_LABEL = "training compute (Gflops = Gflops/image × batch × steps × 3)"
BAND_LABEL = f"{CI_LEVEL:.0%} bootstrap band"


# Styles and helpers ------------------------------------------------------------------------------

def size_order(df):
    """Sizes from smallest to largest by their median parameter count."""
    return df.groupby("size", dropna=False)["params"].median().sort_values().index.tolist()


def model_order(df):
    """Models by size, then by decreasing patch (increasing Gflops): the paper's order."""
    rank = {s: i for i, s in enumerate(size_order(df))}
    keys = df.drop_duplicates("model")
    keys = keys.assign(_size=keys["size"].map(rank), _g=keys.gflops.fillna(0))
    return keys.sort_values(["_size", "_g"]).model.tolist()


def model_styles(df):
    """model -> (colour, marker, line style): colour by size (ordered by parameters), style by patch."""
    sizes = size_order(df)
    colours = plt.get_cmap("tab10").colors
    styles = {}
    for model, row in df.drop_duplicates("model").set_index("model").iterrows():
        marker, line = PATCH_STYLE.get(_int(row["patch"]), ("o", "-"))
        styles[model] = (colours[sizes.index(row["size"]) % len(colours)], marker, line)
    return styles


def loss_label(column):
    """How a loss column reads in a label."""
    return {"val_loss": "validation loss", "train_loss": "training loss"}.get(column, column)


def _int(v):
    return None if pd.isna(v) else int(v)


def _coef(v):
    return f"{v:.3g}"


def _count(v):
    """Counts as 50k, 1.2M, 0.7B: how the paper writes steps and parameters."""
    for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(v) >= scale:
            return f"{v / scale:.3g}{suffix}"
    return f"{v:g}"


SUPERSCRIPT = str.maketrans("-0123456789", "⁻⁰¹²³⁴⁵⁶⁷⁸⁹")


def _power(v):
    """Compute as the paper writes it: 10⁹, 2×10⁹ (matplotlib's own labels are TeX, which parse_math=False prints)."""
    mantissa, exponent = f"{v:.0e}".split("e")
    power = "10" + str(int(exponent)).translate(SUPERSCRIPT)
    return power if mantissa == "1" else f"{mantissa}×{power}"


def _log_ticks(axis, fmt=lambda v: f"{v:g}"):
    """Label a log axis in plain numbers (20, 50, 100 rather than 2×10^1); the 2s and 5s between
    decades too when the axis spans little more than one decade, where they are the only labels."""
    def minor(v, _):
        lo, hi = axis.get_view_interval()
        return fmt(v) if hi < 30 * lo and f"{v:e}"[0] in "25" else ""
    axis.set_major_formatter(ticker.FuncFormatter(lambda v, _: fmt(v)))
    axis.set_minor_formatter(ticker.FuncFormatter(minor))


def _save(fig, folder, name):
    fig.savefig(folder / f"{name}.png", bbox_inches="tight")
    fig.savefig(folder / f"{name}.svg", bbox_inches="tight", metadata={"Date": None})
    plt.close(fig)
    return name


def _note(ax, text):
    """A fit that could not be made says so on the figure itself, not only in the report."""
    if text:
        ax.text(0.01, 0.01, text, transform=ax.transAxes, fontsize=7, color="0.35", va="bottom", wrap=True)


def _fit_curve(ax, fit, x_lo, x_hi, label, colour="black"):
    """The fitted law as a dashed line with its bootstrap band, over [x_lo, x_hi] in log spacing."""
    xs = np.logspace(np.log10(x_lo), np.log10(x_hi), 200)
    lo, hi = fit.band(xs)
    if np.isfinite(lo).any():
        ax.fill_between(xs, lo, hi, color=colour, alpha=0.12, lw=0, label=BAND_LABEL)
    ax.plot(xs, fit.predict(xs), "--", color=colour, lw=1.3, label=label)


def _legend_by_size_and_patch(ax, df, **kwargs):
    """Legend entries for the sizes (colour) and the patches (marker), after what the axes already label."""
    styles = model_styles(df)
    handles, _ = ax.get_legend_handles_labels()
    firsts = df.drop_duplicates("model").set_index("model").loc[model_order(df)]
    for size in firsts["size"].unique():
        colour = styles[firsts.index[firsts["size"] == size][0]][0]
        handles.append(plt.Line2D([], [], color=colour, marker="o", ls="", label=f"size {size}"))
    for patch in sorted(firsts.patch.dropna().unique(), reverse=True):
        marker = styles[firsts.index[firsts.patch == patch][0]][1]
        handles.append(plt.Line2D([], [], color="0.4", marker=marker, ls="", label=f"patch {_int(patch)}"))
    ax.legend(handles=handles, **kwargs)


def _trial_curves(rows, model):
    """(label, rows sorted by step) per trial of a model: a model swept over, say, lr has one curve per trial,
    labelled once (one curve through all of them would zigzag between the trials)."""
    trials = rows[rows.model == model].groupby("trial_id", sort=False)
    return [(model if i == 0 else None, r.sort_values("step")) for i, (_, r) in enumerate(trials)]


def _curves_with_frontier(ax, rows, x, y, on_frontier):
    """One curve per trial, coloured by model, and the compute-efficient frontier drawn over them."""
    styles = model_styles(rows)
    for model in model_order(rows):
        colour, marker, line = styles[model]
        for label, r in _trial_curves(rows, model):
            ax.plot(r[x], r[y], line, marker=marker, color=colour, ms=4, lw=1.2, label=label)
    f = rows[on_frontier].sort_values(x)
    ax.plot(f[x], f[y], "-", color="black", lw=2, alpha=0.45, zorder=4, label="compute-efficient frontier")


# The figures -------------------------------------------------------------------------------------

@plt.rc_context(STYLE)
def fid_vs_gflops(points, fit, corr, folder, fid_label="FID", note=None):
    """Figure 1 (the paper's Figure 8): final FID of each model against its forward Gflops."""
    fig, ax = plt.subplots(figsize=(7.2, 4.8))
    styles = model_styles(points)
    for _, p in points.iterrows():
        colour, marker, _ = styles[p.model]
        ax.scatter(p.gflops, p.fid, color=colour, marker=marker, s=45, zorder=3, edgecolor="black", lw=0.4)
        ax.annotate(p.model.removeprefix("DiT-"), (p.gflops, p.fid), textcoords="offset points", xytext=(5, 3),
                    fontsize=7)
    if fit is not None:
        a, b = fit.params
        _fit_curve(ax, fit, points.gflops.min(), points.gflops.max(), f"fit: FID = {_coef(a)}·Gflops^{_coef(b)}")
    if corr is not None:
        ax.text(0.98, 0.97, f"Pearson r = {corr['pearson_r']:.3f} (p = {corr['pearson_p']:.2g})\n"
                f"Spearman ρ = {corr['spearman_rho']:.3f} (p = {corr['spearman_p']:.2g})\nwith log10 Gflops, "
                f"n = {corr['n']}", transform=ax.transAxes, ha="right", va="top", fontsize=8,
                bbox=dict(boxstyle="round", fc="white", ec="0.7"))
    ax.set_xscale("log")
    _log_ticks(ax.xaxis)
    ax.set_xlabel("forward Gflops per image (log scale)")
    ax.set_ylabel(fid_label)
    steps = sorted(points.step.unique())
    at = f"step {steps[0]:,}" if len(steps) == 1 else "each model's last evaluated step"
    ax.set_title(f"FID against model Gflops at {at}")
    _legend_by_size_and_patch(ax, points, loc="center left", bbox_to_anchor=(1.01, 0.5))
    _note(ax, note)
    return _save(fig, folder, "fig1_fid_vs_gflops")


@plt.rc_context(STYLE)
def fid_vs_compute(rows, on_frontier, fit, folder, fid_label="FID", note=None):
    """Figure 2 (the paper's Figure 9): FID against training compute, one curve per model."""
    fig, ax = plt.subplots(figsize=(7.2, 4.8))
    _curves_with_frontier(ax, rows, "train_compute", "fid", on_frontier)
    if fit is not None:
        a, b = fit.params
        _fit_curve(ax, fit, rows.train_compute.min(), rows.train_compute.max(),
                   f"frontier fit: FID = {_coef(a)}·C^{_coef(b)}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    _log_ticks(ax.xaxis, _power)
    _log_ticks(ax.yaxis)
    ax.set_xlabel(COMPUTE_LABEL)
    ax.set_ylabel(f"{fid_label} (log scale)")
    ax.set_title("FID against training compute")
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5))
    _note(ax, note)
    return _save(fig, folder, "fig2_fid_vs_compute")


@plt.rc_context(STYLE)
def loss_vs_compute(rows, loss, on_frontier, fit, folder, note=None):
    """Figure 3: loss against training compute, its frontier, and L(C) = E + A·C^(−α) with its band."""
    fig, ax = plt.subplots(figsize=(7.2, 4.8))
    _curves_with_frontier(ax, rows, "train_compute", loss, on_frontier)
    if fit is not None:
        e, a, alpha = fit.params
        _fit_curve(ax, fit, rows.train_compute.min(), rows.train_compute.max(),
                   f"frontier fit: L = {_coef(e)} + {_coef(a)}·C^−{_coef(alpha)}")
    ax.set_xscale("log")
    _log_ticks(ax.xaxis, _power)
    ax.set_xlabel(COMPUTE_LABEL)
    ax.set_ylabel(f"{loss_label(loss)} (diffusion objective)")
    ax.set_title(f"{loss_label(loss).capitalize()} against training compute")
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5))
    _note(ax, note)
    return _save(fig, folder, "fig3_loss_vs_compute")


@plt.rc_context(STYLE)
def metric_vs_steps(rows, metric, label, folder, name):
    """Figure 4: a metric against training steps, panels by patch (curves: sizes) and by size (curves: patches)."""
    styles = model_styles(rows)
    patches = sorted(rows.patch.dropna().unique(), reverse=True)
    sizes = size_order(rows)
    cols = max(len(patches), len(sizes), 1)
    fig, axes = plt.subplots(2, cols, figsize=(3.2 * cols, 6.2), squeeze=False, sharey=True)
    for i, patch in enumerate(patches):
        _steps_panel(axes[0, i], rows[rows.patch == patch], metric, styles, f"patch {_int(patch)}: by size")
    for i, size in enumerate(sizes):
        _steps_panel(axes[1, i], rows[rows["size"] == size], metric, styles, f"size {size}: by patch")
    for ax in axes.ravel():
        if not ax.has_data():
            ax.set_axis_off()
    for row in axes:
        row[0].set_ylabel(label.split(" (")[0])  # the full label is in the title; panels are narrow
    fig.suptitle(f"{label} against training steps")
    fig.tight_layout()
    return _save(fig, folder, name)


def _steps_panel(ax, rows, metric, styles, title):
    for model in model_order(rows):
        colour, marker, line = styles[model]
        for label, r in _trial_curves(rows, model):
            ax.plot(r.step, r[metric], line, marker=marker, color=colour, ms=4,
                    label=label and label.removeprefix("DiT-"))
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("training steps")
    ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: _count(v)))
    ax.legend()


@plt.rc_context(STYLE)
def isoflop_profiles(iso, loss, folder):
    """Figure 5: IsoFLOP profiles (loss against parameters per budget) and N*(C), D*(C) with their bands."""
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.4))
    colours = plt.get_cmap("viridis")(np.linspace(0, 0.9, len(iso.profiles)))
    ax = axes[0]
    for p, colour in zip(iso.profiles, colours):
        ax.scatter(p.params, p.loss, color=colour, s=22, zorder=3, label=f"C = {p.budget:.3g}")
        if np.isfinite(p.parabola).all():
            xs = np.linspace(np.log10(p.params.min()), np.log10(p.params.max()), 100)
            ax.plot(10 ** xs, np.polyval(p.parabola, xs), color=colour, lw=1.2)
        if np.isfinite(p.n_opt):
            ax.axvline(p.n_opt, color=colour, ls=":", lw=0.8)
    losses = np.concatenate([p.loss for p in iso.profiles])
    pad = 0.08 * np.ptp(losses) or 0.01 * losses.max()
    ax.set_ylim(losses.min() - pad, losses.max() + pad)  # a parabola's far end must not squash the points
    ax.set_xscale("log")
    _log_ticks(ax.xaxis, _count)
    ax.set_xlabel("parameters (log scale)")
    ax.set_ylabel(loss_label(loss))
    ax.set_title("IsoFLOP profiles: best patch of each size (dotted: optimum)", fontsize=10)
    ax.legend(title="budget (Gflops)")
    budgets = np.array([p.budget for p in iso.profiles])
    for ax, fit, attr, symbol, what in ((axes[1], iso.n_opt, "n_opt", "N*", "parameters"),
                                        (axes[2], iso.steps_opt, "steps_opt", "D*", "training steps")):
        opt = np.array([getattr(p, attr) for p in iso.profiles])
        ok = np.isfinite(opt)
        ax.set_title(f"{symbol}(C): compute-optimal {what}")
        if not ok.any():
            ax.text(0.5, 0.5, "no budget has a loss minimum\ninside the sizes measured",
                    transform=ax.transAxes, ha="center", va="center", color="0.35")
            ax.set_xticks([])
            ax.set_yticks([])
            continue
        ax.scatter(budgets[ok], opt[ok], color=colours[ok], s=30, zorder=3, edgecolor="black", lw=0.4,
                   label="parabola minimum")
        if fit is not None:
            a, b = fit.params
            _fit_curve(ax, fit, budgets.min(), budgets.max(), f"fit: {_coef(a)}·C^{_coef(b)}")
        else:
            _note(ax, f"{ok.sum()} budget(s) with an interior minimum: too few for a fit")
        ax.set_xscale("log")
        ax.set_yscale("log")
        _log_ticks(ax.xaxis, _power)
        _log_ticks(ax.yaxis, _count)
        ax.set_xlabel("training compute budget C (Gflops)")
        ax.set_ylabel(f"compute-optimal {what} {symbol} (log scale)")
        ax.legend()
    fig.tight_layout()
    return _save(fig, folder, "fig5_isoflop")
