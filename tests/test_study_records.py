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
