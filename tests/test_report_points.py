"""Which rows the report's figures and fits take: each model's last evaluated step, and ok trials only."""
import numpy as np
import pytest
from scipy import stats

from scaling.report import analyze, final_points
from scaling.results import RESULTS_SCHEMA, to_table

# name, size, patch, params, Gflops (Table 4's /4 models)
MODELS = [("DiT-S/4", "S", 4, 32_980_000, 1.41), ("DiT-B/4", "B", 4, 130_000_000, 5.56),
          ("DiT-L/4", "L", 4, 458_000_000, 19.70), ("DiT-XL/4", "XL", 4, 675_000_000, 29.05)]
STEPS = (100, 200, 400)
BATCH = 32


def final_fid(gflops):
    """FID at a trial's last step: exactly 100 · G^-0.5, so the log-log slope is -0.5 and the prefactor 100."""
    return 100.0 * gflops ** -0.5


def early_fid(gflops, step):
    """FID at earlier steps: rising with Gflops, the opposite trend of the final one."""
    return 50.0 * gflops ** 0.3 * step / 100


def loss_law(params, step):
    return 0.1 + 20.0 / params ** 0.3 + 5.0 / (BATCH * step) ** 0.3


def row(name, size, patch, params, gflops, step, trial_id, fid, loss=None, max_step=STEPS[-1], status="ok"):
    return dict(study="points", trial_id=trial_id, model=name, size=size, patch=patch, params=params, gflops=gflops,
                batch_size=BATCH, step=step, max_step=max_step, train_compute=gflops * BATCH * step * 3,
                val_loss=loss, train_loss=loss, fid=fid, fid_samples=1000, feature_extractor="digits", status=status)


def table(rows):
    return to_table(rows, RESULTS_SCHEMA).to_pandas()  # the columns and types a loaded results file has


def study_rows(with_loss=False):
    rows = []
    for name, size, patch, params, g in MODELS:
        for step in STEPS:
            fid = final_fid(g) if step == STEPS[-1] else early_fid(g, step)
            rows.append(row(name, size, patch, params, g, step, f"t-{name}", fid,
                            loss_law(params, step) if with_loss else None))
    return rows


def test_final_points_take_each_models_last_evaluated_step():
    rows = study_rows()
    b, l_ = MODELS[1], MODELS[2]
    # A second, shorter trial of DiT-B/4 (another lr, say): its last step is 200, its FID there worse than the
    # long trial's final one, though better than anything the long trial had at 100 or 200. The best wins.
    rows += [row(*b, 100, "t-B-short", 1.5 * early_fid(b[4], 100), max_step=200),
             row(*b, 200, "t-B-short", 1.2 * final_fid(b[4]), max_step=200)]
    # DiT-L/4's trial went on to step 500 and has a loss there but no FID: its last *evaluated* step is 400.
    rows.append(row(*l_, 500, f"t-{l_[0]}", None, loss=0.5))
    for r in rows:
        if r["trial_id"] == f"t-{l_[0]}":
            r["max_step"] = 500
    df = table(rows)

    points = final_points(df)
    assert points.model.tolist() == [m[0] for m in MODELS]  # one per model, by Gflops
    assert points.trial_id.tolist() == [f"t-{m[0]}" for m in MODELS]
    assert points.step.tolist() == [400] * 4
    np.testing.assert_allclose(points.fid, [final_fid(m[4]) for m in MODELS], rtol=1e-12)

    a = analyze(df, n_boot=0)
    assert a.final_fid.step.tolist() == [400] * 4
    g = np.array([m[4] for m in MODELS])
    fid = final_fid(g)
    # Figure 1's fit: FID = a · G^b through exact points, so b = -0.5, a = 100.
    fit = a.fits["fid_vs_gflops"]
    assert fit.n_points == 4 and fit.n_groups == 4
    np.testing.assert_allclose(fit.params, [100.0, -0.5], rtol=1e-9)
    # The correlation of final FID with log10 Gflops, computed here independently.
    assert a.correlation["n"] == 4
    assert a.correlation["pearson_r"] == pytest.approx(np.corrcoef(np.log10(g), fid)[0, 1], rel=1e-9)
    assert a.correlation["pearson_r"] == pytest.approx(stats.pearsonr(np.log10(g), fid).statistic, rel=1e-9)
    assert a.correlation["spearman_rho"] == -1.0  # final FID falls with every step up in Gflops


