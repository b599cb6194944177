"""The results tables: schema, atomic writes, validated loads, and the bundled paper table."""
import itertools
import math
import os
import re
import subprocess
import sys
import threading
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from scaling.results import (LOSS_CURVES_SCHEMA, REQUIRED_COLUMNS, RESULTS_SCHEMA, load_curves, load_results,
                             paper_results, remove_unfinished_writes, to_table, write_table)

PAPER_GFLOPS = {"S/8": 0.36, "S/4": 1.41, "S/2": 6.06, "B/8": 1.42, "B/4": 5.56, "B/2": 23.01, "L/8": 5.01,
                "L/4": 19.70, "L/2": 80.71, "XL/8": 7.39, "XL/4": 29.05, "XL/2": 118.64}
PAPER_FID = {"S/8": 153.60, "S/4": 100.41, "S/2": 68.40, "B/8": 122.74, "B/4": 68.38, "B/2": 43.47, "L/8": 118.87,
             "L/4": 45.64, "L/2": 23.33, "XL/8": 106.41, "XL/4": 43.01, "XL/2": 19.47}
PATCH2_PARAMS = {"S": 32_963_360, "B": 130_512_416, "L": 458_102_816, "XL": 675_129_632}
WIDTH = {"S": 384, "B": 768, "L": 1024, "XL": 1152}


def row(**overrides):
    """One ok measurement of a small trial."""
    base = dict(study="s", trial_id="abc", model="DiT-S/2", size="S", patch=2, params=32_963_360, gflops=6.06,
                batch_size=256, step=1000, max_step=2000, train_compute=6.06 * 256 * 1000 * 3, train_loss=0.2,
                val_loss=0.21, fid=50.0, fid_samples=1000, feature_extractor="digits", wall_time_s=12.5,
                images_per_s=300.0, status="ok", mlflow_run_id="r1",
                timestamp=datetime(2025, 1, 2, 3, 4, 5, tzinfo=timezone.utc))
    return {**base, **overrides}


def test_schema_types_and_required_columns():
    types = {f.name: f.type for f in RESULTS_SCHEMA}
    assert types["patch"] == pa.int32() and types["params"] == pa.int64() and types["step"] == pa.int64()
    assert types["train_compute"] == pa.float64() and types["fid_samples"] == pa.int32()
    assert types["timestamp"] == pa.timestamp("us", tz="UTC")
    assert set(REQUIRED_COLUMNS) <= set(RESULTS_SCHEMA.names)
    assert LOSS_CURVES_SCHEMA.names == ["study", "trial_id", "model", "step", "train_loss", "lr", "images_per_s",
                                        "achieved_tflops", "mfu"]


def test_the_readme_documents_every_results_column_in_order():
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    documented = re.findall(r"^\| `(\w+)` \| (\w+) \|", readme.split("The columns of `results.parquet`")[1], re.M)
    types = {pa.string(): "string", pa.int32(): "int32", pa.int64(): "int64", pa.float64(): "float64",
             pa.timestamp("us", tz="UTC"): "timestamp"}
    assert documented == [(f.name, types[f.type]) for f in RESULTS_SCHEMA]


def test_loss_curves_written_before_the_throughput_columns_load_with_them_empty(tmp_path):
    path = tmp_path / "loss_curves.parquet"
    old = pa.schema([f for f in LOSS_CURVES_SCHEMA if f.name not in ("achieved_tflops", "mfu")])
    write_table([{"study": "s", "trial_id": "a", "model": "DiT-P/2", "step": 5, "train_loss": 0.4, "lr": 1e-3,
                  "images_per_s": 50.0}], path, old)
    [curve] = load_curves(path).to_dict("records")
    assert curve["images_per_s"] == 50.0 and math.isnan(curve["achieved_tflops"]) and math.isnan(curve["mfu"])


def test_round_trip_of_rows_with_missing_values(tmp_path):
    rows = [row(), row(step=2000, fid=None, val_loss=float("nan"), fid_samples=None, error=None)]
    write_table(rows, tmp_path / "results.parquet", RESULTS_SCHEMA)
    df = load_results(tmp_path)  # the folder names the file
    assert list(df.columns) == RESULTS_SCHEMA.names
    assert df.step.tolist() == [1000, 2000]
    assert df.fid.iloc[0] == 50.0 and math.isnan(df.fid.iloc[1]) and math.isnan(df.val_loss.iloc[1])
    assert df.timestamp.iloc[0] == pd.Timestamp("2025-01-02 03:04:05", tz="UTC")
    assert df.kid.isna().all()  # columns the writer left out come back null
    # What load_results returns writes back unchanged (the orchestrator rewrites loaded rows).
    write_table(df.to_dict("records"), tmp_path / "again.parquet", RESULTS_SCHEMA)
    pd.testing.assert_frame_equal(load_results(tmp_path / "again.parquet"), df)


