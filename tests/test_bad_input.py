"""The bad-input catalogue at the command line: each case exits non-zero, names the field or file, writes nothing."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from core import checkpoint as ckpt
from core import train as core_train
from scaling import report as scaling_report
from scaling import run as scaling_run
from test_study import BAD, BASE, line_of, write

REPO = Path(__file__).resolve().parents[1]


def snapshot(root):
    """Every path under root with its size: 'writes nothing' means this does not change."""
    return {str(p.relative_to(root)): p.lstat().st_size for p in Path(root).rglob("*")}  # a link as itself


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


def test_output_where_no_folder_can_be_made(tmp_path, capsys):
    # Refused by the run, said by the dry run (whose plan may be for another machine) without refusing. A link to
    # nothing passed the checks, and the output's mkdir raised FileExistsError after Ray's start.
    blocker, link = tmp_path / "taken", tmp_path / "out"
    blocker.write_text("a file where the output folder should go")
    link.symlink_to(tmp_path / "gone")
    for output, problem in ((blocker / "study", f"{blocker / 'study'} is not a folder ({blocker} is a file)"),
                            (blocker, f"{blocker} is not a folder ({blocker} is a file)"),
                            (link, f"{link} is a link to {tmp_path / 'gone'}, which does not exist")):
        path = write(tmp_path, BASE + f"output: {output}\n")
        before = snapshot(tmp_path)
        assert scaling_run.main([str(path)]) == 2
        assert capsys.readouterr().err == f"error: {line_of(path, 'output')}: output: {problem}\n"
        assert scaling_run.main([str(path), "--dry-run"]) == 0
        assert capsys.readouterr().err == f"warning: {line_of(path, 'output')}: output: {problem}\n"
        assert snapshot(tmp_path) == before and not (tmp_path / "gone").exists()


def test_report_folder_problems_in_a_dry_run_and_report_flags_that_contradict(tmp_path, capsys):
    report = tmp_path / "notes"
    report.mkdir()
    (report / "keep.txt").write_text("not a report's")
    path = write(tmp_path, BASE + f"output: {tmp_path / 'out'}\n")
    assert scaling_run.main([str(path), "--dry-run", "--report-dir", str(report)]) == 0
    assert capsys.readouterr().err.startswith(f"warning: --report-dir {report}")
    assert scaling_run.main([str(path), "--no-report", "--report-dir", str(report)]) == 2
    assert "argument --report-dir: not allowed with argument --no-report" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_report_folder_that_is_or_holds_the_output_is_refused_before_launch(tmp_path, capsys):
    # A report replaces its folder whole: at the study's end it would refuse the output's files, after the training.
    out = tmp_path / "studies" / "out"
    path = write(tmp_path, BASE + f"output: {out}\n")
    for report, relation in ((out, "is"), (out.parent, "holds"), (out / ".." / "out", "is")):
        before = snapshot(tmp_path)
        problem = (f"--report-dir {report}: {relation} the study's output folder {out}; a report replaces its folder "
                   "whole: give another")
        assert scaling_run.main([str(path), "--report-dir", str(report)]) == 2
        assert capsys.readouterr().err == f"error: {problem}\n"
        assert scaling_run.main([str(path), "--dry-run", "--report-dir", str(report)]) == 0
        assert capsys.readouterr().err.startswith(f"warning: {problem}\n")
        assert snapshot(tmp_path) == before
    # A report folder inside the output replaces nothing of it.
    assert scaling_run.main([str(path), "--dry-run", "--report-dir", str(out / "report")]) == 0
    assert "warning" not in capsys.readouterr().err
    # An empty value (an unset variable, say) is not the default folder.
    assert scaling_run.main([str(path), "--report-dir", ""]) == 2
    assert capsys.readouterr().err == "error: --report-dir is empty; give a folder, or leave the flag out for reports/tiny\n"
    assert not out.parent.exists()


def unenterable():
    """A path in a folder this process may not enter even as root (/proc/1/root in a container), else None."""
    path = Path("/proc/1/root/study")
    try:
        path.exists()
    except PermissionError:
        return path
    return None


@pytest.mark.skipif(unenterable() is None, reason="no folder that even this user cannot enter")
def test_paths_in_a_folder_that_cannot_be_entered(tmp_path, monkeypatch, capsys):
    # On a shared cluster: a data, reference or output path under someone else's private folder. Python 3.11's
    # Path.exists() raises there rather than answering False; each is named, exit 2, no traceback.
    far = unenterable()
    monkeypatch.chdir(tmp_path)
    cases = {
        "data": (BASE.replace("dataset: digits", f"dataset: latents\n  path: {far}"), [],
                 f"data.path: [Errno 13] Permission denied: '{far}'"),
        "reference": (BASE + f"output: {tmp_path / 'out'}\n", [f"--set=eval.reference={far}"],
                      f"eval.reference: {far}: Permission denied"),
        "output": (BASE + f"output: {far}\n", [], f"output: {far}"),
    }
    for name, (text, args, message) in cases.items():
        path = write(tmp_path, text)
        before = snapshot(tmp_path)
        assert scaling_run.main([str(path), *args]) == 2, name
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and "Permission denied" in err, err
        assert snapshot(tmp_path) == before
    assert scaling_report.main([str(far), "--out", str(tmp_path / "report")]) == 2
    assert capsys.readouterr().err == f"error: {far}: Permission denied\n"
    with pytest.raises(SystemExit) as exit_:  # argparse's usage error, before any fit
        scaling_report.main([str(tmp_path), "--seed", "-1"])
    assert exit_.value.code == 2 and "argument --seed: -1: give a whole number >= 0" in capsys.readouterr().err


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


def test_a_deleted_experiment_is_refused_before_launch(tmp_path, empty_store, capsys):
    # MLflow refuses runs in a deleted experiment (its name stays taken until `mlflow gc`): the driver failed on it
    # after Ray's start, with a traceback and exit 1.
    from mlflow.tracking import MlflowClient

    store = tmp_path / "store" / "mlflow.db"
    store.parent.mkdir()
    shutil.copyfile(empty_store, store)
    uri = f"sqlite:///{store}"
    client = MlflowClient(uri)
    client.delete_experiment(client.create_experiment("tiny"))  # the study's name, its experiment by default
    path = write(tmp_path, BASE + f"output: {tmp_path / 'out'}\ntracking:\n  mlflow_uri: {uri}\n")
    before = snapshot(tmp_path)
    assert scaling_run.main([str(path)]) == 2
    [experiment] = [e for e in client.search_experiments(view_type=3) if e.name == "tiny"]  # 3: all
    assert capsys.readouterr().err == (
        f"error: {path}: tracking.experiment (the study's name): MLflow's experiment 'tiny' at {uri} is deleted, and "
        f"takes no runs: restore it (MLFLOW_TRACKING_URI={uri} mlflow experiments restore -x "
        f"{experiment.experiment_id}), or name another with tracking.experiment\n")
    assert snapshot(tmp_path) == before
    # Another experiment named in the study: nothing stands in the way (the dry run of a check that passes).
    path = write(tmp_path, BASE + f"output: {tmp_path / 'out'}\ntracking:\n  mlflow_uri: {uri}\n"
                                  "  experiment: tiny-again\n")
    study = scaling_run.load_study(path)
    assert scaling_run.check_tracking_server(study) is None


def test_a_file_store_is_refused_before_launch(tmp_path, capsys, monkeypatch):
    path = write(tmp_path, BASE + f"output: {tmp_path / 'out'}\ntracking:\n  mlflow_uri: file://{tmp_path}/mlruns\n")
    before = snapshot(tmp_path)
    assert scaling_run.main([str(path)]) == 2
    line = BASE.count("\n") + 3
    assert capsys.readouterr().err.startswith(f"error: {path}:{line}: tracking.mlflow_uri: MLflow no longer logs to a "
                                              f"file store (file://{tmp_path}/mlruns) unless MLFLOW_ALLOW_FILE_STORE")
    assert snapshot(tmp_path) == before
    # Let: the check passes, and makes no store (MLflow's client would make its folders).
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    assert scaling_run.check_tracking_server(scaling_run.load_study(path)) is None
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
    # Ranges: refused before any process group or DeepSpeed (were assertions, divisions by zero, tracebacks).
    (["--global-batch-size", "0"], "error: --global-batch-size 0: must be an integer >= 1"),
    (["--grad-accum", "0"], "error: --grad-accum 0: must be an integer >= 1"),
    (["--max-steps", "0"], "error: --max-steps 0: must be an integer in 1..1000000000000"),
    (["--lr", "-1"], "error: --lr -1.0: must be a finite number > 0"),
    (["--lr", "nan"], "error: --lr nan: must be a finite number > 0"),
    (["--log-every", "0"], "error: --log-every 0: must be an integer >= 1"),
    (["--ckpt-every", "0"], "error: --ckpt-every 0: must be an integer >= 1"),
    (["--keep-checkpoints", "0"], "error: --keep-checkpoints 0: must be an integer >= 1"),
    (["--ema-decay", "5"], "error: --ema-decay 5.0: must be a finite number in [0, 1)"),
    (["--val-batch", "-1"], "error: --val-batch -1: must be an integer >= 0"),
    (["--num-workers", "-1"], "error: --num-workers -1: must be an integer >= 0"),
    (["--warmup-steps", "-1"], "error: --warmup-steps -1: must be an integer >= 0"),
    (["--grad-clip", "0"], "error: --grad-clip 0.0: must be a finite number > 0"),
    (["--peak-tflops", "inf"], "error: --peak-tflops inf: must be a finite number > 0"),
    (["--global-seed", "-1"], "error: --global-seed -1: must be an integer in 0..18446687733646"),
    (["--global-seed", "100000000000000000000"],
     "error: --global-seed 100000000000000000000: must be an integer in 0..18446687733646"),
    (["--dataset", "imagefolder", "--data-path", "{tmp}", "--image-size", "0"],
     "error: --image-size 0: must be an integer >= 1"),
    (["--global-batch-size", "5000"],
     "error: --global-batch-size 5000: larger than the digits dataset's 1500 training items"),
    (["--global-batch-size", "10", "--grad-accum", "4"],
     "error: --global-batch-size 10: not divisible by --grad-accum 4 × 1 processes"),
    (["--dataset", "imagefolder", "--data-path", "{tmp}", "--image-size", "8"],
     "error: image folder {tmp} is empty: it needs one sub-folder of images per class"),
    (["--betas", "0.9", "1.5"], "error: --betas 0.9 1.5: must be two numbers in [0, 1)"),
    (["--weight-decay", "-1"], "error: --weight-decay -1.0: must be a finite number >= 0"),
    (["--diffusion-steps", "20"], "error: --diffusion-steps 20: must be an integer in 21..100000"),
    (["--class-dropout-prob", "1"], "error: --class-dropout-prob 1.0: must be a finite number in [0, 1)"),
    (["--mlp-ratio", "0"], "error: --mlp-ratio 0.0: must be a finite number > 0"),
    (["--depth", "0"], "error: --depth 0: must be an integer >= 1"),
    (["--num-heads", "3"], "error: --model DiT-P/4 --num-heads 3: num_heads 3 does not divide hidden_size 64"),
    # A zero-width MLP crashed at the first step; the largest sizes overflowed a tensor's size or took hours to build.
    (["--mlp-ratio", "0.01"], "error: --model DiT-P/4 --mlp-ratio 0.01: mlp_ratio 0.01 leaves the MLP no hidden units "
                              "at hidden_size 64"),
    (["--mlp-ratio", "1e300"], "error: --model DiT-P/4 --mlp-ratio 1e+300: mlp_ratio must be a finite number in "
                               "(0, 64], got 1e+300"),
    (["--hidden-size", "4000000000", "--num-heads", "1"], "error: --model DiT-P/4 --hidden-size 4000000000 "
                                                          "--num-heads 1: hidden_size 4000000000 is past 65536"),
    (["--depth", "100000"], "error: --model DiT-P/4 --depth 100000: depth 100000 is past 1000, the most a DiT here "
                            "may have"),
    # The schedule's arrays at 1e11 steps asked for 745 GiB; an empty --results-dir trained into the current folder;
    # a --data-path with digits was silently ignored.
    (["--diffusion-steps", "100001"], "error: --diffusion-steps 100001: must be an integer in 21..100000"),
    (["--results-dir", ""], "error: --results-dir is empty; give a folder, or leave the flag out for ./results"),
    (["--data-path", "{tmp}"], "error: --data-path {tmp}: the digits dataset reads no folder (it is bundled)"),
])
def test_bad_arguments_of_core_train(tmp_path, capsys, args, message):
    args = [a.replace("{tmp}", str(tmp_path / "data")) for a in args]
    (tmp_path / "data").mkdir()
    base = ["--model", "DiT-P/4", "--dataset", "digits", "--max-steps", "20", "--results-dir", str(tmp_path / "res")]
    assert core_train.main(base + args) == 2
    assert message.replace("{tmp}", str(tmp_path / "data")) in capsys.readouterr().err
    assert not (tmp_path / "res").exists()  # checked before anything is written


CORE_TRAIN = ["--model", "DiT-P/4", "--dataset", "digits", "--zero-stage", "0", "--precision", "fp32",
              "--ckpt-every", "1000", "--log-every", "1", "--val-batch", "0", "--num-workers", "0", "--max-steps", "2",
              "--global-batch-size", "8"]


def test_core_train_expands_a_home_folder_in_its_paths(tmp_path, capsys, monkeypatch):
    # A quoted `--data-path "~/images"` (or one from a scheduler's argument list) was read as a folder named "~".
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "images").mkdir()
    args = ["--dataset", "imagefolder", "--data-path", "~/images", "--image-size", "8", "--results-dir", "~/res"]
    assert core_train.main(CORE_TRAIN + args) == 2
    assert capsys.readouterr().err == (f"error: image folder {tmp_path / 'images'} is empty: it needs one sub-folder "
                                       "of images per class\n")
    assert core_train.main(CORE_TRAIN + ["--results-dir", "~/res"]) == 0
    assert (tmp_path / "res" / "DiT-P-4" / "checkpoints" / ckpt.checkpoint_name(2)).is_dir()
    # --resume too (it said "checkpoint not found: ~/res/..."); its words auto and none stay words.
    step_2 = "~/res/DiT-P-4/checkpoints/" + ckpt.checkpoint_name(2)
    assert core_train.main(CORE_TRAIN + ["--results-dir", "~/res", "--max-steps", "3", "--resume", step_2]) == 0
    assert ckpt.latest_checkpoint(tmp_path / "res" / "DiT-P-4" / "checkpoints").name == ckpt.checkpoint_name(3)
    monkeypatch.chdir(tmp_path)
    assert [core_train._resume_argument(w) for w in ("auto", "none", "~")] == ["auto", "none", str(tmp_path)]


def test_core_train_refuses_a_results_dir_that_cannot_be_a_folder(tmp_path, capsys):
    blocker = tmp_path / "taken"
    blocker.write_text("a file where the results folder should go")
    (tmp_path / "res").mkdir()
    (tmp_path / "res" / "DiT-P-4").write_text("where the model's folder goes")
    before = snapshot(tmp_path)
    assert core_train.main(CORE_TRAIN + ["--results-dir", str(blocker)]) == 2
    assert capsys.readouterr().err == f"error: --results-dir {blocker}: {blocker} is not a folder\n"
    assert core_train.main(CORE_TRAIN + ["--results-dir", str(blocker / "below")]) == 2
    assert capsys.readouterr().err == f"error: --results-dir {blocker / 'below'}: {blocker} is not a folder\n"
    assert core_train.main(CORE_TRAIN + ["--results-dir", str(tmp_path / "res")]) == 2
    assert capsys.readouterr().err == (f"error: --results-dir {tmp_path / 'res'}: {tmp_path / 'res' / 'DiT-P-4'} "
                                       "is not a folder\n")
    assert snapshot(tmp_path) == before


def test_core_train_sets_every_field_a_study_trial_can(tmp_path):
    # The optimizer, diffusion and architecture fields of a study's trials, which `python -m core.train` had no flags
    # for: a trial with any of them set could not be run by hand.
    args = ["--betas", "0.8", "0.99", "--weight-decay", "0.01", "--no-fused-adamw", "--diffusion-steps", "100",
            "--class-dropout-prob", "0.2", "--no-learn-sigma", "--hidden-size", "32", "--depth", "1", "--num-heads", "4",
            "--mlp-ratio", "2", "--results-dir", str(tmp_path / "res")]
    assert core_train.main(CORE_TRAIN + args) == 0
    state = json.loads((tmp_path / "res" / "DiT-P-4" / "checkpoints" / ckpt.checkpoint_name(2) / ckpt.STATE_FILE)
                       .read_text())
    assert {k: state["config"][k] for k in ("betas", "weight_decay", "fused_adamw", "diffusion_steps")} == \
        {"betas": [0.8, 0.99], "weight_decay": 0.01, "fused_adamw": False, "diffusion_steps": 100}
    assert {k: state["model_config"][k] for k in ("class_dropout_prob", "learn_sigma", "hidden_size", "depth",
                                                   "num_heads", "mlp_ratio")} == \
        {"class_dropout_prob": 0.2, "learn_sigma": False, "hidden_size": 32, "depth": 1, "num_heads": 4,
         "mlp_ratio": 2.0}


def test_core_train_refuses_an_image_folder_without_images(tmp_path, capsys):
    (tmp_path / "data" / "cats").mkdir(parents=True)
    (tmp_path / "data" / "cats" / "notes.txt").write_text("no images here")
    args = ["--dataset", "imagefolder", "--data-path", str(tmp_path / "data"), "--image-size", "8"]
    assert core_train.main(CORE_TRAIN + args + ["--results-dir", str(tmp_path / "res")]) == 2
    assert capsys.readouterr().err.startswith(f"error: image folder {tmp_path / 'data'} has class folders ['cats'] "
                                              "but no images (")
    assert not (tmp_path / "res").exists()


def make_images(root, n=4, size=8):
    """Two classes of n random PNGs each."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in ("ant", "bee"):
        (root / c).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(root / c / f"{i}.png")
    return root


