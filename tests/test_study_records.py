"""What a study writes to is checked before launch: a resumed study's Parquet files and SQLite store must read, the
MLflow URI must name a store MLflow has, and the report folder must be one a report may replace; else exit 2 with
nothing written."""
import dataclasses
import json
import re
import shutil
import sqlite3

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from scaling import run as scaling_run
from scaling.results import RESULTS_SCHEMA, to_table, write_table
from scaling.study import StudyError
from test_bad_input import snapshot
from test_results import row
from test_study import BASE, STUDIES, line_of, load, write


def study_with_output(tmp_path, extra=""):
    out = tmp_path / "out"
    out.mkdir()
    return write(tmp_path, BASE + f"output: {out}\n" + extra), out


@pytest.mark.parametrize("damage", ["curves cut short", "results a folder", "store not a database",
                                    "curves of another table", "curves without steps", "a result without its trial",
                                    "two results at one step", "results with a column of their own"])
def test_damaged_records_of_a_study_to_resume(tmp_path, capsys, damage):
    # Each read fine as Parquet and then stopped the driver at a trial's first milestone, after Ray's start, or lost
    # one of two rows at a step without a word.
    path, out = study_with_output(tmp_path)
    if damage == "curves cut short":
        bad, reason = out / "loss_curves.parquet", "not a readable Parquet file ("
        bad.write_bytes(b"PAR1 cut short")
    elif damage == "curves of another table":
        bad, reason = out / "loss_curves.parquet", "columns this version does not write: size, patch, params, "
        write_table([row()], bad, RESULTS_SCHEMA)
    elif damage == "curves without steps":
        bad, reason = out / "loss_curves.parquet", "column 'step' is empty (null) in 1 of 1 rows (row 0, trial a)"
        pq.write_table(pa.table({"trial_id": ["a"], "train_loss": [1.0]}), bad)
    elif damage == "a result without its trial":
        bad, reason = out / "results.parquet", "column 'trial_id' is empty (null) in 1 of 2 rows (row 1, step 2000)"
        write_table([row(), row(trial_id=None, step=2000)], bad, RESULTS_SCHEMA)
    elif damage == "two results at one step":
        bad, reason = out / "results.parquet", "trial abc has 2 different rows at step 1000 (rows 0 and 1; they differ "
        write_table([row(), row(fid=1.0)], bad, RESULTS_SCHEMA)
    elif damage == "results with a column of their own":  # a re-run's write dropped it, even with nothing to train
        bad, reason = out / "results.parquet", "columns this version does not write: note; the study's next write "
        pq.write_table(to_table([row()], RESULTS_SCHEMA).append_column("note", pa.array(["by hand"])), bad)
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
        assert err.startswith(f"error: {line_of(path, 'output')}: output: {bad}") and reason in err, err
        assert err.rstrip().endswith("move it away to start the study afresh")
    assert snapshot(tmp_path) == before


def test_a_given_store_that_cannot_be_read_is_named_by_its_own_field(tmp_path, capsys):
    # It was named as the output (whose line it gave), and a name too long for the file system was a traceback.
    other = tmp_path / "other.db"
    other.write_bytes(b"not a database, though long enough to have a header: " * 4)
    too_long = tmp_path / ("a" * 300) / "mlflow.db"
    for store, reason in ((other, "not an SQLite database (file is not a database)"), (too_long, "File name too long")):
        shutil.rmtree(tmp_path / "out", ignore_errors=True)
        path, out = study_with_output(tmp_path, f"tracking:\n  mlflow_uri: sqlite:///{store}\n")
        assert scaling_run.main([str(path), "--dry-run"]) == 2
        err = capsys.readouterr().err
        line = next(n for n, text in enumerate(path.read_text().splitlines(), 1) if "mlflow_uri:" in text)
        assert err.startswith(f"error: {path}:{line}: tracking.mlflow_uri: {store}: {reason}"), err


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
        f"http(s)://host:port, sqlite:///path or a database URI (sqlite, postgresql, mysql, mssql)\n")
    assert snapshot(tmp_path) == before
    path = write(tmp_path, BASE + f"output: {out}\n", name="env.yaml")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    assert scaling_run.main([str(path)]) == 2
    assert capsys.readouterr().err.startswith(f"error: MLFLOW_TRACKING_URI: MLflow has no tracking store for {uri!r}")