def test_write_is_atomic_and_leaves_no_temporary_files(tmp_path):
    path = tmp_path / "results.parquet"
    write_table([row()], path, RESULTS_SCHEMA)
    with pytest.raises(ValueError, match="patch"):
        write_table([row(patch=2.5)], path, RESULTS_SCHEMA)  # a fraction cannot become an int silently
    assert load_results(path).patch.tolist() == [2]  # the old file survives a failed write
    assert [p.name for p in tmp_path.iterdir()] == ["results.parquet"]
    # What a write killed outright (SIGKILL, a lost machine) leaves, the driver that next holds the output removes.
    left = [".results.parquet.0a1b2c3d.tmp", ".loss_curves.parquet.0a1b2c3d.tmp"]
    for name in left + [".results.parquet.keep", "notes.tmp"]:
        (tmp_path / name).write_bytes(b"PAR1")
    remove_unfinished_writes(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".results.parquet.keep", "notes.tmp", "results.parquet"]


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o027, 0o640)])
def test_written_files_get_the_mode_of_a_normally_created_file(tmp_path, umask, mode):
    # The temporary file behind the atomic write is private (0600); the table must not stay so.
    old = os.umask(umask)
    try:
        write_table([row()], tmp_path / "results.parquet", RESULTS_SCHEMA)
        assert os.umask(umask) == umask  # the write left the umask as it found it
    finally:
        os.umask(old)
    assert (tmp_path / "results.parquet").stat().st_mode & 0o777 == mode


def test_reads_never_mix_two_versions_of_a_file_being_replaced(tmp_path):
    """A reader polls results.parquet while the driver keeps replacing it: every read is one whole version.

    pyarrow given a path opens the file once for the footer and again for the pages; a replace in
    between used to pair one version's footer with the next one's pages ("Page was smaller than expected").
    """
    path = tmp_path / "results.parquet"
    versions = [[row(step=s, trial_id=str(s) * (s % 7 + 1)) for s in range(1, n + 1)] for n in range(1, 40)]
    write_table(versions[0], path, RESULTS_SCHEMA)
    done = threading.Event()

    def keep_replacing():
        for i in itertools.cycle(range(len(versions))):
            if done.is_set():
                return
            write_table(versions[i], path, RESULTS_SCHEMA)

    writer = threading.Thread(target=keep_replacing)
    writer.start()
    try:
        for _ in range(300):
            df = load_results(path)
            assert df.step.tolist() == list(range(1, len(df) + 1))  # one whole version
    finally:
        done.set()
        writer.join()


def test_a_process_that_reads_results_and_exits_at_once_exits_with_its_own_status(tmp_path):
    """Arrow's reader threads must not outlive the read: a CLI that reads results, finds them wanting and exits 2
    right away aborted at exit (status 134, "terminate called without an active exception") in 15 runs of 60."""
    write_table([row(step=s) for s in range(0, 3000, 100)], tmp_path / "results.parquet", RESULTS_SCHEMA)
    script = ("import sys; from scaling.results import read_parquet; "
              f"read_parquet({str(tmp_path / 'results.parquet')!r}); sys.exit(2)")
    statuses = []
    for _ in range(6):  # 24 processes, four at a time on this 2-core box
        procs = [subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.PIPE) for _ in range(4)]
        statuses += [(p.wait(), p.stderr.read().decode()[-300:]) for p in procs]
    assert [s for s in statuses if s[0] != 2] == []


def test_unknown_columns_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="not in the schema: fidd"):
        write_table([row(fidd=3.0)], tmp_path / "results.parquet", RESULTS_SCHEMA)