def test_core_train_shapes_its_model_for_an_image_folder(tmp_path):
    # A preset's shape is its usual data's (DiT-P/2: 8×8 one-channel digits, 10 classes); on an image folder of RGB
    # pixels and 2 classes it failed at its first step ("mat1 and mat2 shapes cannot be multiplied").
    args = ["--dataset", "imagefolder", "--data-path", str(make_images(tmp_path / "data")), "--image-size", "8",
            "--model", "DiT-P/2", "--results-dir", str(tmp_path / "res")]
    assert core_train.main(CORE_TRAIN + args) == 0
    state = json.loads((tmp_path / "res" / "DiT-P-2" / "checkpoints" / ckpt.checkpoint_name(2) / ckpt.STATE_FILE)
                       .read_text())
    assert {k: state["model_config"][k] for k in ("input_size", "in_channels", "num_classes")} == \
        {"input_size": 8, "in_channels": 3, "num_classes": 2}


@pytest.mark.parametrize("num_workers", ["0", "1"])
def test_a_corrupt_image_met_in_training_is_named(tmp_path, capsys, num_workers):
    # Read where training meets it (no scan of every image up front), in this process or a DataLoader worker.
    data = make_images(tmp_path / "data")
    bad = data / "bee" / "2.png"
    bad.write_bytes(b"not a png")
    args = ["--dataset", "imagefolder", "--data-path", str(data), "--image-size", "8", "--model", "DiT-P/2",
            "--num-workers", num_workers, "--max-steps", "3", "--results-dir", str(tmp_path / "res")]
    assert core_train.main(CORE_TRAIN + args) == 2
    err = capsys.readouterr().err
    assert err.endswith(f"error: image {bad} cannot be read: not an image file PIL can identify\n")
    assert "Traceback" not in err