def test_a_trial_that_diverged_after_ok_milestones_enters_no_fit():
    rows = study_rows(with_loss=True)
    xl = MODELS[-1]
    # Another DiT-XL/4 trial (a higher lr): ok measurements at 100 and 200, far better than any other, then it
    # diverged at 250. Its measurements say nothing trustworthy: none of them may enter a figure or a fit.
    rows += [row(*xl, 100, "t-diverged", 1.0, loss=0.01),
             row(*xl, 200, "t-diverged", 0.5, loss=0.005),
             row(*xl, 250, "t-diverged", None, status="diverged")]
    rows[-1]["error"] = "training diverged at step 250: loss nan"
    a = analyze(table(rows), n_boot=0)

    assert a.trials.loc["t-diverged", "status"] == "diverged"  # listed, marked
    assert set(a.ok.trial_id) == {f"t-{m[0]}" for m in MODELS} and len(a.ok) == len(MODELS) * len(STEPS)
    assert a.final_fid.trial_id.tolist() == [f"t-{m[0]}" for m in MODELS]
    np.testing.assert_allclose(a.final_fid.fid, [final_fid(m[4]) for m in MODELS], rtol=1e-12)
    np.testing.assert_allclose(a.fits["fid_vs_gflops"].params, [100.0, -0.5], rtol=1e-9)
    # L(N, D) takes every ok row: 4 trials × 3 steps, and recovers the law they were made from.
    chinchilla = a.fits["loss_vs_params_and_images"]
    assert chinchilla.n_points == 12 and chinchilla.n_groups == 4
    np.testing.assert_allclose(chinchilla.params, [0.1, 20.0, 0.3, 5.0, 0.3], rtol=1e-4)
    assert any("1 trial(s) did not finish ok (diverged)" in n for n in a.notes)


def test_figure_1_of_models_trained_for_different_steps_says_so():
    # A compute sweep trains each model to its own step count: Figure 1 said "at the final step (the paper's
    # Figure 8)" and fitted and correlated its points as if they were at one step.
    from scaling.report import _final_step_words

    rows = [r for r in study_rows() if not (r["model"] == "DiT-XL/4" and r["step"] == STEPS[-1])]
    for r in rows:
        if r["model"] == "DiT-XL/4":
            r["max_step"] = STEPS[-2]
    a = analyze(table(rows), n_boot=0)
    assert sorted(a.final_fid.step) == [200, 400, 400, 400]
    assert ("Figure 1's models trained for different numbers of steps (200, 400): its fit and correlations compare "
            "them at unequal training, where the paper's Figure 8 compares models at one step (400K); Figure 2 "
            "compares them along their training.") in a.notes
    assert not any(n.startswith("Figure 1 and its fit take each model's last FID") for n in a.notes)
    assert _final_step_words(a.final_fid) == "each model's final step (steps differ: see the notes)"
    one = analyze(table(study_rows()), n_boot=0)
    assert not any("different numbers of steps" in n for n in one.notes)
    assert _final_step_words(one.final_fid) == "step 400"
    # A study still running, every model to train to 400 steps: its points differ for now, not its models' lengths.
    running = analyze(table([r for r in study_rows() if not (r["model"] == "DiT-XL/4" and r["step"] == 400)]), n_boot=0)
    assert not any("different numbers of steps" in n for n in running.notes)
    assert any(n.startswith("1 trial(s) not yet at their last step") for n in running.notes)