def test_a_column_the_schema_lacks_is_left_out_on_reading_and_refused_where_the_file_is_rewritten(tmp_path):
    path = tmp_path / "results.parquet"
    pq.write_table(to_table([row()], RESULTS_SCHEMA).append_column("note", pa.array(["by hand"])), path)
    assert load_results(path).columns.tolist() == RESULTS_SCHEMA.names  # a newer version's file: the report reads it
    with pytest.raises(ValueError, match=f"^{path}: columns this version does not write: note; the study's next "):
        load_results(path, strict=True)
    # Rows removed by hand through pandas: to_parquet keeps its index, a column of no data, which passes.
    df = load_results(path, strict=False)
    pd.concat([df, df.assign(step=2000)]).query("step == 2000").to_parquet(path)
    assert "__index_level_0__" in pq.read_schema(path).names
    assert load_results(path, strict=True).step.tolist() == [2000]
    # The loss curves alike: the replay and the report read a newer version's, the driver refuses to rewrite it.
    curves = tmp_path / "loss_curves.parquet"
    point = {"study": "s", "trial_id": "DiT-S-2-abc", "model": "DiT-S/2", "step": 10, "train_loss": 0.5}
    pq.write_table(to_table([point], LOSS_CURVES_SCHEMA).append_column("grad_norm", pa.array([1.0])), curves)
    assert load_curves(curves).columns.tolist() == LOSS_CURVES_SCHEMA.names
    assert load_curves(curves).train_loss.tolist() == [0.5]
    with pytest.raises(ValueError, match=f"^{curves}: columns this version does not write: grad_norm; the study's "):
        load_curves(curves, strict=True)


def test_loss_curves_table(tmp_path):
    curves = pd.DataFrame({"study": "s", "trial_id": "abc", "model": "DiT-S/2", "step": [10, 20],
                           "train_loss": [0.5, 0.4], "lr": 1e-4, "images_per_s": [100.0, None]})
    write_table(curves, tmp_path / "loss_curves.parquet", LOSS_CURVES_SCHEMA)
    back = pd.read_parquet(tmp_path / "loss_curves.parquet")
    assert back.train_loss.tolist() == [0.5, 0.4] and back.step.dtype == np.int64
    write_table([], tmp_path / "loss_curves.parquet", LOSS_CURVES_SCHEMA)  # a study before its first log
    assert pd.read_parquet(tmp_path / "loss_curves.parquet").columns.tolist() == LOSS_CURVES_SCHEMA.names


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.parquet"):
        load_results(tmp_path / "nope.parquet")
    with pytest.raises(FileNotFoundError, match="results.parquet"):
        load_results(tmp_path)


def test_truncated_and_non_parquet_files(tmp_path):
    good = tmp_path / "good.parquet"
    write_table([row()], good, RESULTS_SCHEMA)
    truncated = tmp_path / "truncated.parquet"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ValueError, match="truncated.parquet: not a readable Parquet file"):
        load_results(truncated)
    text = tmp_path / "results.parquet"
    text.write_text("trial_id,fid\nabc,3\n")
    with pytest.raises(ValueError, match="results.parquet: not a readable Parquet file"):
        load_results(tmp_path)


def test_missing_required_columns_are_named(tmp_path):
    path = tmp_path / "old.parquet"
    pd.DataFrame([row()]).drop(columns=["gflops", "status"]).to_parquet(path)
    with pytest.raises(ValueError, match="old.parquet: missing required columns: gflops, status"):
        load_results(path)


def test_unknown_status_is_rejected(tmp_path):
    path = tmp_path / "results.parquet"
    write_table([row(status="exploded")], path, RESULTS_SCHEMA)
    with pytest.raises(ValueError, match="unknown status values \\['exploded'\\]"):
        load_results(path)


def test_paper_table_matches_table_4():
    df = paper_results()
    assert len(df) == 12 and set(df.status) == {"ok"}
    short = df.model.str.removeprefix("DiT-")
    assert dict(zip(short, df.gflops)) == PAPER_GFLOPS
    assert dict(zip(short, df.fid)) == PAPER_FID
    assert (df.step == 400_000).all() and (df.batch_size == 256).all()
    np.testing.assert_allclose(df.train_compute, df.gflops * 256 * 400_000 * 3)


def test_paper_params_follow_from_the_patch_2_counts():
    """Only the patch embedding, the positional embedding and the final layer depend on the patch."""
    def patch_part(d, p):
        return p * p * 4 * d + d + (32 // p) ** 2 * d + d * p * p * 8 + p * p * 8

    df = paper_results()
    for r in df.itertuples():
        d = WIDTH[r.size]
        assert r.params == PATCH2_PARAMS[r.size] - patch_part(d, 2) + patch_part(d, r.patch), r.model


def test_package_import_is_light():
    code = ("import sys, scaling; scaling.load_results; import scaling.report; "
            "print(sorted(m for m in ('torch', 'ray', 'mlflow') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_checking_a_report_folder_leaves_plotting_and_fitting_unimported(tmp_path):
    # scaling.run checks the report folder before a study's launch: matplotlib and the fits come with the report.
    code = ("import sys; from scaling.report_folder import check_report_destination; "
            f"check_report_destination({str(tmp_path / 'report')!r}); "
            "print(sorted(m for m in ('matplotlib', 'scaling.fits', 'scaling.report', 'pandas') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