def test_an_image_that_does_not_read_names_its_file(tmp_path):
    from core.data import UnreadableImage, load_image

    good = make_images(tmp_path / "data") / "ant" / "0.png"
    assert load_image(good).size == (8, 8)
    cut = tmp_path / "cut.png"
    cut.write_bytes(good.read_bytes()[:60])  # a truncated PNG: PIL identifies it, then fails to decode it
    with pytest.raises(UnreadableImage, match=f"^image {cut} cannot be read: "):
        load_image(cut)
    # As a DataLoader worker's error reaches the main process: the class rebuilt from the worker's traceback.
    wrapped = UnreadableImage(f"Caught UnreadableImage in DataLoader worker process 0.\nOriginal Traceback (most "
                              f"recent call last):\n  File \"x.py\", line 1\ncore.data.UnreadableImage: image {cut} "
                              f"cannot be read: broken data stream\n")
    assert str(wrapped) == f"image {cut} cannot be read: broken data stream"


def checkpoint_of_two_steps(tmp_path):
    """A real checkpoint of the CORE_TRAIN run."""
    assert core_train.main(CORE_TRAIN + ["--results-dir", str(tmp_path / "run"), "--resume", "none"]) == 0
    return tmp_path / "run" / "DiT-P-4" / "checkpoints" / "step-000000002"


