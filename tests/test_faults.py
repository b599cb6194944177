"""Faults in a study: a trial that keeps failing, an output that cannot hold the study (a diverging
trial: test_run's end-to-end study)."""
import os
import textwrap

import numpy as np
from PIL import Image

from scaling.results import load_results
from test_run import run


def study_file(tmp_path, body):
    path = tmp_path / "faults.yaml"
    path.write_text(textwrap.dedent(body).replace("OUT", str(tmp_path / "out")))
    return path, tmp_path / "out"


def test_trial_failing_after_its_retries_is_failed_and_the_study_finishes(tmp_path):
    data = tmp_path / "images"
    rng = np.random.default_rng(0)
    for label in ("a", "b"):
        (data / label).mkdir(parents=True)
        for i in range(8):
            Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(data / label / f"{i}.png")
    (data / "b" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    study, out = study_file(tmp_path, f"""\
        name: faults
        data: {{dataset: imagefolder, path: {data}, image_size: 8}}
        sweep: {{model: [DiT-P], patch: [4], steps: [20]}}
        train: {{batch_size: 8, ema_decay: 0.9, log_every: 5, ckpt_every: 10, val_batch: 0, num_workers: 0}}
        eval: {{fid: false}}
        resources: {{max_failures: 1}}
        output: OUT
        """)
    proc = run([study, "--report-dir", tmp_path / "report"])
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    df = load_results(out)
    assert (df.status == "failed").sum() == 1
    assert "broken.png" in df[df.status == "failed"].error.iloc[0]
    assert (tmp_path / "report" / "report.md").exists()  # the study still finishes and reports


def test_output_without_room_is_rejected_before_launch(tmp_path, monkeypatch, capsys):
    import shutil
    from collections import namedtuple

    from scaling import run as scaling_run

    study, out = study_file(tmp_path, """\
        name: faults
        data: {dataset: digits}
        sweep: {model: [DiT-P], patch: [4], steps: [10]}
        output: OUT
        """)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10 ** 9, 10 ** 9, 10 ** 6))
    assert scaling_run.main([str(study)]) == 2
    assert f"output: {out} has 0.00 GiB free; the study's checkpoints need about 0.20 GiB" in capsys.readouterr().err
    assert not out.exists()


def test_scratch_of_dead_workers_is_removed_when_a_worker_starts(tmp_path, monkeypatch):
    import subprocess
    import sys

    from scaling.ray_trial import scratch_dir

    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    killed = tmp_path / f"dit-DiT-T-2-0088a8191b-rank1-pid{int(dead.stdout)}-k1ll3d_x"  # a killed worker's
    alive = tmp_path / "dit-DiT-T-4-237f775f6a-rank0-pid1-w0rk1ng_"  # a running worker's (pid 1 always runs)
    other = tmp_path / "dit-notes"  # not a scratch folder
    for folder in (killed, alive, other):
        (folder / "step-000000800").mkdir(parents=True)
    new = scratch_dir("DiT-N-2-3594a07413", 0)
    assert new.parent == tmp_path and new.name.startswith(f"dit-DiT-N-2-3594a07413-rank0-pid{os.getpid()}-")
    assert not killed.exists() and alive.exists() and other.exists()


def test_a_checkpoint_that_does_not_load_fails_its_trial_at_once_naming_what_to_delete(tmp_path):
    # Each of Train's and Tune's retries started the workers, loaded the data and failed on the same damaged file (Ray
    # resumes from its latest registered checkpoint only); the trial now ends failed at the first, saying what to do.
    study, out = study_file(tmp_path, """\
        name: faults
        data: {dataset: digits}
        sweep: {model: [DiT-P], patch: [4], steps: [10]}
        train: {batch_size: 8, ema_decay: 0.9, log_every: 5, ckpt_every: 10, val_batch: 0, num_workers: 0}
        eval: {fid: false, grid_images_per_class: 0}
        resources: {max_failures: 2}
        output: OUT
        """)
    proc = run([study, "--no-report"])
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    (weights,) = (out / "ray").glob("train-*/checkpoint_*/deepspeed/state/mp_rank_00_model_states.pt")
    damaged = bytearray(weights.read_bytes())
    damaged[-100] ^= 0xFF  # the same size, another byte: only its checksum tells
    weights.write_bytes(bytes(damaged))
    proc = run([study, "--no-report", "--set", "sweep.steps=[10, 20]"])  # trains on from its checkpoint at 10
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    failed = load_results(out).query("status == 'failed'")
    (error,) = failed.error
    run_folder = weights.parents[3]
    assert error.startswith(f"resuming: {weights.parents[2]}") and error.endswith(  # its loader's words, or checksums'
        f"; delete {run_folder} to train this trial again from step 0"), error