@pytest.mark.parametrize("uri, reason", [
    ("http://localhost:abc", "no MLflow tracking server answers at http://localhost:abc (nonnumeric port: 'abc')"),
    ("postgresql://someone:secret@db:notaport/mlflow", "not a database URI (invalid literal for int() with base 10: "
                                                       "'notaport')"),
    ("sqlite:////dev/null/mlflow.db", "MLflow cannot use the store sqlite:////dev/null/mlflow.db (/dev/null is not a "
                                      "folder)"),
    # Its driver (psycopg) not installed here; where it is, nothing listens on port 1: either way, before launch.
    ("postgresql://someone:secret@127.0.0.1:1/mlflow", "cannot open the database at "
                                                       "postgresql://someone:***@127.0.0.1:1/mlflow ("),
])
def test_tracking_store_that_cannot_be_reached_is_refused_before_launch(tmp_path, capsys, uri, reason):
    # Each failed only after Ray's start, with a traceback (http.client.InvalidURL; psycopg2 missing); a database's
    # password stays out of the message.
    path, out = study_with_output(tmp_path, f"tracking:\n  mlflow_uri: {uri}\n")
    shutil.rmtree(out)
    before = snapshot(tmp_path)
    assert scaling_run.main([str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {path}:{BASE.count(chr(10)) + 3}: tracking.mlflow_uri: {reason}"), err
    assert err.count("\n") == 1 and "secret" not in err
    assert snapshot(tmp_path) == before


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


def study_with_fid_files(tmp_path, measured=1):
    """A study of DiT-P on digits whose FID reads a reference folder, a held-out folder and a copy of the digits
    extractor's weights, with rows at each trial's first `measured` milestones recording what they were measured
    against now; returns (study file, study, output)."""
    import json
    import shutil
    from datetime import datetime, timezone

    import torch

    from core.digits import digits_arrays
    from core.evaluate import fid_basis_now
    from core.fid import resolve_extractor
    from core.real_images import to_uint8
    from scaling.ray_trial import eval_config
    from scaling.results import RESULTS_SCHEMA, write_table
    from scaling.study import load_study
    from test_evaluate import write_folder

    images, labels = digits_arrays("train")
    images = to_uint8(torch.from_numpy(images[:40]))
    write_folder(tmp_path / "real", images[:30], labels[:30])
    write_folder(tmp_path / "held", images[30:39], labels[30:39])
    shutil.copy(resolve_extractor("digits")[1], tmp_path / "digits.safetensors")
    path, out = study_with_output(tmp_path)
    files = "".join(f"  {k}: {tmp_path / v}\n" for k, v in (("reference", "real"), ("heldout", "held"),
                                                            ("feature_extractor_weights", "digits.safetensors")))
    path.write_text(path.read_text().replace("  fid_samples: 100\n", "  fid_samples: 100\n" + files).replace(
        "model: [DiT-P, DiT-N]", "model: [DiT-P]"))
    study = load_study(path)
    rows = []
    for t in study.trials:
        basis = fid_basis_now(eval_config(t.to_dict(), out / "fid_cache"), "digits", input_size=8)
        rows += [dict(study=study.name, trial_id=t.trial_id, model=t.model, step=s, max_step=t.train["max_steps"],
                      status="ok", fid=30.0, fid_basis=basis, timestamp=datetime.now(timezone.utc),
                      config_json=json.dumps(t.to_dict(), sort_keys=True)) for s in t.milestones[:measured]]
    write_table(rows, out / "results.parquet", RESULTS_SCHEMA)
    return path, study, out


def rewrite(tmp_path, part):
    """The folder or file of a part of the FID basis, written again in place."""
    import torch

    from core.digits import digits_arrays
    from core.real_images import to_uint8
    from test_evaluate import write_folder

    images, labels = digits_arrays("train")
    images = to_uint8(torch.from_numpy(images[39:40]))
    if part == "weights":  # other weights at the same path
        from safetensors.torch import load_file, save_file

        weights = load_file(tmp_path / "digits.safetensors")
        first = next(iter(weights))
        save_file({**weights, first: weights[first] * 1.01}, tmp_path / "digits.safetensors")
    else:
        write_folder(tmp_path / ("real" if part == "reference" else "held"), images, labels[39:40])


@pytest.mark.parametrize("part", ["reference", "heldout", "weights"])
def test_fids_measured_against_files_rewritten_since_stop_the_study(tmp_path, capsys, part):
    # A reference folder regenerated in place keeps its path (which trial ids hash): rows measured against the earlier
    # files are refused before launch (a dry run warns), naming the setting and the trials, not mixed with new FIDs.
    from scaling.results import load_results

    path, study, out = study_with_fid_files(tmp_path)
    assert scaling_run.check_fid_basis(study, load_results(out)) == []  # measured against these very files
    rewrite(tmp_path, part)
    before = snapshot(tmp_path)
    assert scaling_run.main([str(path), "--no-report"]) == 2
    error = capsys.readouterr().err
    setting, files = {
        "reference": ("reference", f"eval.reference at {tmp_path / 'real'}: other images, names, sizes or "
                                   f"modification times"),
        "heldout": ("heldout", f"eval.heldout at {tmp_path / 'held'}: other images, names, sizes or modification "
                               f"times"),
        "weights": ("feature_extractor_weights", f"eval.feature_extractor_weights at "
                                                 f"{tmp_path / 'digits.safetensors'}: other contents")}[part]
    ids = ", ".join(sorted(t.trial_id for t in study.trials))
    assert error == (f"error: {study.locate('eval.' + setting)}: eval.{setting}: what FID is measured against changed "
                     f"since trial(s) {ids} measured theirs ({files}), so their FIDs and those of the trials still to "
                     f"measure would not be comparable; put the earlier files back, or give the study another output "
                     f"to measure it afresh\n")
    assert snapshot(tmp_path) == before
    assert scaling_run.main([str(path), "--dry-run"]) == 0
    assert "warning: " + error.removeprefix("error: ") in capsys.readouterr().err


def test_fids_decoded_by_a_vae_rewritten_since_stop_the_study(tmp_path, encode_tiny_latents, inception_weights):
    # A latent study's samples are decoded by eval.vae before FID sees them: weights written again at its path kept
    # the trials' ids and basis, and a resumed study mixed FIDs of two decoders.
    import json
    from datetime import datetime, timezone

    import torch
    from safetensors.torch import load_file, save_file

    from core.digits import digits_arrays
    from core.evaluate import fid_basis_now
    from core.real_images import to_uint8
    from scaling.ray_trial import eval_config
    from scaling.results import load_results
    from scaling.study import load_study
    from test_data import save_tiny_vae
    from test_evaluate import write_folder

    encode_tiny_latents(tmp_path / "latents", 0)  # 16 images of 32 pixels as 4×4×4 latents, 2 classes
    save_tiny_vae(tmp_path / "vae")
    images, labels = digits_arrays("train")
    write_folder(tmp_path / "real", to_uint8(torch.from_numpy(images[:20])), labels[:20])
    out = tmp_path / "out"
    path = write(tmp_path, BASE.replace("dataset: digits", f"dataset: latents\n  path: {tmp_path / 'latents'}")
                 .replace("model: [DiT-P, DiT-N]", "model: [DiT-P]").replace("patch: [2, 4]", "patch: [2]")
                 .replace("  fid_samples: 100\n", f"  fid_samples: 100\n  vae: {tmp_path / 'vae'}\n  reference: "
                          f"{tmp_path / 'real'}\n  grid_images_per_class: 0\n  feature_extractor: inception-v3-compat\n"
                          f"  feature_extractor_weights: {inception_weights}\n") + f"output: {out}\n")
    study = load_study(path, check_data=False)

    def rows(drop_decoder=False):
        found = []
        for t in study.trials:
            basis = json.loads(fid_basis_now(eval_config(t.to_dict(), out / "fid_cache"), "latents", t.data["path"],
                                             None, t.model_config["input_size"], t.eval["vae"]))
            assert ("decoder" in basis) is True
            if drop_decoder:  # as rows from before the decoder was recorded
                del basis["decoder"]
            found += [dict(study=study.name, trial_id=t.trial_id, model=t.model, step=t.milestones[0],
                           max_step=t.train["max_steps"], status="ok", fid=30.0, fid_basis=json.dumps(basis),
                           timestamp=datetime.now(timezone.utc), config_json=json.dumps(t.to_dict(), sort_keys=True))]
        write_table(found, out / "results.parquet", RESULTS_SCHEMA)

    out.mkdir()
    rows()
    assert scaling_run.check_fid_basis(study, load_results(out)) == []  # decoded by this very VAE
    weights = next((tmp_path / "vae").glob("*.safetensors"))
    state = load_file(weights)
    first = next(iter(state))
    save_file({**state, first: state[first] * 1.01}, weights)  # other weights at the same path
    ids = ", ".join(sorted(t.trial_id for t in study.trials))
    with pytest.raises(StudyError, match=re.escape(
            f"eval.vae: what FID is measured against changed since trial(s) {ids} measured theirs (eval.vae at "
            f"{tmp_path / 'vae'}, which decodes the samples: other files or contents)")):
        scaling_run.check_fid_basis(study, load_results(out))
    rows(drop_decoder=True)  # a row that recorded no decoder is compared without one: a resume goes on
    assert scaling_run.check_fid_basis(study, load_results(out)) == []


@pytest.mark.parametrize("case", ["finished", "fid off", "no basis", "malformed basis", "unreadable"])
def test_fids_that_are_not_compared(tmp_path, capsys, case):
    import json

    from scaling.results import RESULTS_SCHEMA, load_results, write_table
    from scaling.study import load_study

    path, study, out = study_with_fid_files(tmp_path, measured=3 if case == "finished" else 1)
    rewrite(tmp_path, "reference")
    rows = load_results(out)
    if case == "fid off":  # the trials measure no FID any more: nothing to mix (their ids are new: kept here)
        path.write_text(path.read_text().replace("  fid_samples: 100\n", "  fid_samples: 100\n  fid: false\n"))
        study.trials[:] = [dataclasses.replace(t, trial_id=old.trial_id)
                           for t, old in zip(load_study(path).trials, study.trials)]
    if case in ("no basis", "malformed basis"):  # rows from before 2026-12-05; a hand-edited one
        rows["fid_basis"] = None if case == "no basis" else json.dumps([1, 2])
        write_table(rows, out / "results.parquet", RESULTS_SCHEMA)
    if case == "unreadable":  # the driver does not see the folder (a dry run elsewhere, a head node without the mount)
        shutil.rmtree(tmp_path / "real")
    warnings = scaling_run.check_fid_basis(study, load_results(out))
    if case == "unreadable":
        assert len(warnings) == 1 and warnings[0].startswith(f"{path}: eval: what FID is measured against cannot be "
                                                              f"read here (") and "were not checked" in warnings[0]
        capsys.readouterr()
        assert scaling_run.main([str(path), "--dry-run"]) == 0  # a plan for another machine says so too
        assert f"warning: {warnings[0]}" in capsys.readouterr().err
    else:
        assert warnings == []


def test_room_is_asked_for_the_checkpoints_a_trial_holds_at_once_not_more_than_it_writes():
    # keep_checkpoints 100000 asked for room for 100001 checkpoints a trial: the default study refused on any disk.
    from scaling.study import load_study

    def on_disk(*overrides):
        study = load_study(STUDIES / "gflops_sweep.yaml", list(overrides), check_data=False)
        assert [t.milestones for t in study.trials] == [(400, 800, 1600)] * 6
        return {scaling_run.checkpoints_on_disk(t) for t in study.trials}
    assert on_disk("train.keep_checkpoints=100000") == {3}  # 400, 800 and 1600 (ckpt_every 800)
    assert on_disk("train.keep_checkpoints=100000", "train.ckpt_every=300") == {8}  # 300 ... 1500, 400, 800, 1600
    assert on_disk("train.keep_checkpoints=2", "train.ckpt_every=300") == {3}  # two kept and one being written
    assert on_disk("train.keep_checkpoints=1", "train.ckpt_every=5000") == {2}


def test_room_is_asked_for_the_checkpoints_of_the_trials_still_to_train(tmp_path, monkeypatch):
    # A finished study asked for room for every trial's checkpoints again, to do no more than build its report.
    import collections

    from scaling.study import load_study

    path, out = study_with_output(tmp_path)
    study = load_study(path)
    finished, left = study.trials[0], study.trials[1:]
    write_table([row(trial_id=finished.trial_id, step=m) for m in finished.milestones], out / "results.parquet",
                RESULTS_SCHEMA)
    records = scaling_run.check_results(study)
    keep = study.raw["train"]["keep_checkpoints"] + 1
    needed = scaling_run.MIN_FREE_BYTES + sum(scaling_run.checkpoint_bytes(t) * keep for t in left)
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(scaling_run.shutil, "disk_usage", lambda path: usage(2 * needed, needed, needed))
    scaling_run.check_output(study, records)
    monkeypatch.setattr(scaling_run.shutil, "disk_usage", lambda path: usage(2 * needed, needed, needed - 1))
    with pytest.raises(StudyError, match=f"the study's checkpoints need about {needed / 2 ** 30:.2f} GiB"):
        scaling_run.check_output(study, records)
    # A trial to resume holds checkpoints already (they are in "used"): room for the rest of those it holds at once,
    # and at least for the one it writes next. Each was asked for again: a resume refused where it fits.
    from core.checkpoint import STATE_FILE
    from scaling.trial_storage import ray_storage, train_run_name

    for t, held in zip(left, (keep - 1, keep + 1)):
        for k in range(held):
            folder = ray_storage(out) / train_run_name(t.trial_id) / f"checkpoint_{k}"
            folder.mkdir(parents=True)
            (folder / STATE_FILE).write_text('{"step": 10}')
    (ray_storage(out) / train_run_name(left[0].trial_id) / "checkpoint_cut").mkdir()  # a persist cut short: none
    resuming = needed - sum(scaling_run.checkpoint_bytes(t) * (keep - 1) for t in left[:2])
    monkeypatch.setattr(scaling_run.shutil, "disk_usage", lambda path: usage(2 * needed, needed, resuming))
    scaling_run.check_output(study, records)
    monkeypatch.setattr(scaling_run.shutil, "disk_usage", lambda path: usage(2 * needed, needed, resuming - 1))
    with pytest.raises(StudyError, match=f"the study's checkpoints need about {resuming / 2 ** 30:.2f} GiB"):
        scaling_run.check_output(study, records)


def test_checkpoints_of_another_number_of_processes_under_zero_are_refused_before_launch(tmp_path, capsys):
    # Moved to a cluster of another GPU count (resources are no part of a trial's id): every unfinished trial started
    # its workers, loaded its data, failed on its checkpoint's ZeRO shards, and again for each of Train's retries.
    from core.checkpoint import STATE_FILE
    from scaling.trial_storage import ray_storage, train_run_name

    out = tmp_path / "out"
    study = load(tmp_path, overrides=[f"output={out}", "train.zero_stage=2", "resources.workers_per_trial=1"])
    trial = study.trials[0]
    folder = ray_storage(out) / train_run_name(trial.trial_id)
    for k, step in enumerate((10, 20)):
        (folder / f"checkpoint_{k}").mkdir(parents=True)
        (folder / f"checkpoint_{k}" / STATE_FILE).write_text(json.dumps(
            {"step": step, "world_size": 2 if step == 20 else 1, "zero_stage": 2}))
    (folder / "checkpoint_cut").mkdir()  # a persist cut short: no trainer state
    with pytest.raises(StudyError) as err:
        scaling_run.check_checkpoint_processes(study)
    assert str(err.value) == (
        f"{study.locate('resources.workers_per_trial')}: resources.workers_per_trial: trial {trial.trial_id}'s "
        "checkpoint at step 20 was written by 2 processes with ZeRO-2, whose optimizer states do not resume on 1: set "
        f"workers_per_trial to 2 until it finishes, or delete {folder} to train it again from step 0")
    scaling_run.check_checkpoint_processes(load(tmp_path, overrides=[f"output={out}", "train.zero_stage=2",
                                                                      "resources.workers_per_trial=2"]))
    path = tmp_path / "study.yaml"  # load's
    assert scaling_run.main([str(path), "--set", f"output={out}", "--set", "train.zero_stage=2", "--dry-run"]) == 0
    assert "workers_per_trial to 2 until it finishes" in capsys.readouterr().err  # a dry run says it as a warning
    (folder / "checkpoint_1" / STATE_FILE).write_text(json.dumps({"step": 20, "world_size": 2, "zero_stage": 0}))
    scaling_run.check_checkpoint_processes(study)  # ZeRO-0's states are whole: any number resumes