def test_core_train_refuses_a_fresh_start_among_an_earlier_runs_checkpoints(tmp_path, capsys):
    # Pruning keeps the newest steps, whoever saved them: the fresh run's first checkpoints went at once, and a
    # resume after a stop went on from the earlier run's.
    good = checkpoint_of_two_steps(tmp_path)
    capsys.readouterr()
    before = snapshot(tmp_path)
    assert core_train.main(CORE_TRAIN + ["--results-dir", str(tmp_path / "run"), "--resume", "none"]) == 2
    assert capsys.readouterr().err == (
        f"error: {good.parent} holds checkpoints of an earlier run (step-000000002): a fresh start would save its own "
        "among them, and keeping the newest would delete its own; resume from them (--resume auto), train into "
        "another --results-dir, or move them away\n")
    assert snapshot(tmp_path) == before
    assert core_train.main(CORE_TRAIN + ["--results-dir", str(tmp_path / "run"), "--max-steps", "3"]) == 0  # auto
    assert [p.name for p in ckpt.list_checkpoints(good.parent)] == ["step-000000002", "step-000000003"]


def test_malformed_trainer_state_given_to_core_train(tmp_path, capsys):
    import json

    good = checkpoint_of_two_steps(tmp_path)
    state_file = good / "trainer_state.json"
    state = json.loads(state_file.read_text())
    cases = {
        "[]": "is corrupt: it holds a JSON list, not an object",
        json.dumps({k: v for k, v in state.items() if k != "step"}): 'is corrupt: it has no "step"',
        json.dumps({**state, "step": "2"}): "is corrupt: \"step\" is '2', not a whole number >= 0",
        json.dumps({**state, "sampler": {"epoch": 0}}): 'is corrupt: "sampler" has no "batch"',
        json.dumps({**state, "history": {}}): 'is corrupt: "history" is {}, not a list of objects',
        json.dumps({**state, "config": "x"}): "is corrupt: \"config\" is 'x', not an object",
        # Passed unchecked, these failed after the whole set-up, with a TypeError naming no file.
        json.dumps({**state, "history": [1, 2]}): 'is corrupt: "history" is [1, 2], not a list of objects',
        json.dumps({**state, "log_window": []}): ('is corrupt: "log_window" is [], not an object of numbers "loss", '
                                                  '"steps" and "time_s"'),
        json.dumps({**state, "log_window": {"loss": "0.3"}}): ('is corrupt: "log_window" is {\'loss\': \'0.3\'}, '
                                                               'not an object of numbers "loss", "steps" and "time_s"'),
        json.dumps({**state, "zero_stage": "2"}): "is corrupt: \"zero_stage\" is '2', not 0, 1, 2 or 3",
        json.dumps({**state, "world_size": 0}): 'is corrupt: "world_size" is 0, not a whole number >= 1',
    }
    for text, problem in cases.items():
        state_file.write_text(text)
        capsys.readouterr()
        before = snapshot(tmp_path)
        assert core_train.main(CORE_TRAIN + ["--results-dir", str(tmp_path / "x"), "--resume", str(good)]) == 2
        assert capsys.readouterr().err.endswith(f"error: {state_file} {problem}\n"), text
        assert snapshot(tmp_path) == before
    with pytest.raises(ckpt.CheckpointError, match="it holds a JSON number"):
        state_file.write_text("3")
        ckpt.read_trainer_state(good)


def test_a_checkpoint_of_another_batch_size_is_named(tmp_path, capsys):
    good = checkpoint_of_two_steps(tmp_path)
    capsys.readouterr()
    argv = CORE_TRAIN + ["--global-batch-size", "16", "--results-dir", str(tmp_path / "x"), "--resume", str(good)]
    assert core_train.main(argv) == 2
    assert capsys.readouterr().err.endswith(f"error: {good} was written by a run with other settings: batch_size 8 "
                                            "(now 16); resume with its settings, or train this one in another folder\n")
    # A checkpoint from before the run's settings were kept in it: its sampler still names the batch size.
    state = json.loads((good / "trainer_state.json").read_text())
    del state["config"]
    (good / "trainer_state.json").write_text(json.dumps(state))
    assert core_train.main(argv) == 2
    assert capsys.readouterr().err.endswith(f"error: {good / 'trainer_state.json'} does not match this run's data: "
                                            "sampler state has global_batch=8, this sampler has 16\n")


def test_a_trainer_state_whose_step_is_not_the_engines_is_named(tmp_path, capsys):
    # trainer_state.json is outside the checksums (it may be edited by hand): a step changed there resumed with another
    # step's data position and randomness on the weights of step 2, unnoticed.
    good = checkpoint_of_two_steps(tmp_path)
    state = json.loads((good / "trainer_state.json").read_text())
    state["step"], state["sampler"]["batch"] = 1, 1
    (good / "trainer_state.json").write_text(json.dumps(state))
    capsys.readouterr()
    argv = CORE_TRAIN + ["--max-steps", "4", "--results-dir", str(tmp_path / "x"), "--resume", str(good)]
    assert core_train.main(argv) == 2
    assert capsys.readouterr().err.endswith(f"error: {good / 'trainer_state.json'} says step 1, but the weights and "
                                            "optimizer states there were saved at step 2\n")


