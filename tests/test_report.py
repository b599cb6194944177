"""The report: built from Parquet alone, on the paper's table and on synthetic studies, big and tiny."""
import json
import re
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from scaling.fits import CHINCHILLA, frontier
from scaling.report import analyze, build_report, check_report_destination, default_report_dir, main, trial_summary
from scaling.results import RESULTS_SCHEMA, paper_results, write_table

TRUE_LAW = {"E": 0.15, "A": 30.0, "alpha": 0.35, "B": 20.0, "beta": 0.3}  # L(N, D), D in images
STEPS = (12_500, 25_000, 50_000, 100_000, 200_000, 400_000)
FIGURES = ["fig1_fid_vs_gflops", "fig2_fid_vs_compute", "fig3_loss_vs_compute", "fig4_fid_vs_steps",
           "fig4_loss_vs_steps", "fig5_isoflop"]


# Makes `import torch` (ray, mlflow) fail, as on a machine that has only the analysis dependencies.
BLOCK_IMPORTS = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "ray", "mlflow"):
            raise ImportError(f"{name} is not installed here")
sys.meta_path.insert(0, Block())
"""


def synthetic_rows(seed=0, noise=0.003, fid_from=50_000):
    """The paper's 12 models at STEPS, loss from TRUE_LAW, FID only from fid_from on; plus a diverged
    and a failed trial."""
    rng = np.random.default_rng(seed)
    rows = []
    for m in paper_results().itertuples():
        for step in STEPS:
            images, compute = m.batch_size * step, m.gflops * m.batch_size * step * 3
            e, a, alpha, b, beta = TRUE_LAW.values()
            loss = (e + a / m.params ** alpha + b / images ** beta) * np.exp(rng.normal(0, noise))
            fid = (5 + 3000 * compute ** -0.2) * np.exp(rng.normal(0, 0.02)) if step >= fid_from else None
            rows.append(dict(study="synthetic", trial_id=f"t-{m.model}", model=m.model, size=m.size, patch=m.patch,
                             params=m.params, gflops=m.gflops, batch_size=m.batch_size, step=step,
                             max_step=STEPS[-1], train_compute=compute, val_loss=loss, train_loss=1.02 * loss,
                             fid=fid, fid_samples=10_000, feature_extractor="inception-v3-compat", status="ok"))
    xl2 = rows[-1]
    for trial, status, step, error in (("t-diverged", "diverged", 25_000, "loss became nan at step 24,810"),
                                       ("t-failed", "failed", 0, "worker died: out of memory")):
        rows.append({**xl2, "trial_id": trial, "status": status, "step": step, "error": error, "fid": None,
                     "val_loss": None, "train_loss": None, "train_compute": xl2["gflops"] * 256 * step * 3})
    return rows


def best_of_size_at_last_step(rows, size="XL"):
    """The row L(N, D)'s extrapolation predicts: the best of a size's patches at the last step (the law is the best
    configuration's at each N and D)."""
    rows = pd.DataFrame(rows)
    last = rows[(rows["size"] == size) & (rows.step == STEPS[-1]) & (rows.status == "ok")]
    return last.loc[last.val_loss.idxmin()]


def references(index_html):
    """Every src and href of a page."""
    class Refs(HTMLParser):
        found = []

        def handle_starttag(self, tag, attrs):
            self.found += [v for k, v in attrs if k in ("src", "href")]

    parser = Refs()
    parser.found = []
    parser.feed(index_html.read_text())
    return parser.found


def assert_self_contained(folder):
    """The page embeds its figures and links only to files inside the report folder."""
    refs = references(folder / "index.html")
    assert refs, "the page shows nothing"
    for ref in refs:
        if ref.startswith("data:image/"):
            continue
        assert "/" not in ref and (folder / ref).is_file(), ref


def test_paper_report(tmp_path):
    out = tmp_path / "paper"
    assert main(["--paper", "--out", str(out), "--n-boot", "100"]) == 0
    assert_self_contained(out)
    for stem in FIGURES[:2]:
        assert (out / f"{stem}.png").stat().st_size > 10_000 and (out / f"{stem}.svg").is_file()
    fits = json.loads((out / "fits.json").read_text())
    assert fits["study"] == "dit_paper_table4" and fits["trials"] == {"ok": 12}
    assert fits["correlation_fid_log10_gflops"]["pearson_r"] == pytest.approx(-0.93, abs=0.005)
    paper = paper_results()
    slope = np.polyfit(np.log10(paper.gflops), np.log10(paper.fid), 1)[0]
    b = fits["fits"]["fid_vs_gflops"]["coefficients"]["b"]
    assert b["value"] == pytest.approx(slope, rel=1e-9) and b["ci_low"] < slope < b["ci_high"]
    assert fits["extrapolation"][0]["model"] == "DiT-XL/2"
    assert fits["extrapolation"][0]["observed"] == 19.47
    assert "No loss in these results: Figures 3 and 5 and the loss fits are left out." in fits["notes"]
    md = (out / "report.md").read_text()
    assert "![" in md and "fig1_fid_vs_gflops.png" in md and "-0.9298" in md


def test_synthetic_study_from_parquet_alone(tmp_path):
    """`python -m scaling.report FOLDER` with torch, Ray and MLflow unimportable, into reports/<study>."""
    write_table(synthetic_rows(), tmp_path / "study" / "results.parquet", RESULTS_SCHEMA)
    code = BLOCK_IMPORTS + ("import runpy; sys.argv = ['scaling.report', 'study', '--n-boot', '50']; "
                            "runpy.run_module('scaling.report', run_name='__main__')")
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    out = tmp_path / "reports" / "synthetic"
    assert done.stdout.strip() == str(Path("reports/synthetic/index.html"))
    assert_self_contained(out)
    for stem in FIGURES:
        assert (out / f"{stem}.png").is_file() and (out / f"{stem}.svg").is_file(), stem
    fits = json.loads((out / "fits.json").read_text())
    assert fits["trials"] == {"ok": 12, "diverged": 1, "failed": 1}
    chinchilla = fits["fits"]["loss_vs_params_and_images"]
    # The best of each size's three patches at each step (diverged and failed left out): 4 sizes × 6 steps.
    assert chinchilla["n_points"] == 4 * len(STEPS) and 4 <= chinchilla["n_trials"] <= 12
    for name, value in TRUE_LAW.items():
        c = chinchilla["coefficients"][name]
        assert c["ci_low"] <= value <= c["ci_high"], name
    assert chinchilla["unsettled"] == [] and not any(n.startswith("L(N, D)") for n in fits["notes"])
    fid_fit = fits["fits"]["fid_vs_compute"]
    assert fid_fit["coefficients"]["b"]["value"] == pytest.approx(-0.2, abs=0.04)
    held_out = fits["extrapolation"]
    # XL/2 but where it ends off the frontier: the synthetic loss has no term of the patch (XL/4 spends less on it);
    # L(N, D), the best configuration's law, predicts the best of XL's patches there.
    assert [(e["law"], e["model"]) for e in held_out] == [
        ("y = E + A·x^(−α)", "DiT-XL/4"), (CHINCHILLA.formula, best_of_size_at_last_step(synthetic_rows()).model),
        ("y = a·x^b", "DiT-XL/2")]
    for e in held_out:  # the frontier fits rest on the trials of the frontier only
        frontier_fit = e["law"] != CHINCHILLA.formula
        assert e["n_trials"] < 11 if frontier_fit else e["n_points"] == 3 * len(STEPS), e["law"]  # L(N, D): XL out
    loss_check = held_out[0]
    assert abs(loss_check["relative_error"]) < 0.1
    page = (out / "index.html").read_text()
    assert '<tr class="diverged">' in page and '<tr class="failed">' in page
    assert "worker died: out of memory" in page


def test_a_law_at_the_limits_of_its_fit_is_flagged():
    # The same study with its loss floor taken away: L(N, D) and L(C) put E at (or let it reach) its floor,
    # and the report says the points do not pin those laws down (the default digits study's L(N, D) does this).
    df = pd.DataFrame(synthetic_rows())
    df["val_loss"] -= 0.999 * TRUE_LAW["E"]
    notes = analyze(df, n_boot=50).notes
    flagged = [n for n in notes if "These points do not pin the law down" in n]
    assert any(n.startswith("L(N, D), Chinchilla's approach 3: E") and "floor" in n for n in flagged), notes


def test_trials_of_one_model_are_drawn_as_curves_of_their_own():
    # An lr sweep gives a model several trials: one curve through all their points zigzagged between them.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from scaling import figures

    rows = pd.DataFrame([r for r in synthetic_rows() if r["status"] == "ok" and r["model"] == "DiT-S/2"])
    swept = pd.concat([rows, rows.assign(trial_id="t-S2-lr2", val_loss=rows.val_loss * 1.1)], ignore_index=True)
    fig, ax = plt.subplots()
    figures._curves_with_frontier(ax, swept, "train_compute", "val_loss", np.zeros(len(swept), bool))
    curves = ax.lines[:-1]  # the last is the frontier
    assert len(curves) == 2 and [c.get_label() for c in curves][0] == "DiT-S/2"
    assert all(np.all(np.diff(c.get_xdata()) > 0) for c in curves)
    plt.close(fig)


def test_a_failure_after_the_last_milestone_leaves_the_trial_ok():
    # Drivers before the recorder's fix wrote a failed row past max_step when a finished trial then failed
    # (in teardown, say): its measurements stand, and it stays in the fits.
    rows = pd.DataFrame([r for r in synthetic_rows() if r["status"] == "ok"])
    xl2 = rows[rows.model == "DiT-XL/2"].iloc[-1]
    late = {**xl2.to_dict(), "step": xl2.max_step + 1, "status": "failed", "error": "teardown", "fid": None}
    early = {**late, "trial_id": "t-early", "step": 30_000}  # a trial that failed before its last milestone
    df = pd.concat([rows, pd.DataFrame([late, early])], ignore_index=True)
    summary = trial_summary(df)
    assert summary.loc["t-DiT-XL/2", "status"] == "ok" and summary.loc["t-DiT-XL/2", "step"] == xl2.max_step
    assert summary.loc["t-early", "status"] == "failed"
    assert (analyze(df, n_boot=10).ok.status == "ok").all()  # the late row is in no fit


@pytest.mark.parametrize("case", ["one row", "two trials", "three trials", "no FID", "all failed", "single step",
                                  "unfinished"])
def test_tiny_studies_give_notes_not_crashes(tmp_path, case):
    rows = pd.DataFrame(synthetic_rows())
    rows = rows[rows.status == "ok"]
    if case == "one row":
        rows = rows.iloc[[5]]
    elif case == "two trials":
        rows = rows[rows.model.isin(["DiT-S/2", "DiT-B/2"])]
    elif case == "three trials":
        rows = rows[rows.model.isin(["DiT-S/2", "DiT-B/2", "DiT-L/2"])]
    elif case == "no FID":
        rows = rows.assign(fid=np.nan)
    elif case == "all failed":
        rows = rows.assign(status="failed", error="boom")
    elif case == "single step":
        rows = rows[rows.step == 100_000].assign(val_loss=np.nan)  # FID and training loss only
    elif case == "unfinished":  # a study stopped while its two largest models trained
        rows = rows[~(rows.model.isin(["DiT-XL/2", "DiT-L/2"]) & (rows.step > 100_000))]
    write_table(rows, tmp_path / "results.parquet", RESULTS_SCHEMA)
    out = build_report(tmp_path / "results.parquet", tmp_path / "report", n_boot=20)
    assert out == tmp_path / "report"
    assert_self_contained(out)
    fits = json.loads((out / "fits.json").read_text())
    assert fits["notes"], "a report that fits less than everything says why"
    if case in ("one row", "all failed"):
        assert fits["fits"] == {} and fits["correlation_fid_log10_gflops"] is None
    if case == "two trials":  # two sizes: no correlation, L(N, D) or IsoFLOP; the frontier laws still fit
        assert fits["correlation_fid_log10_gflops"] is None
        assert set(fits["fits"]) == {"fid_vs_compute", "loss_vs_compute"}
        assert any("3 distinct model sizes N, got 2" in n for n in fits["notes"])
    if case == "three trials":  # a fit with no interval (three trials): a dash in every table, never "nan"
        assert fits["correlation_fid_log10_gflops"]["n"] == 3
        assert "nan" not in (out / "report.md").read_text() and "nan" not in (out / "index.html").read_text()
    if case == "no FID":
        assert fits["correlation_fid_log10_gflops"] is None and "fid_vs_gflops" not in fits["fits"]
        assert (out / "fig3_loss_vs_compute.png").is_file() and not (out / "fig1_fid_vs_gflops.png").exists()
    if case == "all failed":  # the failed rows hold losses: "No loss in these results" was not so
        assert fits["trials"] == {"failed": 12}
        assert "No loss in the trials that finished ok: Figures 3 and 5 and the loss fits are left out." in fits["notes"]
    unfinished = [n.split(" trial(s)")[0] for n in fits["notes"] if "not yet at their last step" in n]
    assert unfinished == {"unfinished": ["2"], "single step": ["12"]}.get(case, [])
    if case == "single step":
        assert fits["loss_column"] == "train_loss"
        assert fits["correlation_fid_log10_gflops"]["n"] == 12


def test_bad_input_exits_2_naming_the_file(tmp_path, capsys):
    assert main([str(tmp_path / "missing.parquet")]) == 2
    err = capsys.readouterr().err.strip()
    assert "missing.parquet" in err and "\n" not in err
    broken = tmp_path / "results.parquet"
    broken.write_bytes(b"PAR1 not really")
    assert main([str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert str(broken) in err and "not a readable Parquet file" in err and "\n" not in err
    write_table([], broken, RESULTS_SCHEMA)
    assert main([str(broken)]) == 2
    assert capsys.readouterr().err.strip() == f"error: {broken}: no rows"
    assert not (tmp_path / "reports").exists()


def test_rebuild_replaces_the_whole_report(tmp_path):
    out = tmp_path / "report"
    write_table(pd.DataFrame(synthetic_rows()).iloc[[5]], tmp_path / "results.parquet", RESULTS_SCHEMA)
    build_report(tmp_path / "results.parquet", out, n_boot=10)
    assert (out / "fig3_loss_vs_compute.png").exists()
    build_report(paper_results(), out, n_boot=10)  # the paper has no loss: no Figure 3
    assert not (out / "fig3_loss_vs_compute.png").exists()  # nothing stale survives
    assert json.loads((out / "fits.json").read_text())["study"] == "dit_paper_table4"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report", "results.parquet"]  # no temporary folders


# Where the report goes: only a new folder, an empty one, or an earlier report is replaced ------------

def snapshot(folder):
    """Every path under folder with its bytes (None for a folder): what a refused command must leave as it was."""
    return {str(p.relative_to(folder)): None if p.is_dir() else p.read_bytes() for p in sorted(folder.rglob("*"))}


def study_output(folder):
    """A study's output folder as scaling.run leaves it: results, loss curves, the MLflow store, checkpoints."""
    write_table(pd.DataFrame(synthetic_rows()).iloc[:6], folder / "results.parquet", RESULTS_SCHEMA)
    (folder / "loss_curves.parquet").write_bytes(b"curves")
    (folder / "mlflow.db").write_bytes(b"runs")
    (folder / "study.yaml").write_text("name: synthetic\n")
    (folder / "ray").mkdir()
    (folder / "ray" / "checkpoint").write_bytes(b"weights")
    return folder


@pytest.mark.parametrize("case", ["the study's output", "a file", "a report and a stranger", "the current folder",
                                  "an unwritable parent", "a file as parent"])
def test_a_destination_that_is_not_a_report_is_refused_and_left_as_it_was(tmp_path, monkeypatch, capsys, case):
    out = study_output(tmp_path / "out")
    results = out / "results.parquet"
    dest = {"the study's output": out, "a file": tmp_path / "notes.txt", "a report and a stranger": tmp_path / "r",
            "the current folder": ".", "an unwritable parent": "/proc/badreport",
            "a file as parent": tmp_path / "notes.txt" / "report"}[case]
    (tmp_path / "notes.txt").write_text("mine")
    if case == "a report and a stranger":
        build_report(results, dest, n_boot=0)
        (dest / "draft.docx").write_bytes(b"mine too")
    monkeypatch.chdir(out)
    before = snapshot(tmp_path)
    assert main([str(results), "--out", str(dest), "--n-boot", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --out {dest}: ") and err.count("\n") == 1, err
    reason = {"the study's output": "holds files that are not a report's (loss_curves.parquet, mlflow.db, ray, "
                                    "results.parquet, study.yaml)",
              "a file": "is a file, not a folder",
              "a report and a stranger": "holds files that are not a report's (draft.docx)",
              "the current folder": "holds files that are not a report's (loss_curves.parquet, mlflow.db, ray, "
                                    "results.parquet, study.yaml)",
              "an unwritable parent": "cannot create a folder in /proc",
              "a file as parent": f"{tmp_path / 'notes.txt'} is a file, not a folder"}[case]
    assert reason in err
    assert snapshot(tmp_path) == before  # nothing deleted, renamed, or left behind
    assert not Path("/proc/badreport").exists()


def test_check_report_destination_allows_a_new_or_empty_folder_or_an_earlier_report(tmp_path):
    new = tmp_path / "reports" / "deep" / "study"
    check_report_destination(new)  # its parents are created when the report is written
    assert not (tmp_path / "reports").exists() and list(tmp_path.iterdir()) == []  # the check writes nothing
    (tmp_path / "empty").mkdir()
    check_report_destination(tmp_path / "empty")
    report = build_report(paper_results(), tmp_path / "report", n_boot=0)
    check_report_destination(report)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "report"]
    (report / "fits.json").write_text("[]")  # index.html and fits.json by name, but not a report's fits.json
    with pytest.raises(ValueError, match=r"report: its fits.json is not a report's"):
        check_report_destination(report)
    with pytest.raises(ValueError, match=r"^/: not a folder a report can replace"):
        check_report_destination("/")


def test_build_report_refuses_a_destination_before_any_work(tmp_path, monkeypatch):
    # scaling.run --report-dir calls build_report: a study's own output given as the report folder is refused,
    # before the fits (minutes) rather than after them, and the default folder reports/<study> is checked too.
    out = study_output(tmp_path / "out")
    before = snapshot(tmp_path)
    monkeypatch.setattr("scaling.report.analyze", lambda *a, **k: pytest.fail("analysed a refused report"))
    with pytest.raises(ValueError, match=f"^{out}: holds files that are not a report's"):
        build_report(out / "results.parquet", out)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "reports" / "synthetic").mkdir(parents=True)
    (tmp_path / "reports" / "synthetic" / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match=r"^reports/synthetic: holds files that are not a report's \(keep.txt\)"):
        build_report(out / "results.parquet")
    assert default_report_dir("synthetic") == Path("reports/synthetic")
    assert default_report_dir("a b/c") == Path("reports/a_b_c")
    assert {k: v for k, v in snapshot(tmp_path).items() if not k.startswith("reports")} == before


def test_a_report_through_a_link_replaces_the_folder_the_link_names(tmp_path):
    target = build_report(paper_results(), tmp_path / "target", n_boot=0)
    (tmp_path / "link").symlink_to(target)
    build_report(paper_results(), tmp_path / "link", n_boot=0)
    assert (tmp_path / "link").is_symlink() and (target / "index.html").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "target"]


# --n-boot ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("value", ["-5", "1", "many", "100001"])  # 1e12 hung; 1e9 ran out of memory
def test_n_boot_must_be_0_or_from_2_to_100000(tmp_path, capsys, value):
    with pytest.raises(SystemExit) as exit:
        main(["--paper", "--out", str(tmp_path / "r"), "--n-boot", value])
    assert exit.value.code == 2
    err = capsys.readouterr().err
    assert f"argument --n-boot: {value}: give 0 (no intervals) or a count from 2 to 100,000" in err, err
    assert list(tmp_path.iterdir()) == []


def test_an_empty_out_is_not_the_default_folder(tmp_path, capsys, monkeypatch):
    # An unset variable's --out "" wrote reports/<study> under the current folder.
    monkeypatch.chdir(tmp_path)
    assert main(["--paper", "--out", "", "--n-boot", "0"]) == 2
    assert capsys.readouterr().err == "error: --out is empty; give a folder, or leave the flag out for reports/<study>\n"
    assert list(tmp_path.iterdir()) == []


def test_a_report_without_resamples_says_it_has_no_intervals(tmp_path):
    out = tmp_path / "r"
    assert main(["--paper", "--out", str(out), "--n-boot", "0"]) == 0
    md, page = (out / "report.md").read_text(), (out / "index.html").read_text()
    page = re.sub(r"data:image/svg\+xml;base64,[^\"]*", "", page)  # the figures' base64 may spell anything
    for text in (md, page):
        shown = text.replace("\\[", "[").replace("\\]", "]")  # report.md's as it renders
        assert "0/0" not in text and "nan" not in text and "95%" not in text and "[–, –]" not in shown
        assert "No bootstrap resamples (--n-boot 0): the fits are point estimates without intervals" in text
    assert "| log-log slope |" in md and "| fit | law | coefficient | value | points | trials |" in md
    assert "| quantity | law | held-out model | at | predicted | observed | error |" in md
    fits = json.loads((out / "fits.json").read_text())
    assert fits["fits"]["fid_vs_gflops"]["n_boot"] == 0
    assert fits["fits"]["fid_vs_gflops"]["coefficients"]["b"]["ci_low"] is None


# Rows the report cannot place ------------------------------------------------------------------------

@pytest.mark.parametrize("column, value, message", [
    ("model", None, "column 'model' is empty (null) in 1 of 74 rows (row 3, trial t-DiT-S/8, step 100000); "
                    "every row needs its model name"),
    ("trial_id", None, "column 'trial_id' is empty (null) in 1 of 74 rows (row 3, step 100000); every row needs "
                       "its trial id"),
    ("step", None, "column 'step' is empty (null) in 1 of 74 rows (row 3, trial t-DiT-S/8); every row needs its step"),
    ("status", None, "column 'status' is empty (null) in 1 of 74 rows (row 3, trial t-DiT-S/8, step 100000); every "
                     "row needs its status (ok, diverged or failed)"),  # was counted ok
    ("params", -5, "column 'params' must be finite and > 0 where given, but holds -5 in 1 of 74 rows (row 3, "
                   "trial t-DiT-S/8, step 100000)"),
    ("gflops", np.inf, "column 'gflops' must be finite and > 0 where given, but holds inf in 1 of 74 rows"),
    ("step", -1, "column 'step' must be finite and >= 0 where given, but holds -1 in 1 of 74 rows"),
])
def test_rows_the_report_cannot_place_exit_2_naming_the_file_and_column(tmp_path, capsys, monkeypatch, column, value,
                                                                         message):
    rows = pd.DataFrame(synthetic_rows()).astype({column: object})
    rows.loc[3, column] = value
    write_table(rows, tmp_path / "results.parquet", RESULTS_SCHEMA)
    monkeypatch.chdir(tmp_path)
    assert main(["results.parquet", "--n-boot", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: results.parquet: {message}") and err.count("\n") == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.parquet"]  # no report, no reports/ folder


def test_every_row_of_a_model_without_a_name_is_refused_too(tmp_path):
    # All nulls in model made figures.py fail on None.removeprefix once the fits were done.
    rows = pd.DataFrame(synthetic_rows()).assign(model=None)
    with pytest.raises(ValueError, match=r"^results: column 'model' is empty \(null\) in 74 of 74 rows \(the first: "
                                         r"row 0, trial t-DiT-S/8, step 12500\)"):
        build_report(rows, tmp_path / "report", n_boot=0)
    rows = pd.DataFrame(synthetic_rows()).assign(status="finished")  # a DataFrame skips load_results' check
    with pytest.raises(ValueError, match=r"^results: column 'status' has unknown values \['finished'\]"):
        build_report(rows, tmp_path / "report", n_boot=0)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("column, value, message", [
    ("fid", -5, "column 'fid' must be finite and >= 0 where given, but holds -5 in 1 of 74 rows (row 3, "
                "trial t-DiT-S/8, step 100000)"),
    ("fid", np.inf, "column 'fid' must be finite and >= 0 where given, but holds inf in 1 of 74 rows (row 3, "
                    "trial t-DiT-S/8, step 100000)"),
    ("val_loss", -np.inf, "column 'val_loss' must be finite and >= 0 where given, but holds -inf in 1 of 74 rows"),
    ("train_loss", -0.5, "column 'train_loss' must be finite and >= 0 where given, but holds -0.5 in 1 of 74 rows"),
])
def test_an_impossible_measurement_exits_2_naming_the_column_and_trial(tmp_path, capsys, monkeypatch, column, value,
                                                                       message):
    # A negative or infinite FID was shown as ok in the trials table and silently left out of the fits.
    rows = pd.DataFrame(synthetic_rows())
    rows.loc[3, column] = value
    write_table(rows, tmp_path / "results.parquet", RESULTS_SCHEMA)
    monkeypatch.chdir(tmp_path)
    assert main(["results.parquet", "--n-boot", "0", "--out", "report"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: results.parquet: {message}") and err.count("\n") == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.parquet"]  # nothing written


def test_a_diverged_trials_infinite_loss_is_its_last_word_not_bad_input(tmp_path):
    # The loss that ended a diverged trial may be inf; no fit reads a diverged row, yet it refused the whole report.
    rows = pd.DataFrame(synthetic_rows())
    rows.loc[rows.trial_id == "t-diverged", "train_loss"] = np.inf
    out = build_report(rows, tmp_path / "report", n_boot=0)
    assert json.loads((out / "fits.json").read_text())["trials"] == {"ok": 12, "diverged": 1, "failed": 1}


def test_a_measurement_of_zero_is_named_as_left_out_of_the_log_scale_fits():
    # Accepted (not below zero), then dropped from every log fit and figure without a word, and the extrapolation's
    # error divided by it: +inf% in the table, null in fits.json.
    from scaling.report import report_rows

    rows = [{**r, "fid": 0.0} if r["model"] == "DiT-XL/2" and r["step"] == STEPS[-1] else r
            for r in synthetic_rows() if r["status"] == "ok"]
    a = analyze(report_rows(pd.DataFrame(rows)), n_boot=0)
    assert (f"1 row(s) record a fid of 0 (trial t-DiT-XL/2 at step {STEPS[-1]:,}): a log scale has no place for it, "
            "so the figures and fits leave it out.") in a.notes
    fid_check = next(e for e in a.extrapolation if e["quantity"] == "FID")
    assert fid_check["observed"] == 0.0 and fid_check["relative_error"] is None
    assert "| 0 | – |" in markdown_of(a)


def test_a_measurement_of_zero_is_no_frontier_point_of_the_extrapolation_check():
    # Left out of every fit and figure, a 0 still made the compute-efficient frontier the check predicts: DiT-S/8's
    # FID of 0 at its last step dominated every larger compute, and the check "predicted" it from 2 points, or none.
    from scaling.report import report_rows

    rows = [{**r, "fid": 0.0} if r["model"] == "DiT-S/8" and r["step"] == STEPS[-1] else r
            for r in synthetic_rows() if r["status"] == "ok"]
    a = analyze(report_rows(pd.DataFrame(rows)), n_boot=0)
    fid_check = next(e for e in a.extrapolation if e["quantity"] == "FID")
    assert fid_check["model"] == "DiT-XL/2" and fid_check["held_out"] == ["DiT-XL/2"]
    assert fid_check["held_out_from_compute"] is None and fid_check["n_points"] > 5


def test_fids_measured_with_different_settings_are_not_fitted_together():
    # A study file edited between runs keeps its earlier trials: FIDs of 1,000 and of 10,000 samples (or of other
    # features, references, samplers, guidance) were pooled into one law without a word.
    rows = pd.DataFrame(synthetic_rows())
    other = rows.model.str.startswith(("DiT-S/", "DiT-L/"))
    rows.loc[other, "fid_samples"] = 1000
    rows.loc[other, "fid"] *= 3
    a = analyze(rows, n_boot=0)
    assert ("FID was measured with different settings in these trials (fid_samples: 1000, 10000): FIDs of different "
            "settings are not comparable, so the FID correlation, the FID fits and the FID extrapolation are left out; "
            "Figures 1 and 2 show the points as measured.") in a.notes
    assert a.correlation is None and not {"fid_vs_gflops", "fid_vs_compute"} & a.fits.keys()
    assert [e["quantity"] for e in a.extrapolation] == ["validation loss"] * 2
    same = analyze(pd.DataFrame(synthetic_rows()), n_boot=0)
    assert same.correlation and {"fid_vs_gflops", "fid_vs_compute"} <= same.fits.keys()
    assert [e["quantity"] for e in same.extrapolation] == ["validation loss"] * 2 + ["FID"]


def test_ok_trials_without_the_fitted_loss_are_named():
    # Where some trials have a validation loss, those without one dropped out of the loss fits silently.
    rows = pd.DataFrame(synthetic_rows())
    rows.loc[rows.trial_id == "t-DiT-S/8", "val_loss"] = None
    a = analyze(rows, n_boot=0)
    assert ("1 ok trial(s) have no validation loss (t-DiT-S/8): they are left out of the loss figures and fits, which "
            "use the validation loss of the others.") in a.notes
    assert a.fits["loss_vs_params_and_images"].n_groups == 11


def test_the_compute_optimal_laws_say_when_their_resamples_often_failed():
    # N*(C) and D*(C) come out of the IsoFLOP analysis, not out of a fit of their own: their unsettled sentences
    # (most resamples lacking 3 budgets with an optimum) were never noted, and their intervals read as sound.
    a = analyze(pd.DataFrame(synthetic_rows()), n_boot=20)
    for law, fit in (("N*(C)", a.fits["compute_optimal_params"]), ("D*(C)", a.fits["compute_optimal_steps"])):
        dropped = 20 - len(fit.boot)
        assert dropped > 2  # the data: most of these resamples hold too few budgets with an interior optimum
        assert any(n.startswith(f"{law}, IsoFLOP (Figure 5): {dropped} of 20 resamples could not be fitted")
                   for n in a.notes), a.notes


def test_two_different_rows_of_one_trial_and_step_exit_2_naming_them(tmp_path, capsys, monkeypatch):
    # The recorder keeps one row per (trial, step): two that differ come from files put together by hand.
    rows = pd.DataFrame(synthetic_rows())
    again = rows.iloc[[3]].assign(fid=rows.fid[3] + 1)
    write_table(pd.concat([rows, again]), tmp_path / "results.parquet", RESULTS_SCHEMA)
    monkeypatch.chdir(tmp_path)
    assert main(["results.parquet", "--n-boot", "0", "--out", "report"]) == 2
    err = capsys.readouterr().err
    assert err == ("error: results.parquet: trial t-DiT-S/8 has 2 different rows at step 100000 (rows 3 and 74; they "
                   "differ in 'fid'); a study writes one row per trial and step: keep the one that stands\n"), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.parquet"]


def test_exact_copies_of_rows_count_once_with_a_note(tmp_path):
    rows = pd.DataFrame(synthetic_rows())
    write_table(pd.concat([rows, rows]), tmp_path / "results.parquet", RESULTS_SCHEMA)
    out = build_report(tmp_path / "results.parquet", tmp_path / "report", n_boot=0)
    fits = json.loads((out / "fits.json").read_text())
    assert fits["rows"] == 74 and fits["trials"] == {"ok": 12, "diverged": 1, "failed": 1}
    assert "74 row(s) were exact copies of another row (the same trial and step, every column equal): each " \
           "measurement is counted once." in fits["notes"]
    assert fits["fits"]["loss_vs_params_and_images"]["n_points"] == 4 * len(STEPS)  # the best patch of a size and step
    assert "74 rows from 14 trials" in (out / "report.md").read_text()


@pytest.mark.parametrize("argv, message", [
    (["--bogus"], "unrecognized arguments: --bogus"),
    (["--paper", "--bogus"], "unrecognized arguments: --bogus"),
    ([], "one of the arguments results --paper is required"),
])
def test_an_unknown_flag_is_named_as_unknown(tmp_path, capsys, monkeypatch, argv, message):
    # argparse checked the required RESULTS or --paper first: `--bogus` alone was reported as a missing RESULTS.
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit:
        main(argv)
    assert exit.value.code == 2
    err = capsys.readouterr().err
    assert err.endswith(f"error: {message}\n"), err
    assert list(tmp_path.iterdir()) == []


def test_the_extrapolation_of_l_n_d_holds_out_every_patch_of_the_largest_size():
    # Holding out DiT-XL/2 alone left XL/4 and XL/8 in the fit of L(N, D), at its N (within 0.1%) and D: the
    # "extrapolation" was an interpolation (predictions at XL/2, /4, /8 agreed to 1e-5).
    from scaling.report import report_rows

    ok = report_rows(pd.DataFrame([r for r in synthetic_rows() if r["status"] == "ok"]))
    a = analyze(ok, n_boot=20)
    checks = {e["law"]: e for e in a.extrapolation}
    chinchilla = checks[CHINCHILLA.formula]
    assert 3 <= chinchilla["n_trials"] <= 9 and chinchilla["n_points"] == 3 * len(STEPS)  # S, B, L: the best patch
    best = best_of_size_at_last_step(synthetic_rows())  # compared with the best of XL's patches at XL/2's last step
    assert chinchilla["model"] == best.model and sorted(chinchilla["held_out"]) == ["DiT-XL/2", "DiT-XL/4", "DiT-XL/8"]
    assert chinchilla["observed"] == best.val_loss and chinchilla["step"] == STEPS[-1]
    # The law of FID and compute holds out the model only: every point left in has less compute than its target.
    e = checks["y = a·x^b"]
    assert e["held_out"] == ["DiT-XL/2"] and e["x"][0] > ok.train_compute[ok.model != "DiT-XL/2"].max()
    # The loss has no term of the patch here: XL/4 reaches XL/2's loss with less compute, and XL/2 ends off the
    # frontier (the next test).
    assert checks["y = E + A·x^(−α)"]["held_out"] == ["DiT-XL/4"]
    md = markdown_of(a)
    assert "L(N, D) also without the other patch sizes of its model size" in md
    others = ", ".join(m for m in ["DiT-XL/8", "DiT-XL/4", "DiT-XL/2"] if m != best.model)
    assert f"| {best.model} (and {others}) |" in md


def test_l_n_d_is_the_best_patchs_law_where_patches_of_one_size_differ():
    # L(N, D) has no term of the patch: the patches of one size, at one N and D, were pooled and pulled the law
    # toward their mean (A 7.3 against 30, α 0.25 against 0.35), and its extrapolation was off by 7.6%.
    from scaling.report import report_rows

    rows = [{**r, "val_loss": r["val_loss"] * (1 + 0.08 * np.log2(r["patch"] / 2))}  # each doubling of the patch: +8%
            for r in synthetic_rows() if r["status"] == "ok"]
    a = analyze(report_rows(pd.DataFrame(rows)), n_boot=0)
    fit = a.fits["loss_vs_params_and_images"]
    assert fit.n_points == 4 * len(STEPS) and fit.n_groups == 4  # the /2 trials: the best at every N and D
    e, _, alpha, b, beta = fit.params
    assert e == pytest.approx(TRUE_LAW["E"], rel=0.1) and alpha == pytest.approx(TRUE_LAW["alpha"], abs=0.1)
    assert b == pytest.approx(TRUE_LAW["B"], rel=0.1) and beta == pytest.approx(TRUE_LAW["beta"], abs=0.02)
    check = next(e for e in a.extrapolation if e["law"] == CHINCHILLA.formula)
    assert check["model"] == "DiT-XL/2" and abs(check["relative_error"]) < 0.01


def test_a_frontier_law_predicts_the_frontiers_last_point_when_the_largest_model_ends_off_it():
    # DiT-XL/2's last point worse than a smaller compute's: the frontier law, fitted without it, was the full fit (XL/2
    # added nothing to the frontier) compared with a point it does not describe: a sure "error" and "inside: no".
    from scaling.report import report_rows

    # The synthetic loss has no term of the patch (XL/4 reaches XL/2's loss with less compute): patch 2 loses more.
    rows = [{**r, "val_loss": r["val_loss"] * (1.3 if r["patch"] == 2 else 1)}
            for r in synthetic_rows() if r["status"] == "ok"]
    ok = report_rows(pd.DataFrame(rows))
    a = analyze(ok, n_boot=0)
    checks = {e["law"]: e for e in a.extrapolation}
    loss_check, chinchilla = checks["y = E + A·x^(−α)"], checks[CHINCHILLA.formula]
    on = ok[frontier(ok.train_compute.to_numpy(float), ok.val_loss.to_numpy(float))]
    end = on.loc[on.train_compute.idxmax()]
    assert (loss_check["model"], loss_check["step"], loss_check["observed"]) == (end.model, end.step, end.val_loss)
    assert end.model == "DiT-XL/4" and loss_check["x"][0] == end.train_compute and loss_check["held_out"] == [end.model]
    assert loss_check["held_out_from_compute"] == end.train_compute
    assert f"| DiT-XL/4 (and every point from C = {end.train_compute:.3g} Gflops on) |" in markdown_of(a)
    # Fitted on the frontier of what has less compute, XL/4 aside: an extrapolation still.
    kept = ok[(ok.model != end.model) & (ok.train_compute < end.train_compute)]
    assert loss_check["n_points"] == frontier(kept.train_compute.to_numpy(float), kept.val_loss.to_numpy(float)).sum()
    assert abs(loss_check["relative_error"]) < 0.05
    best = best_of_size_at_last_step(rows)  # L(N, D), the law of the best patch at each N and D: XL/4 or XL/8
    assert (chinchilla["model"], chinchilla["step"]) == (best.model, STEPS[-1]) and best.patch != 2
    assert [n for n in a.notes if n.startswith("Extrapolation check of validation loss with y = E + A·x^(−α): "
                                               "DiT-XL/2's last point is off the compute-efficient frontier")]
    assert "Extrapolation check: fitted without the largest-compute model (unless a note says otherwise)" in \
        markdown_of(a)


def test_the_largest_model_without_a_batch_size_is_no_l_n_d_extrapolation_target(tmp_path):
    # Rows "where given" keep a NaN batch size (or parameter count), which L(N, D) cannot fit: its check held out the
    # largest-compute model, found none of its size with that many images, and the report died on a traceback.
    from scaling.report import report_rows

    rows = [{**r, "batch_size": None} if r["model"] == "DiT-XL/2" else r
            for r in synthetic_rows() if r["status"] == "ok"]
    a = analyze(report_rows(pd.DataFrame(rows)), n_boot=0)
    checks = {e["law"]: e for e in a.extrapolation}
    known = [r for r in rows if r["size"] == "L"]  # XL/4 and XL/8 have less compute than L/2
    assert checks[CHINCHILLA.formula]["model"] == best_of_size_at_last_step(known, size="L").model
    assert sorted(checks[CHINCHILLA.formula]["held_out"]) == ["DiT-L/2", "DiT-L/4", "DiT-L/8"]
    assert checks["y = a·x^b"]["model"] == "DiT-XL/2"  # its compute is recorded: the laws of compute still hold it
    assert (build_report(pd.DataFrame(rows), tmp_path / "report", n_boot=0) / "fits.json").exists()


def test_the_extrapolation_holds_out_the_largest_compute_model_that_measured_the_quantity():
    # DiT-XL/2 without FID past 100K steps (FID milestones sparser than the loss's, a study still running): it was
    # held out all the same, its last FID predicted by a fit that held DiT-L/2's FID at 2.7 times the compute.
    from scaling.report import report_rows

    rows = [{**r, "fid": None} if r["model"] == "DiT-XL/2" and r["step"] > 100_000 else r
            for r in synthetic_rows() if r["status"] == "ok"]
    ok = report_rows(pd.DataFrame(rows))
    a = analyze(ok, n_boot=0)
    fid = next(e for e in a.extrapolation if e["quantity"] == "FID")
    measured = ok[ok.fid.notna()]
    assert fid["model"] == "DiT-L/2" and fid["step"] == STEPS[-1] and fid["held_out"] == ["DiT-L/2"]
    assert fid["x"][0] > measured.train_compute[measured.model != "DiT-L/2"].max()  # an extrapolation
    loss = next(e for e in a.extrapolation if e["law"] == CHINCHILLA.formula)  # every loss measured: XL's
    assert sorted(loss["held_out"]) == ["DiT-XL/2", "DiT-XL/4", "DiT-XL/8"]


def test_the_extrapolation_compares_with_the_held_out_models_best_trial_whatever_the_row_order():
    # The last row of the held-out model's last step was taken: its worst trial, or its best, by the file's order.
    from scaling.report import report_rows

    ok = [r for r in synthetic_rows() if r["status"] == "ok"]
    worse = [{**r, "trial_id": "t-worse", "fid": 3 * r["fid"] if r["fid"] else None, "val_loss": 2 * r["val_loss"]}
             for r in ok if r["model"] == "DiT-XL/2"]
    observed = []
    for rows in (worse + ok, ok + worse):
        a = analyze(report_rows(pd.DataFrame(rows)), n_boot=0)
        observed.append({e["law"]: e["observed"] for e in a.extrapolation})
    best = ok[-1]  # DiT-XL/2's row at its last step
    assert observed[0] == observed[1] and observed[0]["y = a·x^b"] == best["fid"]
    assert observed[0][CHINCHILLA.formula] == best_of_size_at_last_step(ok + worse).val_loss  # of XL's best patch


def test_an_earlier_fid_in_figure_1_and_a_compute_off_its_formula_are_noted():
    # Both changed the figures and fits without a word: a model's point from an earlier milestone than the others',
    # under a caption of final FIDs; a training compute edited by hand.
    from scaling.report import report_rows

    last = STEPS[-1]
    rows = [{**r, "fid": None} if r["model"] == "DiT-XL/2" and r["step"] == last else r
            for r in synthetic_rows() if r["status"] == "ok"]
    rows = [{**r, "train_compute": 100 * r["train_compute"]} if r["model"] == "DiT-S/8" else r for r in rows]
    a = analyze(report_rows(pd.DataFrame(rows)), n_boot=0)
    assert (f"Figure 1 and its fit take each model's last FID, which for DiT-XL/2 is at step {STEPS[-2]:,} of "
            f"{last:,}: its later milestones have no FID.") in a.notes
    s8 = next(r for r in rows if r["model"] == "DiT-S/8")
    assert (f"{len(STEPS)} row(s) record a training compute other than forward Gflops × batch × steps × 3 (trial "
            f"t-DiT-S/8 at step {s8['step']:,}: {s8['train_compute']:.4g} against {s8['train_compute'] / 100:.4g}); "
            f"the figures and fits use the recorded values.") in a.notes
    assert not [n for n in analyze(report_rows(pd.DataFrame(synthetic_rows())), n_boot=0).notes
                if n.startswith(("Figure 1 and its fit", f"{len(STEPS)} row(s) record"))]


def test_losses_that_measure_different_things_are_not_fitted_together():
    # An edited study's earlier trials stay in results.parquet: a loss of another diffusion chain (or data set,
    # resolution, encode, or without the variational bound's term) was fitted with the others as one law.
    rows = [{**r, "config_json": json.dumps({"train": {"diffusion_steps": 500 if r["patch"] == 8 else 1000,
                                                       "learn_sigma": True}, "data": {"image_size": 256}})}
            for r in synthetic_rows()]
    a = analyze(pd.DataFrame(rows), n_boot=0)
    assert ("The validation loss measures different things in these trials (train.diffusion_steps: 1000, 500): losses "
            "of other data or another diffusion are not on one scale, so the loss fits, the IsoFLOP analysis and the "
            "loss extrapolation are left out; Figures 3 and 4 show the points as measured.") in a.notes
    assert not {"loss_vs_compute", "loss_vs_params_and_images", "compute_optimal_params"} & a.fits.keys()
    assert a.isoflop is None and [e["quantity"] for e in a.extrapolation] == ["FID"]
    assert {"fid_vs_gflops", "fid_vs_compute"} <= a.fits.keys()
    same = analyze(pd.DataFrame([{**r, "config_json": json.dumps({"train": {"diffusion_steps": 1000}})}
                                 for r in synthetic_rows()]), n_boot=0)
    assert {"loss_vs_compute", "loss_vs_params_and_images"} <= same.fits.keys()
    assert not [n for n in same.notes if "measures different things" in n]
    other_data = analyze(pd.DataFrame([{**r, "dataset": "digits" if r["size"] == "S" else "imagenet"}
                                       for r in synthetic_rows()]), n_boot=0)
    assert any("(dataset: digits, imagenet)" in n for n in other_data.notes)


def test_figure_1_takes_a_models_longest_trial_not_a_shorter_one_that_scored_better():
    # Under a decaying lr each step count is a trial of its own: a 200-step trial's lucky FID stood for the model in
    # Figure 1, under a caption of each model's last evaluated step.
    from scaling.report import report_rows

    ok = [r for r in synthetic_rows() if r["status"] == "ok"]
    short = [{**r, "trial_id": "t-short", "max_step": STEPS[-2], "fid": 0.5 * r["fid"]}
             for r in ok if r["model"] == "DiT-L/4" and r["step"] <= STEPS[-2] and r["fid"]]
    a = analyze(report_rows(pd.DataFrame(ok + short)), n_boot=0)
    point = a.final_fid.set_index("model").loc["DiT-L/4"]
    assert (point.trial_id, point.step) == ("t-DiT-L/4", STEPS[-1])
    assert set(a.final_fid.step) == {STEPS[-1]} and len(a.final_fid) == 12


def test_a_model_name_with_dollar_signs_is_drawn_as_text(tmp_path):
    # matplotlib read "$...$" in a legend as TeX: an odd or unknown one ended the report in a traceback.
    rows = [{**r, "model": r["model"].replace("DiT-S/8", "DiT-S/8 $\\frac$")} for r in synthetic_rows()]
    build_report(pd.DataFrame(rows), tmp_path / "report", n_boot=0)
    assert "DiT-S/8 \\$\\\\frac\\$" in (tmp_path / "report" / "report.md").read_text()  # shown as written


def test_every_axis_labels_its_ticks_in_plain_text(tmp_path, monkeypatch):
    # With parse_math off (the test above), matplotlib's own log-axis labels printed as raw TeX, "$\mathdefault{10^{9}}$",
    # on every compute axis (Figures 2, 3 and 5).
    from scaling import figures

    labels, save = {}, figures._save

    def save_and_read(fig, folder, name):
        fig.canvas.draw()
        labels[name] = {(i, which, minor): [t.get_text() for t in getattr(ax, f"get_{which}ticklabels")(minor=minor)]
                        for i, ax in enumerate(fig.axes) for which in ("x", "y") for minor in (False, True)}
        return save(fig, folder, name)
    monkeypatch.setattr(figures, "_save", save_and_read)
    build_report(pd.DataFrame(synthetic_rows()), tmp_path / "report", n_boot=0)
    assert set(labels) == set(FIGURES)
    texts = [t for axes in labels.values() for ticks in axes.values() for t in ticks if t]
    assert texts and not [t for t in texts if "$" in t or "\\" in t]
    compute = labels["fig2_fid_vs_compute"][(0, "x", False)] + labels["fig3_loss_vs_compute"][(0, "x", False)]
    assert any(re.fullmatch("([1-9]×)?10[⁻]?[⁰¹²³⁴⁵⁶⁷⁸⁹]+", t) for t in compute), compute
    assert figures._power(1e9) == "10⁹" and figures._power(2e-3) == "2×10⁻³" and figures._power(5e10) == "5×10¹⁰"


def test_a_report_stopped_while_it_is_built_leaves_nothing_and_exits_143(tmp_path):
    # SIGTERM ended the process at once: its half-built report stayed beside the destination, never removed.
    import signal
    import time

    write_table(synthetic_rows(), tmp_path / "results.parquet", RESULTS_SCHEMA)
    out = tmp_path / "report"
    proc = subprocess.Popen([sys.executable, "-m", "scaling.report", str(tmp_path / "results.parquet"), "--out",
                             str(out), "--n-boot", "0"], cwd=Path(__file__).resolve().parents[1],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not list(tmp_path.glob(".report.tmp-*")):  # the figures are being drawn into it
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143 and err == "interrupted: no report written; the report folder is as it was\n", err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.parquet"]


def test_an_interrupt_that_a_c_extensions_import_turned_into_an_import_error_is_still_an_interrupt():
    # SIGTERM while matplotlib's renderer initialised (the report's first figure) surfaced as "ImportError:
    # initialization failed", raised from it: a traceback and exit 1 instead of 143.
    from scaling.sigterm import Terminated, interruption

    stop = Terminated()
    try:
        try:
            raise stop
        except Terminated as e:
            raise ImportError("initialization failed") from e
    except ImportError as e:
        assert interruption(e) is stop
    assert interruption(ImportError("no module named x")) is None and interruption(ValueError()) is None


def markdown_of(a):
    """The report's Markdown without its figures."""
    from scaling.report import markdown, tables

    return markdown(a, [], tables(a))


def test_the_extrapolation_title_mentions_l_n_d_only_when_it_was_checked():
    from scaling.report import report_rows

    rows = pd.DataFrame([r for r in synthetic_rows() if r["status"] == "ok"]).assign(val_loss=np.nan,
                                                                                      train_loss=np.nan)
    a = analyze(report_rows(rows), n_boot=0)
    assert a.loss is None and [e["quantity"] for e in a.extrapolation] == ["FID"]
    md = markdown_of(a)
    assert "Extrapolation check: fitted without the largest-compute model" in md and "L(N, D)" not in md


def test_a_report_a_finished_study_cannot_build_is_a_failure_of_the_study(tmp_path, capsys):
    # It printed "error: no report" and the study exited 0: a scheduler took the missing report for a success.
    from scaling.run import report_after_study

    out = study_output(tmp_path / "out")
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "draft.docx").write_bytes(b"mine")  # put there while the study ran
    assert report_after_study(out, tmp_path / "r") is False
    err = capsys.readouterr().err
    assert err.startswith(f"error: no report: {tmp_path / 'r'}: holds files that are not a report's (draft.docx)"), err
    assert err.endswith(f"the results are in {out / 'results.parquet'}: build it with python -m scaling.report {out} "
                        "--out DIR\n"), err
    assert sorted(p.name for p in (tmp_path / "r").iterdir()) == ["draft.docx"]
    assert report_after_study(out, tmp_path / "new") is True
    assert capsys.readouterr().out == f"report: {tmp_path / 'new' / 'index.html'}\n"


def test_fits_json_records_the_results_a_report_was_built_from(tmp_path, monkeypatch, capsys):
    # A study run with another output (--set output=...) has the same name, so the same default folder: a report of
    # one output silently replaced the other's there.
    a, b = study_output(tmp_path / "a"), study_output(tmp_path / "b")
    monkeypatch.chdir(tmp_path)
    assert main([str(a), "--n-boot", "0"]) == 0
    default = tmp_path / "reports" / "synthetic"
    assert json.loads((default / "fits.json").read_text())["results"] == str(a / "results.parquet")
    before = snapshot(default)
    monkeypatch.setattr("scaling.report.analyze", lambda *args, **kwargs: pytest.fail("analysed a refused report"))
    for results in (b, b / "results.parquet"):
        assert main([str(results), "--n-boot", "0"]) == 2
        assert capsys.readouterr().err == (f"error: report folder reports/synthetic: holds the report of the output "
                                           f"{a}; this one is of the output {b}: give --out DIR for it, or delete "
                                           "reports/synthetic to replace that report\n")
    with pytest.raises(ValueError, match="^reports/synthetic: holds the report of the output"):
        build_report(b / "results.parquet")
    assert snapshot(default) == before
    monkeypatch.undo()
    monkeypatch.chdir(tmp_path)
    assert main([str(b), "--n-boot", "0", "--out", "reports/synthetic"]) == 0  # named: replaced
    assert json.loads((default / "fits.json").read_text())["results"] == str(b / "results.parquet")
    assert main(["--paper", "--n-boot", "0", "--out", "paper"]) == 0
    assert json.loads((tmp_path / "paper" / "fits.json").read_text())["results"] is None


@pytest.fixture(scope="module")
def three_trials():
    """The analysis of a study of three models, one of each size S, B, L: every fit rests on 3 trials or fewer."""
    from scaling.report import report_rows

    models = ("DiT-S/2", "DiT-B/2", "DiT-L/2")
    rows = [r for r in synthetic_rows() if r["status"] == "ok" and r["model"] in models]
    return analyze(report_rows(pd.DataFrame(rows)), n_boot=20)


def test_what_the_extrapolations_fit_leaves_open_reaches_the_report(three_trials):
    # extrapolation_check kept only the count of converged resamples: its fit's "no interval" (or "26 of 30 resamples
    # could not be fitted") was in no note, and the table's "20" did not say of how many.
    a = three_trials
    fid = next(e for e in a.extrapolation if e["quantity"] == "FID")
    reason = "no interval: its points come from 2 trial(s), and a bootstrap over trials needs 3 to vary"
    assert fid["unsettled"] == [reason] and fid["inside_interval"] is None
    assert (f"Extrapolation of FID to DiT-L/2 with y = a·x^b, its fit without the held-out points: {reason}. Its "
            "interval, and whether the observation falls inside it, say little of the law.") in a.notes
    assert re.search(r"\| DiT-L/2 \| C = [^|]+ \| [^|]+ \| \\\[–, –\\\] \| [^|]+ \| [^|]+ \| – \| 20/20 \|\n",
                     markdown_of(a).split("### Extrapolation check")[1])


def test_figures_say_why_a_fit_is_missing_and_captions_name_only_what_is_drawn(tmp_path, monkeypatch, three_trials):
    # Figures 1 and 2 said "too few points for a fit" where FIDs of different settings were left unfitted, under
    # captions describing the fit and its band; Figure 1's band over three trials had no width (no interval now).
    import matplotlib

    from scaling import figures
    from scaling.report import draw_figures

    notes = []
    monkeypatch.setattr(figures, "_note", lambda ax, text: notes.append(text))
    rows = pd.DataFrame(synthetic_rows())
    rows.loc[rows.model.str.startswith(("DiT-S/", "DiT-L/")), "fid_samples"] = 1000
    captions = {f.stem: f.caption for f in draw_figures(analyze(rows, n_boot=0), tmp_path)}
    assert notes == ["no fit: FIDs of different settings (see the notes)"] * 2 + [None]  # Figures 1, 2 and 3
    assert captions["fig1_fid_vs_gflops"] == ("Figure 1. FID against forward Gflops at step 400,000, one point per "
                                              "model (the paper's Figure 8).")
    assert captions["fig2_fid_vs_compute"].endswith("(the paper's Figure 9), with the compute-efficient frontier.")
    assert captions["fig3_loss_vs_compute"] == ("Figure 3. Validation loss against training compute, the frontier, and "
                                                "L(C) = E + A·C^(−α) fitted to it.")  # no resamples: no band
    captions = {f.stem: f.caption for f in draw_figures(three_trials, tmp_path)}
    assert captions["fig1_fid_vs_gflops"].endswith("Figure 8), with the power-law fit and the correlations.")
    assert captions["fig5_isoflop"].endswith("; the compute-optimal size N*(C) and steps D*(C) as power laws.")
    assert matplotlib.rcParams["text.parse_math"]  # the figures' style is theirs, not the importing process's


def test_report_md_escapes_names_from_the_results():
    # A model or study name went into report.md raw: GitHub renders "<img ...>" in it as HTML, and a newline broke
    # the heading.
    from scaling.report import report_rows

    rows = pd.DataFrame(synthetic_rows()).assign(study="a <b> & c\nd")
    rows.loc[rows.model == "DiT-S/8", "model"] = "DiT-S/8 <img src=x onerror=alert(1)>"
    md = markdown_of(analyze(report_rows(rows), n_boot=0))
    assert md.startswith("# Scaling report: a &lt;b&gt; &amp; c d\n")
    assert "| DiT-S/8 &lt;img src=x onerror=alert(1)&gt; |" in md and "<" not in md


def test_report_md_shows_markup_in_names_and_captions_as_written():
    # Markdown read a name's "*", "_", "[...]" or "$...$" as markup: "DiT-B/2 *x* [a](b)" came out emphasised and
    # linked, and GitHub typesets "$...$" as math.
    from scaling.report import report_rows

    rows = pd.DataFrame(synthetic_rows()).assign(study="my_study *v2*")
    rows.loc[rows.model == "DiT-S/8", "model"] = "DiT-S/8 *x* [a](b) `c` ~~d~~ $e$ \\"
    md = markdown_of(analyze(report_rows(rows), n_boot=0))
    assert md.startswith("# Scaling report: my\\_study \\*v2\\*\n")
    assert "| DiT-S/8 \\*x\\* \\[a\\](b) \\`c\\` \\~\\~d\\~\\~ \\$e\\$ \\\\ |" in md
