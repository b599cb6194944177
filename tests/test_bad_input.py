"""The bad-input catalogue at the command line: each case exits non-zero, names the field or file, writes nothing."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from core import train as core_train
from scaling import report as scaling_report
from scaling import run as scaling_run
from test_study import BAD, BASE, write

REPO = Path(__file__).resolve().parents[1]


def snapshot(root):
    """Every path under root with its size: 'writes nothing' means this does not change."""
    return {str(p.relative_to(root)): p.stat().st_size for p in Path(root).rglob("*")}


@pytest.mark.parametrize("case", BAD)
def test_study_catalogue_at_the_command_line(tmp_path, monkeypatch, capsys, case):
    text, overrides, message = BAD[case]
    path = write(tmp_path, text)
    monkeypatch.chdir(tmp_path)  # the default output (outputs/<name>) would land here
    before = snapshot(tmp_path)
    argv = [str(path)] + [arg for o in overrides for arg in ("--set", o)]
    assert scaling_run.main(argv) == scaling_run.EXIT_BAD_INPUT
    assert capsys.readouterr().err == f"error: {message.format(f=path)}\n"
    assert snapshot(tmp_path) == before


def test_output_that_is_not_writable(tmp_path, monkeypatch, capsys):
    blocker = tmp_path / "taken"
    blocker.write_text("a file where the output folder should go")
    path = write(tmp_path, BASE + f"output: {blocker}/study\n")
    before = snapshot(tmp_path)
    assert scaling_run.main([str(path)]) == 2
    assert capsys.readouterr().err == (f"error: {path}: output: {blocker}/study is not writable "
                                       f"({blocker} does not allow writing)\n")
    assert snapshot(tmp_path) == before


def test_tracking_server_that_does_not_answer(tmp_path, monkeypatch, capsys):
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    uri = f"http://127.0.0.1:{port}"
    path = write(tmp_path, BASE + f"output: {tmp_path / 'out'}\ntracking:\n  mlflow_uri: {uri}\n")
    line = BASE.count("\n") + 3
    before = snapshot(tmp_path)
    assert scaling_run.main([str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {path}:{line}: tracking.mlflow_uri: no MLflow tracking server answers at {uri} (")
    assert snapshot(tmp_path) == before
    # The same server named by the environment instead of the study file.
    path = write(tmp_path, BASE + f"output: {tmp_path / 'out'}\n", name="env.yaml")
    before = snapshot(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    assert scaling_run.main([str(path)]) == 2
    assert capsys.readouterr().err.startswith(f"error: MLFLOW_TRACKING_URI: no MLflow tracking server answers at {uri} (")
    assert snapshot(tmp_path) == before


def test_truncated_parquet_given_to_the_report(tmp_path, monkeypatch, capsys):
    good = tmp_path / "results.parquet"
    pd.DataFrame({"a": range(100)}).to_parquet(good)
    cut = tmp_path / "cut.parquet"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    monkeypatch.chdir(tmp_path)
    before = snapshot(tmp_path)
    assert scaling_report.main([str(cut)]) == 2
    assert capsys.readouterr().err.startswith(f"error: {cut}: not a readable Parquet file")
    assert scaling_report.main([str(tmp_path / "missing")]) == 2
    assert str(tmp_path / "missing") in capsys.readouterr().err
    assert snapshot(tmp_path) == before  # no reports/ folder


def test_corrupt_checkpoint_given_to_core_train(tmp_path):
    ckpt = tmp_path / "step-000000010"
    ckpt.mkdir()
    (ckpt / "trainer_state.json").write_text('{"step": 10, "mod')
    cmd = [sys.executable, "-m", "core.train", "--model", "DiT-P/4", "--dataset", "digits", "--max-steps", "20",
           "--results-dir", str(tmp_path / "results"), "--resume", str(ckpt), "--num-workers", "0"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"error: {ckpt / 'trainer_state.json'} is corrupt" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not any(p.is_file() for p in (tmp_path / "results").rglob("*"))  # no checkpoint, no fresh start
    shutil.rmtree(ckpt)
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and f"error: checkpoint not found: {ckpt}" in proc.stderr


@pytest.mark.parametrize("args, message", [
    (["--model", "DiT-Q/2"], "argument --model: invalid choice: 'DiT-Q/2'"),
    (["--dataset", "folder"], "argument --dataset: invalid choice: 'folder'"),
    (["--lr-schedule", "cos"], "argument --lr-schedule: invalid choice: 'cos'"),
    (["--zero-stage", "4"], "argument --zero-stage: invalid choice: 4"),
    (["--dataset", "imagefolder", "--data-path", "{tmp}/missing", "--image-size", "256"],
     "error: --data-path {tmp}/missing: not a folder"),
    (["--dataset", "imagefolder", "--data-path", "{tmp}"], "error: --image-size: the imagefolder dataset needs one"),
    (["--dataset", "latents", "--data-path", "{tmp}"], "error: latent folder {tmp} has no meta.json"),
    (["--model", "DiT-XL/8", "--dataset", "imagefolder", "--data-path", "{tmp}", "--image-size", "100"],
     "error: --model DiT-XL/8 with --image-size 100: patch_size 8 does not divide input_size 100"),
    (["--milestones", "10,x"], "error: --milestones 10,x: not comma-separated step numbers"),
    (["--milestones", "10,30"], "error: --milestones 10,30: steps must lie in 1..--max-steps (20)"),
])
def test_bad_arguments_of_core_train(tmp_path, capsys, args, message):
    args = [a.replace("{tmp}", str(tmp_path / "data")) for a in args]
    (tmp_path / "data").mkdir()
    base = ["--model", "DiT-P/4", "--dataset", "digits", "--max-steps", "20", "--results-dir", str(tmp_path / "res")]
    assert core_train.main(base + args) == 2
    assert message.replace("{tmp}", str(tmp_path / "data")) in capsys.readouterr().err
    assert not (tmp_path / "res").exists()  # checked before anything is written


def test_output_in_use_by_another_driver(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    path = write(tmp_path, BASE + f"output: {out}\n")
    held = scaling_run.lock_output(out)  # as a driver running this study holds it
    try:
        before = snapshot(tmp_path)
        proc = subprocess.run([sys.executable, "-m", "scaling.run", str(path)], cwd=REPO, capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert f"error: {path}: output: {out} is in use by another scaling.run of this study" in proc.stderr
        assert snapshot(tmp_path) == before
    finally:
        os.close(held)
    # The lock goes with its holder: then the folder is free again.
    again = scaling_run.lock_output(out)
    assert again is not None
    os.close(again)


def test_unreadable_results_in_the_output_of_a_study_to_resume(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.parquet").write_bytes(b"PAR1 cut short")
    path = write(tmp_path, BASE + f"output: {out}\n")
    before = snapshot(tmp_path)
    for extra in ([], ["--dry-run"]):
        assert scaling_run.main([str(path), *extra]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {path}: output: {out / 'results.parquet'}: not a readable Parquet file (")
        assert err.rstrip().endswith("move it away to start the study afresh")
    assert snapshot(tmp_path) == before