def test_a_sampler_position_past_its_epoch_is_named(tmp_path, capsys):
    # It passed, and the first batch's indexing failed with an IndexError traceback.
    good = checkpoint_of_two_steps(tmp_path)
    state = json.loads((good / "trainer_state.json").read_text())
    state["sampler"]["batch"] = 1_000_000
    (good / "trainer_state.json").write_text(json.dumps(state))
    capsys.readouterr()
    assert core_train.main(CORE_TRAIN + ["--results-dir", str(tmp_path / "x"), "--resume", str(good)]) == 2
    assert capsys.readouterr().err.endswith(f"error: {good / 'trainer_state.json'} does not match this run's data: "
                                            "sampler state has batch=1000000, not one of this sampler's 187 "
                                            "batches an epoch (0..186)\n")


@pytest.mark.parametrize("error", [core_train.TrainingDiverged(7, float("nan")),
                                   OSError(28, "No space left on device", "/res/step-000000002")])
def test_core_train_says_why_a_run_ended_in_one_line(tmp_path, capsys, monkeypatch, error):
    # A divergence, or a disk full while saving, printed a traceback.
    def fails(*args, **kwargs):
        raise error

    monkeypatch.setattr(core_train, "train", fails)
    assert core_train.main(CORE_TRAIN + ["--results-dir", str(tmp_path / "res")]) == 1
    assert capsys.readouterr().err == f"error: {error}\n"


def test_core_trains_errors_reach_the_driver_whole():
    # Ray hands a worker's exception to the driver pickled: the message must survive the trip.
    import pickle

    from core.train import ConfigError

    error = pickle.loads(pickle.dumps(ConfigError("model", "DiT-Q/2", "must be a name in core.models.DiT_models")))
    assert isinstance(error, ConfigError) and (error.field, error.value) == ("model", "DiT-Q/2")
    assert str(error) == "model 'DiT-Q/2': must be a name in core.models.DiT_models"
    diverged = pickle.loads(pickle.dumps(core_train.TrainingDiverged(7, float("nan"))))
    assert (diverged.step, str(diverged)) == (7, "training diverged at step 7: loss nan")


def test_train_config_refuses_values_outside_their_range():
    from core.train import TrainConfig

    with pytest.raises(ValueError, match="^batch_size 0: must be an integer >= 1$"):
        TrainConfig(batch_size=0)
    with pytest.raises(ValueError, match=r"^ema_decay 1.0: must be a finite number in \[0, 1\)$"):
        TrainConfig(ema_decay=1.0)
    with pytest.raises(ValueError, match="^diffusion_steps 20: must be an integer in 21..100000"):
        TrainConfig(diffusion_steps=20)
    with pytest.raises(ValueError, match=r"^betas \(0.9, 1.5\): must be two numbers in \[0, 1\)$"):
        TrainConfig(betas=(0.9, 1.5))
    with pytest.raises(ValueError, match="^precision 'fp16': must be one of 'fp32', 'tf32', 'bf16'$"):
        TrainConfig(precision="fp16")
    with pytest.raises(ValueError, match="^batch_size True: must be an integer >= 1$"):
        TrainConfig(batch_size=True)
    assert TrainConfig(seed=core_train.MAX_SEED, max_steps=core_train.MAX_STEPS).seed == core_train.MAX_SEED
    with pytest.raises(ValueError, match=f"^seed {core_train.MAX_SEED + 1}: must be an integer in 0..{core_train.MAX_SEED}$"):
        TrainConfig(seed=core_train.MAX_SEED + 1)


def test_every_seed_and_step_draws_and_no_two_share_their_noise():
    # step_seed seeds step s < 1_000_003 with seed * 1_000_003 + s (as before: earlier runs resume as they drew); past
    # it that product was seed + 1's step s - 1_000_003, and a seed sweep's runs shared their noise from there on.
    import torch

    from core.train import MAX_SEED, MAX_STEPS, SEED_STRIDE, step_randomness, step_seed

    def draw(seed, step):
        return step_randomness(seed, step, 2, (1, 2, 2), 0.1, 1000, torch.device("cpu"))

    assert MAX_SEED == 18_446_687_733_646 and MAX_STEPS == 10**12 and SEED_STRIDE == 1_000_003
    assert [step_seed(s, k) for s, k in ((0, 0), (1, 5), (7, SEED_STRIDE - 1))] == [0, 1_000_008, 8_000_023]
    for seed, step in ((MAX_SEED, MAX_STEPS - 1), (MAX_SEED, SEED_STRIDE - 1), (0, 0)):
        t, noise, drop = draw(seed, step)
        again = draw(seed, step)
        assert t.shape == (2,) and noise.shape == (2, 1, 2, 2) and drop.shape == (2,) and noise.isfinite().all()
        assert all(torch.equal(a, b) for a, b in zip((t, noise, drop), again))  # a function of (seed, step)
    assert not torch.equal(draw(0, SEED_STRIDE + 5)[1], draw(1, 5)[1])
    later = [step_seed(s, k) for s in (0, 1, 2, MAX_SEED) for k in (SEED_STRIDE, SEED_STRIDE + 1, 7_000_000)]
    assert len(set(later)) == len(later) and all(0 <= v < 2**64 for v in later)


def test_output_in_use_by_another_driver(tmp_path, capsys, monkeypatch):
    import ray

    out = tmp_path / "out"
    out.mkdir()
    path = write(tmp_path, BASE + f"output: {out}\n")
    held = scaling_run.lock_output(out)  # as a driver running this study holds it

    def no_ray(*args, **kwargs):
        raise AssertionError("a second driver of a running study started Ray before finding the output locked")
    monkeypatch.setattr(ray, "init", no_ray)
    try:
        before = snapshot(tmp_path)
        # In this process too: flock locks belong to an open file, not to a process, so this driver's own
        # open of the lock file conflicts with `held` as another process's would. A file opened for writing, not the
        # folder: NFS takes flock as a POSIX lock, which a folder opened read-only cannot have (it ran unguarded).
        assert (out / scaling_run.OUTPUT_LOCK).is_file()
        assert scaling_run.main([str(path)]) == 2
        err = capsys.readouterr().err
        assert (f"error: {line_of(path, 'output')}: output: {out} is in use by another scaling.run of this study (its "
                "driver still runs) or a scaling.replay_mlflow of it;") in err, err[-2000:]  # which take the same lock
        assert snapshot(tmp_path) == before
    finally:
        os.close(held)
    # The lock goes with its holder: then the folder is free again.
    again = scaling_run.lock_output(out)
    assert again is not None
    os.close(again)


