"""What a study writes to is checked before launch: a resumed study's Parquet files and SQLite store must read, the
MLflow URI must name a store MLflow has, and the report folder must be one a report may replace; else exit 2 with
nothing written."""
import shutil
import sqlite3

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from scaling import run as scaling_run
from test_bad_input import snapshot
from test_study import BASE, write


def study_with_output(tmp_path, extra=""):
    out = tmp_path / "out"
    out.mkdir()
    return write(tmp_path, BASE + f"output: {out}\n" + extra), out


@pytest.mark.parametrize("damage", ["curves cut short", "results a folder", "store not a database"])
def test_damaged_records_of_a_study_to_resume(tmp_path, capsys, damage):
    path, out = study_with_output(tmp_path)
    if damage == "curves cut short":
        bad, reason = out / "loss_curves.parquet", "not a readable Parquet file ("
        bad.write_bytes(b"PAR1 cut short")
    elif damage == "results a folder":
        bad, reason = out / "results.parquet", "is not a file"
        bad.mkdir()
    else:
        bad, reason = out / "mlflow.db", "not an SQLite database (file is not a database)"
        bad.write_bytes(b"not a database, though long enough to have a header: " * 4)
    before = snapshot(tmp_path)
    for extra in ([], ["--dry-run"]):
        assert scaling_run.main([str(path), *extra]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {path}: output: {bad}") and reason in err, err
        assert err.rstrip().endswith("move it away to start the study afresh")
    assert snapshot(tmp_path) == before


def test_readable_records_pass(tmp_path, capsys):
    path, out = study_with_output(tmp_path)
    pq.write_table(pa.table({"trial_id": ["x"], "step": [1]}), out / "loss_curves.parquet")
    with sqlite3.connect(out / "mlflow.db") as db:
        db.execute("CREATE TABLE t (x)")
    assert scaling_run.main([str(path), "--dry-run"]) == 0


@pytest.mark.parametrize("uri", ["ftp://example/x", "s3://bucket/mlruns"])
def test_tracking_uri_that_mlflow_has_no_store_for(tmp_path, capsys, monkeypatch, uri):
    path, out = study_with_output(tmp_path, f"tracking:\n  mlflow_uri: {uri}\n")
    shutil.rmtree(out)  # a fresh study: nothing may be created for it
    before = snapshot(tmp_path)
    assert scaling_run.main([str(path)]) == 2
    line = BASE.count("\n") + 3
    assert capsys.readouterr().err == (
        f"error: {path}:{line}: tracking.mlflow_uri: MLflow has no tracking store for {uri!r}; use "
        f"http(s)://host:port, sqlite:///path, file:///path or a database URI (sqlite, postgresql, mysql, mssql)\n")
    assert snapshot(tmp_path) == before
    path = write(tmp_path, BASE + f"output: {out}\n", name="env.yaml")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    assert scaling_run.main([str(path)]) == 2
    assert capsys.readouterr().err.startswith(f"error: MLFLOW_TRACKING_URI: MLflow has no tracking store for {uri!r}")


def test_report_folder_that_is_not_a_report_is_refused_before_launch(tmp_path, capsys):
    # The report replaces its folder whole: pointed at the study's own output it deleted every record, after training.
    path, out = study_with_output(tmp_path)
    pq.write_table(pa.table({"trial_id": ["x"], "step": [1]}), out / "loss_curves.parquet")  # a study's records
    shutil.copy(path, out / "study.yaml")
    before = snapshot(tmp_path)
    assert scaling_run.main([str(path), "--report-dir", str(out), "--address", "127.0.0.1:1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --report-dir {out}: holds files that are not a report's (loss_curves.parquet, "
                          f"study.yaml); a report replaces its whole folder"), err
    assert snapshot(tmp_path) == before


def test_fids_measured_against_files_rewritten_since_stop_the_study(tmp_path, capsys):
    # A reference folder regenerated in place keeps its path (which trial ids hash): rows measured against the earlier
    # files are refused before launch (a dry run warns), naming the setting and the trials, not mixed with new FIDs.
    import json
    from datetime import datetime, timezone

    import torch

    from core.digits import digits_arrays
    from core.evaluate import fid_basis_now
    from core.real_images import to_uint8
    from scaling.ray_trial import eval_config
    from scaling.results import RESULTS_SCHEMA, load_results, write_table
    from scaling.study import load_study
    from test_evaluate import write_folder

    images, labels = digits_arrays("train")
    images = to_uint8(torch.from_numpy(images[:31]))
    write_folder(tmp_path / "real", images[:30], labels[:30])
    path, out = study_with_output(tmp_path, "")
    path.write_text(path.read_text().replace("  fid_samples: 100\n", f"  fid_samples: 100\n  reference: "
                                             f"{tmp_path / 'real'}\n").replace("model: [DiT-P, DiT-N]", "model: [DiT-P]"))
    study = load_study(path)
    rows = []
    for t in study.trials:
        basis = fid_basis_now(eval_config(t.to_dict(), out / "fid_cache"), "digits", input_size=8)
        rows += [dict(study=study.name, trial_id=t.trial_id, model=t.model, step=s, max_step=t.train["max_steps"],
                      status="ok", fid=30.0, fid_basis=basis, timestamp=datetime.now(timezone.utc),
                      config_json=json.dumps(t.to_dict(), sort_keys=True)) for s in t.milestones]
    write_table(rows, out / "results.parquet", RESULTS_SCHEMA)
    scaling_run.check_fid_basis(study, load_results(out))  # measured against these very files
    write_folder(tmp_path / "real", images[30:], labels[30:])  # the folder written again, one image more
    before = snapshot(tmp_path)
    assert scaling_run.main([str(path), "--no-report"]) == 2
    error = capsys.readouterr().err
    ids = ", ".join(sorted(t.trial_id for t in study.trials))
    assert error == (f"error: {study.locate('eval.reference')}: eval.reference: the files FID is measured against "
                     f"changed since trial(s) {ids} measured theirs (eval.reference at {tmp_path / 'real'}: other "
                     f"names, sizes or modification times), so their FIDs and new ones would not be comparable; put "
                     f"the earlier files back, or give the study another output to measure it afresh\n")
    assert snapshot(tmp_path) == before
    assert scaling_run.main([str(path), "--dry-run"]) == 0
    assert "warning: " + error.removeprefix("error: ") in capsys.readouterr().err