def test_a_trial_larger_than_the_cluster_exits_2_and_leaves_no_output(tmp_path, capsys):
    out = tmp_path / "new" / "out"  # its parent made for it too
    path = write(tmp_path, BASE + f"output: {out}\n")
    before = snapshot(tmp_path)
    # The local Ray holds this machine's CPUs; no node could place a trial of 4096.
    assert scaling_run.main([str(path), "--set", "resources.cpus_per_worker=4096"]) == 2
    err = capsys.readouterr().err
    assert "resources.cpus_per_worker: a trial needs 1 × 4096 = 4096 CPUs, the cluster has" in err, err[-2000:]
    assert not out.parent.exists() and snapshot(tmp_path) == before
    # An output that exists already keeps nothing of the run either: not the lock file it made.
    out.mkdir(parents=True)
    before = snapshot(tmp_path)
    assert scaling_run.main([str(path), "--set", "resources.cpus_per_worker=4096"]) == 2
    capsys.readouterr()
    assert snapshot(tmp_path) == before and list(out.iterdir()) == []


def test_unreadable_results_in_the_output_of_a_study_to_resume(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.parquet").write_bytes(b"PAR1 cut short")
    path = write(tmp_path, BASE + f"output: {out}\n")
    before = snapshot(tmp_path)
    for extra in ([], ["--dry-run"]):
        assert scaling_run.main([str(path), *extra]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {line_of(path, 'output')}: output: {out / 'results.parquet'}: not a readable Parquet file (")
        assert err.rstrip().endswith("move it away to start the study afresh")
    assert snapshot(tmp_path) == before


def test_digits_classifier_refuses_bad_arguments_before_training(tmp_path, capsys, monkeypatch):
    from core import train_digits_classifier as tdc

    monkeypatch.setattr(tdc, "train", lambda *a: pytest.fail("trained before refusing its arguments"))
    blocker = tmp_path / "taken"
    blocker.write_text("a file where the weights' folder should go")
    cases = {
        ("--out", str(tmp_path)): f"--out {tmp_path}: is a folder; give the file to write",
        ("--out", str(blocker / "w.safetensors")): f"--out {blocker / 'w.safetensors'}: {blocker} is not a folder",
        ("--epochs", "0"): "--epochs 0: must be an integer >= 1",
        ("--epochs", "-1"): "--epochs -1: must be an integer >= 1",
        ("--seed", "-1"): f"--seed -1: must be an integer in 0..{2**64 - 1}",
        ("--seed", str(2**64)): f"--seed {2**64}: must be an integer in 0..{2**64 - 1}",
    }
    before = snapshot(tmp_path)
    for args, message in cases.items():
        assert tdc.main([*args]) == 2, args
        assert capsys.readouterr().err == f"error: {message}\n"
    assert snapshot(tmp_path) == before
    # A missing folder is made when the weights are written; the largest seed is torch's largest.
    assert tdc.out_problem(tmp_path / "new" / "w.safetensors") is None
    import torch

    assert torch.Generator().manual_seed(2**64 - 1).initial_seed() == 2**64 - 1


def test_digits_classifier_refuses_an_out_folder_it_cannot_write(tmp_path, capsys, monkeypatch):
    from core import train_digits_classifier as tdc

    monkeypatch.setattr(tdc, "train", lambda *a: pytest.fail("trained before refusing its arguments"))
    (tmp_path / "ro").mkdir(mode=0o500)
    # Unwritable even for root (CI runs as root, for whom permission bits do not count): the immutable flag.
    immutable = subprocess.run(["chattr", "+i", str(tmp_path / "ro")], capture_output=True).returncode == 0
    if not immutable and os.access(tmp_path / "ro", os.W_OK):
        pytest.skip("no way to make a folder unwritable here (root without chattr)")
    try:
        out = tmp_path / "ro" / "w.safetensors"
        assert tdc.main(["--out", str(out)]) == 2
        assert capsys.readouterr().err == f"error: --out {out}: {tmp_path / 'ro'} is not writable\n"
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", str(tmp_path / "ro")], capture_output=True)


def test_usage_lines_name_the_module_to_run(tmp_path, capsys):
    from core import train_digits_classifier as tdc
    from scaling import encode_latents

    with pytest.raises(SystemExit) as exit_:
        tdc.main(["--epochs", "x"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.startswith("usage: python -m core.train_digits_classifier [-h]")
    with pytest.raises(SystemExit) as exit_:
        encode_latents.main([])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.startswith("usage: python -m scaling.encode_latents [-h]")
    # At the command line: the folder --out names is refused with a message, no traceback, before any training.
    proc = subprocess.run([sys.executable, "-m", "core.train_digits_classifier", "--out", str(tmp_path)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert (proc.returncode, proc.stderr) == (2, f"error: --out {tmp_path}: is a folder; give the file to write\n")


@pytest.mark.parametrize("dataset", ["imagefolder", "latents"])
def test_core_train_names_a_missing_data_path(tmp_path, capsys, dataset):
    argv = ["--model", "DiT-P/4", "--dataset", dataset, "--image-size", "256", "--results-dir", str(tmp_path / "res")]
    assert core_train.main(argv) == 2
    assert capsys.readouterr().err == f"error: --data-path: required with --dataset {dataset} (a folder it reads)\n"
    assert not (tmp_path / "res").exists()


def hand_made_checkpoint(folder, step, **model_changes):
    """A checkpoint folder with a valid trainer_state.json of the CORE_TRAIN model (changed as given), nothing else."""
    from core.models import model_config

    mcfg = {**model_config("DiT-P/4", input_size=8, in_channels=1, num_classes=10), **model_changes}
    path = Path(folder) / ckpt.checkpoint_name(step)
    path.mkdir(parents=True)
    state = {"step": step, "train_time_s": 1.0, "sampler": {"epoch": 0, "batch": step}, "model_config": mcfg}
    (path / ckpt.STATE_FILE).write_text(json.dumps(state))
    return path


def test_a_checkpoint_of_another_model_names_the_fields_that_differ(tmp_path, capsys):
    other = hand_made_checkpoint(tmp_path / "other", 2, hidden_size=96, depth=4)
    before = snapshot(tmp_path)
    assert core_train.main(CORE_TRAIN + ["--results-dir", str(tmp_path / "x"), "--resume", str(other)]) == 2
    assert capsys.readouterr().err == (f"error: {other / ckpt.STATE_FILE} belongs to another model: depth 4 (now 2); "
                                       "hidden_size 96 (now 64)\n")
    assert snapshot(tmp_path) == before
    state = json.loads((other / ckpt.STATE_FILE).read_text())
    state["model_config"] = {**state["model_config"], "qk_norm": True}  # a field this version does not have
    del state["model_config"]["depth"]
    (other / ckpt.STATE_FILE).write_text(json.dumps(state))
    this = json.loads((hand_made_checkpoint(tmp_path / "this", 2) / ckpt.STATE_FILE).read_text())["model_config"]
    with pytest.raises(ckpt.CheckpointError, match=r"another model: hidden_size 96 \(now 64\); qk_norm True \(now "
                                                   r"absent\); depth absent \(now 2\)$"):
        ckpt.check_checkpoint(other, this)


def test_resume_auto_refuses_a_newest_checkpoint_without_its_trainer_state(tmp_path, capsys):
    # Checkpoints are renamed into place with their trainer_state.json: the newest without it was damaged, and
    # resuming from the one before would go back silently, then overwrite it.
    checkpoints = tmp_path / "res" / "DiT-P-4" / "checkpoints"
    hand_made_checkpoint(checkpoints, 2)
    newest = hand_made_checkpoint(checkpoints, 4)
    (newest / ckpt.STATE_FILE).unlink()
    before = snapshot(tmp_path)
    assert core_train.main(CORE_TRAIN + ["--max-steps", "6", "--results-dir", str(tmp_path / "res")]) == 2
    assert capsys.readouterr().err == (f"error: {newest / ckpt.STATE_FILE} is missing: {newest} is not a complete "
                                       "checkpoint; move it away to resume from the one before\n")
    assert snapshot(tmp_path) == before
    # An older one without it is what a prune killed mid-way leaves: passed over, never pruned as complete.
    (newest / ckpt.STATE_FILE).write_text("{}")
    (checkpoints / ckpt.checkpoint_name(2) / ckpt.STATE_FILE).unlink()
    assert ckpt.latest_checkpoint(checkpoints) == newest
    assert ckpt.list_checkpoints(checkpoints) == [newest]


def test_a_checkpoints_files_get_the_mode_of_a_normally_created_file(tmp_path):
    # safetensors writes the EMA weights private (0600), where DeepSpeed's and the trainer state's files are not.
    good = checkpoint_of_two_steps(tmp_path)
    umask = os.umask(0o022)
    os.umask(umask)
    modes = {p.name: p.stat().st_mode & 0o777 for p in good.rglob("*") if p.is_file()}
    assert modes[ckpt.EMA_FILE] == 0o666 & ~umask and set(modes.values()) == {0o666 & ~umask}, modes


@pytest.mark.parametrize("zero_stage, bf16, files", [
    (0, False, ["mp_rank_00_model_states.pt"]),
    (2, False, ["mp_rank_00_model_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"]),
    (2, True, ["mp_rank_00_model_states.pt", "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt"]),
    (3, False, ["zero_pp_rank_1_mp_rank_00_model_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"]),
])
def test_a_rank_finds_its_own_engine_files_whole_before_deepspeed_reads_them(tmp_path, zero_stage, bf16, files):
    # DeepSpeed's names (engine.py's _get_ckpt_name, _get_zero_ckpt_name). Under ZeRO-3 rank 1 found rank 0's module
    # states enough, and then failed inside DeepSpeed's loader, with no words, while rank 0 waited in its all-gather.
    import torch

    folder = tmp_path / ckpt.ENGINE_DIR / ckpt.ENGINE_TAG
    folder.mkdir(parents=True)
    assert ckpt.engine_files(zero_stage, 1, bf16) == files
    for name in files:
        torch.save({}, folder / name)
    assert ckpt._engine_file_problem(tmp_path, zero_stage, 1, bf16) is None
    for name in files:
        own = (folder / name).read_bytes()
        (folder / name).write_bytes(own[:-10])
        assert ckpt._engine_file_problem(tmp_path, zero_stage, 1, bf16) == (
            f"{folder / name} cannot be loaded: it is not a complete file torch.save wrote")
        # Gone, where another rank's stays (it is not this rank's).
        (folder / name).rename(folder / name.replace("pp_rank_1", "pp_rank_0") if "pp_rank_1" in name else
                               tmp_path / name)
        assert ckpt._engine_file_problem(tmp_path, zero_stage, 1, bf16) == (
            f"{folder / name} is missing: {tmp_path} is not a complete checkpoint")
        (folder / name).write_bytes(own)


def test_damaged_checkpoint_files_are_named_in_words(tmp_path, capsys):
    import torch

    good = checkpoint_of_two_steps(tmp_path)
    engine_file = next((good / ckpt.ENGINE_DIR).rglob("*.pt")).relative_to(good)
    rng_text = (good / "rng-rank0.pt").read_bytes()
    torch.save([1, 2], tmp_path / "list.pt")
    engine = str(engine_file)
    cases = [  # (the file, its bytes, what the error says after "cannot be loaded: ")
        ("rng-rank0.pt", b"junk" * 50, "it is not a complete file torch.save wrote\n"),  # was: a bare number
        ("rng-rank0.pt", rng_text[:300], "it is not a complete file torch.save wrote (PytorchStreamReader"),
        ("rng-rank0.pt", (tmp_path / "list.pt").read_bytes(), "it holds no torch RNG state\n"),
        (ckpt.EMA_FILE, b"junk" * 50, "it is not a complete file safetensors wrote ("),
        # DeepSpeed's error names no file (it said "a file in it"), or has no words at all (it said nothing).
        (engine, b"junk" * 50, "it is not a complete file torch.save wrote\n"),
        (engine, (good / engine).read_bytes()[:-100], "it is not a complete file torch.save wrote\n"),
        (engine, None, "{damaged}/%s is missing: {damaged} is not a complete checkpoint\n" % engine),
        (ckpt.ENGINE_DIR, None, "{damaged}/deepspeed/state is missing: {damaged} is not a complete checkpoint\n"),
    ]
    for name, data, problem in cases:
        damaged = tmp_path / "damaged"
        shutil.rmtree(damaged, ignore_errors=True)
        shutil.copytree(good, damaged)
        if data is None:
            shutil.rmtree(damaged / name) if (damaged / name).is_dir() else (damaged / name).unlink()
        else:
            (damaged / name).write_bytes(data)
        capsys.readouterr()
        before = snapshot(tmp_path)
        assert core_train.main(CORE_TRAIN + ["--results-dir", str(tmp_path / "x"), "--resume", str(damaged)]) == 2
        err = capsys.readouterr().err
        if data is None:
            assert err == f"error: {problem.format(damaged=damaged)}", err
        else:
            assert err.startswith(f"error: {damaged / name} cannot be loaded: {problem}"), err
        assert "Traceback" not in err
        assert snapshot(tmp_path) == before, name


def test_a_checkpoint_file_whose_bytes_changed_is_named_as_damaged(tmp_path, capsys):
    # One flipped byte in the model states, an optimizer shard, the EMA or the trainer state resumed without a word:
    # torch's zip reader and safetensors check no contents.
    zero_2 = CORE_TRAIN[:CORE_TRAIN.index("--zero-stage")] + ["--zero-stage", "2"] + CORE_TRAIN[
        CORE_TRAIN.index("--zero-stage") + 2:]
    assert core_train.main(zero_2 + ["--results-dir", str(tmp_path / "run"), "--resume", "none"]) == 0
    good = tmp_path / "run" / "DiT-P-4" / "checkpoints" / "step-000000002"
    record = json.loads((good / "checksums-rank0.json").read_text())
    assert {ckpt.EMA_FILE, "rng-rank0.pt"} <= set(record) and len(record) == len(
        [p for p in good.rglob("*") if p.is_file()]) - 2  # one process: every file but the record and trainer state
    engine = [name for name in record if name.startswith(ckpt.ENGINE_DIR)]
    assert any("model_states" in n for n in engine) and any("optim_states" in n for n in engine)
    for name in [*engine, ckpt.EMA_FILE, "rng-rank0.pt"]:
        damaged = tmp_path / "damaged"
        shutil.rmtree(damaged, ignore_errors=True)
        shutil.copytree(good, damaged)
        data = bytearray((damaged / name).read_bytes())
        data[len(data) // 2] ^= 0x10  # inside the tensors' bytes: every loader takes it
        (damaged / name).write_bytes(bytes(data))
        capsys.readouterr()
        assert core_train.main(zero_2 + ["--results-dir", str(tmp_path / "x"), "--resume", str(damaged)]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {damaged / name} is damaged: its contents are not those written (CRC-32 "), err
        assert err.endswith(f", checksums-rank0.json records {record[name]['crc32']})\n"), err
    assert core_train.main(zero_2 + ["--max-steps", "3", "--results-dir", str(tmp_path / "x"), "--resume",
                                         str(good)]) == 0  # the undamaged one resumes
    # Its record gone (a partial copy, a sync that skipped it): its files were no longer checked, a damaged one loaded.
    (good / "checksums-rank0.json").unlink()
    capsys.readouterr()
    assert core_train.main(zero_2 + ["--max-steps", "3", "--results-dir", str(tmp_path / "y"), "--resume",
                                     str(good)]) == 2
    assert capsys.readouterr().err == (f"error: {good / 'checksums-rank0.json'} is missing: {good} is not a complete "
                                       "checkpoint (its files cannot be checked for damage)\n")
    # A checkpoint from before the record (its trainer state without the mark) resumes as it did.
    state = json.loads((good / ckpt.STATE_FILE).read_text())
    assert state.pop(ckpt.CHECKSUMS_KEY) is True
    (good / ckpt.STATE_FILE).write_text(json.dumps(state))
    assert core_train.main(zero_2 + ["--max-steps", "3", "--results-dir", str(tmp_path / "y"), "--resume",
                                     str(good)]) == 0


@pytest.mark.skipif(unenterable() is None, reason="no folder that even this user cannot enter")
def test_an_image_folder_with_a_class_folder_this_user_cannot_enter(tmp_path, capsys):
    # The scan's PermissionError was a traceback, exit 1 (scaling.encode_latents: exit 1 with no folder named).
    data = tmp_path / "data"
    data.mkdir()
    (data / "locked").symlink_to(unenterable().parent)
    argv = ["--model", "DiT-P/4", "--dataset", "imagefolder", "--data-path", str(data), "--image-size", "8",
            "--max-steps", "2", "--results-dir", str(tmp_path / "res")]
    assert core_train.main(argv) == 2
    assert capsys.readouterr().err == f"error: image folder {data} cannot be read (Permission denied: {data / 'locked'})\n"
    assert not (tmp_path / "res").exists()


@pytest.mark.skipif(unenterable() is None, reason="no folder that even this user cannot enter")
def test_a_folder_inside_a_class_that_this_user_cannot_enter_is_named_not_skipped(tmp_path):
    # torchvision's walk skips a folder it cannot enter without a word: FID's reference lost those images, training
    # the class's part there (or the class, refused as "without images" though it holds them).
    from PIL import Image

    from core.data import scan_image_folder
    from core.real_images import real_image_files

    data = tmp_path / "data"
    for name in ("a", "b"):
        (data / name).mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(data / name / "x.png")
    (data / "b" / "more").symlink_to(unenterable().parent)
    for scan in (scan_image_folder, real_image_files):
        with pytest.raises(ValueError) as err:
            scan(data)
        assert str(err.value) == f"image folder {data} cannot be read (Permission denied: {data / 'b' / 'more'})"


@pytest.mark.skipif(unenterable() is None, reason="no folder that even this user cannot enter")
def test_digits_classifier_names_an_out_it_cannot_reach(capsys, monkeypatch):
    # Python 3.11's Path.is_dir() raises in a folder this user cannot enter: a traceback, not a message.
    from core import train_digits_classifier as tdc

    monkeypatch.setattr(tdc, "train", lambda *a: pytest.fail("trained before refusing its arguments"))
    out = unenterable() / "w.safetensors"
    assert tdc.main(["--out", str(out)]) == 2
    assert capsys.readouterr().err.startswith(f"error: --out {out}: cannot be reached (Permission denied: ")


def test_a_study_this_machine_cannot_run_is_said_by_the_dry_run(tmp_path, capsys, monkeypatch):
    # The run refuses it ("a trial needs 4 CPUs, the cluster has 2"); the dry run planned it "one trial at a time on
    # this machine" without a word.
    import os

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    cpus = len(os.sched_getaffinity(0))
    workers = cpus + 1
    path = write(tmp_path, BASE.replace("workers_per_trial: 1", f"workers_per_trial: {workers}")
                 .replace("batch_size: 32", f"batch_size: {8 * workers}") + f"output: {tmp_path / 'out'}\n")
    assert scaling_run.main([str(path), "--dry-run"]) == 0
    err = capsys.readouterr().err
    assert (f"warning: {line_of(path, 'resources')}: resources.cpus_per_worker: a trial needs {workers} × 1 = {workers} CPUs, the cluster "
            f"has {cpus} (on this machine, where a run without --address starts its own Ray)\n") in err, err
    assert scaling_run.main([str(path), "--dry-run", "--address", "auto"]) == 0  # planned for a cluster: not said
    assert "cluster has" not in capsys.readouterr().err
