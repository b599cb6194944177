"""scaling.continuation: a trial given more steps goes on from its recorded run, when its measurements allow."""
import dataclasses
import json
import os
import shutil
import textwrap
from datetime import datetime, timezone
from types import SimpleNamespace

import pytest

from scaling import run as scaling_run
from scaling.continuation import continue_recorded_runs
from scaling.ray_trial import DataEncodeChanged, RayReporting, check_data_encode
from scaling.results import RESULTS_FILE, RESULTS_SCHEMA, load_results, measured_on_other_data, write_table
from scaling.study import load_study, training_lineage
from scaling.trial_storage import ray_storage, train_run_name


def study_at(tmp_path, steps, patches=(2, 4), latents=None, evals=None, **train):
    """A study of DiT-P at the patches, trained to each step count (train: fields over the defaults below; evals:
    eval fields) on digits or the latents folder given, in tmp_path/out."""
    train = {"batch_size": 32, "lr": 1e-3, **train}
    evals = {"fid": False, "grid_images_per_class": 0, **(evals or {})}
    data = {"dataset": "latents", "path": str(latents)} if latents else {"dataset": "digits"}
    path = tmp_path / f"study-{len(list(tmp_path.glob('study-*')))}.yaml"
    path.write_text(textwrap.dedent(f"""\
        name: grow
        data: {json.dumps(data)}
        sweep: {{model: [DiT-P], patch: {list(patches)}, steps: {list(steps)}}}
        train: {json.dumps(train)}
        eval: {json.dumps(evals)}
        output: {tmp_path / 'out'}
        """))
    return load_study(path)


def record(study, steps, status="ok"):
    """Rows of the study's trials at steps in its results.parquet, as the recorder writes them (config included)."""
    path = study.output / RESULTS_FILE
    old = load_results(path).to_dict("records") if path.exists() else []
    rows = [dict(study=study.name, trial_id=t.trial_id, model=t.model, patch=t.patch, params=t.params,
                 gflops=t.gflops, batch_size=32, step=s, max_step=t.train["max_steps"], train_compute=0.0,
                 val_loss=1.0, status=status, timestamp=datetime.now(timezone.utc),
                 config_json=json.dumps(t.to_dict(), sort_keys=True))
            for t in study.trials for s in steps]
    write_table(old + rows, path, RESULTS_SCHEMA)


def checkpoint(study, trial_id, *steps):
    """Checkpoint folders of a trial's Ray Train run, as Ray persists core's (its trainer state names the step)."""
    for step in steps:
        folder = ray_storage(study.output) / train_run_name(trial_id) / f"checkpoint_2026-12-05_13-00-{step:02d}"
        folder.mkdir(parents=True)
        (folder / "trainer_state.json").write_text(json.dumps({"step": step}))


def test_the_lineage_is_the_id_without_the_step_counts_and_the_data_path(tmp_path, encode_tiny_latents):
    short, long = study_at(tmp_path, (10, 20)), study_at(tmp_path, (10, 20, 40))
    for a, b in zip(short.trials, long.trials):
        assert a.trial_id != b.trial_id and training_lineage(a.to_dict()) == training_lineage(b.to_dict())
        # As results.parquet keeps it (config_json), the same.
        assert training_lineage(json.loads(json.dumps(b.to_dict(), sort_keys=True))) == training_lineage(b.to_dict())
    assert len({training_lineage(t.to_dict()) for t in long.trials}) == 2  # two patches: two trainings
    other_lr = study_at(tmp_path, (10, 20, 40), lr=2e-3)
    assert {training_lineage(t.to_dict()) for t in other_lr.trials}.isdisjoint(
        training_lineage(t.to_dict()) for t in long.trials)
    # A setting that changes no result changes neither the id nor the lineage.
    grid = study_at(tmp_path, (10, 20, 40), grad_checkpointing=True)
    assert [t.trial_id for t in grid.trials] == [t.trial_id for t in long.trials]
    # A cosine lr's steps depend on max_steps (a trial per step count): its lineage keeps them.
    cosine = [study_at(tmp_path, (steps,), patches=(2,), lr_schedule="cosine").trials[0] for steps in (20, 40)]
    assert training_lineage(cosine[0].to_dict()) != training_lineage(cosine[1].to_dict())
    # Where the data lies is in the id, not in the lineage (scaling.continuation compares the latents' encodes).
    for schedule in ("constant", "cosine"):
        here, there = tmp_path / f"{schedule}-here", tmp_path / f"{schedule}-there"
        encode_tiny_latents(here, seed=0)
        a = study_at(tmp_path, (10, 20), latents=here, lr_schedule=schedule).trials[0]
        here.rename(there)
        b = study_at(tmp_path, (10, 20), latents=there, lr_schedule=schedule).trials[0]
        assert a.trial_id != b.trial_id and a.data_encode == b.data_encode is not None
        assert training_lineage(a.to_dict()) == training_lineage(b.to_dict())


def test_a_study_given_more_steps_continues_its_recorded_trials(tmp_path):
    short = study_at(tmp_path, (10, 20))
    record(short, (10, 20))
    for t in short.trials:
        checkpoint(short, t.trial_id, 10, 20)
    long = study_at(tmp_path, (10, 20, 40))
    lines = continue_recorded_runs(long)
    assert [t.trial_id for t in long.trials] == [t.trial_id for t in short.trials]
    assert [t.milestones for t in long.trials] == [(10, 20, 40)] * 2 and long.trials[0].train["max_steps"] == 40
    assert lines[0].startswith(f"DiT-P/2: continues recorded trial {short.trials[0].trial_id} (steps 10, 20 "
                               f"measured, checkpoint at step 20) instead of training DiT-P-2-")
    # Fewer steps: the recorded trials hold every measurement already.
    fewer = study_at(tmp_path, (10,))
    continue_recorded_runs(fewer)
    assert [t.trial_id for t in fewer.trials] == [t.trial_id for t in short.trials]


def test_a_recorded_trial_without_a_checkpoint_is_said_to_train_again_from_step_0(tmp_path):
    # Its rows and MLflow run are taken over; the weights are not there to go on from ("continues" said otherwise).
    short = study_at(tmp_path, (10, 20), patches=(2,))
    record(short, (10, 20))
    long = study_at(tmp_path, (10, 20, 40), patches=(2,))
    new_id = long.trials[0].trial_id
    assert continue_recorded_runs(long) == [
        f"DiT-P/2: trains recorded trial {short.trials[0].trial_id} again from step 0 (steps 10, 20 measured, no "
        f"checkpoint left), under its id rather than as {new_id}"]
    assert long.trials[0].trial_id == short.trials[0].trial_id


def test_a_moved_output_folder_is_continued_where_it_is_now(tmp_path):
    # scaling.replay_mlflow reads a study's folder where it is now; its study.yaml names where it ran.
    short = study_at(tmp_path, (10, 20), patches=(2,))
    record(short, (10, 20))
    checkpoint(short, short.trials[0].trial_id, 20)
    long = study_at(tmp_path, (10, 20, 40), patches=(2,))
    moved = tmp_path / "moved"
    short.output.rename(moved)
    assert continue_recorded_runs(long) == [] and long.trials[0].trial_id != short.trials[0].trial_id
    continue_recorded_runs(long, moved)
    assert long.trials[0].trial_id == short.trials[0].trial_id


def test_a_milestone_added_before_the_checkpoint_trains_anew(tmp_path):
    short = study_at(tmp_path, (10, 20), patches=(2,))
    record(short, (10, 20))
    checkpoint(short, short.trials[0].trial_id, 20)
    between = study_at(tmp_path, (10, 15, 20, 40), patches=(2,))
    fresh_id = between.trials[0].trial_id
    lines = continue_recorded_runs(between)
    assert between.trials[0].trial_id == fresh_id
    assert lines == [f"DiT-P/2: trains from step 0 as {fresh_id}: recorded trial {short.trials[0].trial_id} of the "
                     f"same settings is past step 15, which it did not measure"]


def test_a_run_stopped_before_the_added_milestone_goes_on(tmp_path):
    # Measured at 10, checkpointed at 12, stopped: 15 is still ahead of it.
    short = study_at(tmp_path, (10, 20), patches=(2,))
    record(short, (10,))
    checkpoint(short, short.trials[0].trial_id, 10, 12)
    between = study_at(tmp_path, (10, 15, 20, 40), patches=(2,))
    assert continue_recorded_runs(between)[0].startswith(f"DiT-P/2: continues recorded trial "
                                                         f"{short.trials[0].trial_id} (steps 10 measured, checkpoint "
                                                         f"at step 12)")
    assert between.trials[0].trial_id == short.trials[0].trial_id


def test_the_run_that_reached_furthest_is_continued_and_only_once(tmp_path):
    first, second = study_at(tmp_path, (10,), patches=(2,)), study_at(tmp_path, (10, 20), patches=(2,))
    record(first, (10,))
    record(second, (10, 20))
    checkpoint(first, first.trials[0].trial_id, 10)
    checkpoint(second, second.trials[0].trial_id, 20)
    long = study_at(tmp_path, (10, 20, 40), patches=(2,))
    continue_recorded_runs(long)
    assert long.trials[0].trial_id == second.trials[0].trial_id


def test_a_diverged_run_is_continued_only_as_far_as_it_measured(tmp_path):
    short = study_at(tmp_path, (10, 20), patches=(2,))
    record(short, (10,))
    record(short, (14,), status="diverged")
    long = study_at(tmp_path, (10, 20, 40), patches=(2,))
    fresh_id = long.trials[0].trial_id
    assert continue_recorded_runs(long)[0].endswith(f"(steps 10 measured, diverged at step 14) instead of training "
                                                    f"{fresh_id} from step 0")
    assert long.trials[0].trial_id == short.trials[0].trial_id  # it diverges at step 14 again: the same result
    between = study_at(tmp_path, (10, 12, 20, 40), patches=(2,))
    continue_recorded_runs(between)
    assert between.trials[0].trial_id != short.trials[0].trial_id  # 12, before the divergence, was not measured
    # A trial that ends before the divergence ends ok, where the recorded run diverged: not that run's result.
    fewer = study_at(tmp_path, (10,), patches=(2,))
    assert continue_recorded_runs(fewer) == [
        f"DiT-P/2: trains from step 0 as {fewer.trials[0].trial_id}: recorded trial {short.trials[0].trial_id} of the "
        f"same settings diverged at step 14, after this trial's last step"]


def test_a_milestone_at_the_checkpoint_is_measured_when_the_trial_resumes(tmp_path):
    # The driver stopped after the checkpoint of milestone 20 reached storage, before its row: a trial resumed from
    # that checkpoint evaluates it (scaling.ray_trial), so it may still go on from the run.
    short = study_at(tmp_path, (10, 20), patches=(2,))
    record(short, (10,))
    checkpoint(short, short.trials[0].trial_id, 10, 20)
    long = study_at(tmp_path, (10, 20, 40), patches=(2,))
    continue_recorded_runs(long)
    assert long.trials[0].trial_id == short.trials[0].trial_id


def test_a_continued_trial_stopped_before_its_next_row_continues_again(tmp_path):
    # The recorder gave the run's rows the longer trial's steps at its start (tests/test_recorder.py); stopped with a
    # checkpoint past milestone 20 (at 30), whose row was never written, it goes on from there again.
    short = study_at(tmp_path, (10, 20), patches=(2,))
    long = study_at(tmp_path, (10, 20, 40), patches=(2,))
    record(study_at(tmp_path, (10, 20, 40), patches=(2,)), (10,))
    rows = load_results(short.output).assign(trial_id=short.trials[0].trial_id)
    write_table(rows, short.output / RESULTS_FILE, RESULTS_SCHEMA)
    checkpoint(short, short.trials[0].trial_id, 30)
    continue_recorded_runs(long)
    assert long.trials[0].trial_id == short.trials[0].trial_id


@pytest.mark.parametrize("case", ["cosine", "own rows", "own checkpoints", "other settings"])
def test_what_is_not_continued(tmp_path, case):
    schedule = {"lr_schedule": "cosine"} if case == "cosine" else {}
    short = study_at(tmp_path, (10, 20), patches=(2,), **schedule)
    record(short, (10, 20))
    checkpoint(short, short.trials[0].trial_id, 20)
    other = {"lr": 2e-3} if case == "other settings" else {}
    long = study_at(tmp_path, (10, 20, 40), patches=(2,), **schedule, **other)
    own = long.trials[0].trial_id
    if case == "own rows":
        record(long, (10,))
    if case == "own checkpoints":  # started once, stopped before its first milestone: it resumes itself
        checkpoint(long, own, 5)
    assert continue_recorded_runs(long) == [] and long.trials[0].trial_id == own


def test_results_of_another_encode_of_the_latents_are_not_taken_for_this_ones(tmp_path, capsys, encode_tiny_latents):
    # A latent folder encoded again in place keeps its path (which trial ids hash): the rows measured on the earlier
    # encode are refused before launch, not skipped as finished, and no trial continues one of its runs.
    latents = tmp_path / "latents"
    encode_tiny_latents(latents, seed=0)
    short = study_at(tmp_path, (10, 20), patches=(2,), latents=latents)
    record(short, (10, 20))
    checkpoint(short, short.trials[0].trial_id, 20)
    again = study_at(tmp_path, (10, 20), patches=(2,), latents=latents)
    assert again.trials[0].data_encode == short.trials[0].data_encode is not None
    assert measured_on_other_data(again) == {}
    encode_tiny_latents(latents, seed=1)
    encoded_again = study_at(tmp_path, (10, 20), patches=(2,), latents=latents)
    (trial,) = encoded_again.trials
    assert trial.trial_id == short.trials[0].trial_id and trial.data_encode != short.trials[0].data_encode
    assert scaling_run.main([str(encoded_again.path), "--no-report"]) == 2
    error = capsys.readouterr().err
    assert error == (f"error: {encoded_again.path}:2: data.path: {latents} was encoded again since trial(s) "
                     f"{trial.trial_id} were measured on it (encode {short.trials[0].data_encode}, now "
                     f"{trial.data_encode}): their rows in {tmp_path / 'out' / RESULTS_FILE} are not this encode's; "
                     f"give the study another output to measure it afresh\n")
    assert scaling_run.main([str(encoded_again.path), "--dry-run"]) == 0  # a plan says so, and goes on
    assert "warning: " + error.removeprefix("error: ") in capsys.readouterr().err
    # Encoded again while a study runs: a trial that starts then stops before training (its rows would name the
    # encode the driver read at launch).
    check_data_encode(trial.to_dict())
    with pytest.raises(DataEncodeChanged, match=rf"^{latents} was encoded again since the study started \(encode "
                                                 rf"{short.trials[0].data_encode}, now {trial.data_encode}\): trial "):
        check_data_encode(short.trials[0].to_dict())
    # And a trial that trained on, reading the shards it opened: its milestone samples nothing to decode with the
    # new encode's VAE and scale.
    stale = short.trials[0].to_dict()
    stale["eval"].update(fid=True, grid_images_per_class=1)
    state = SimpleNamespace(step=10, rank=0, world_size=1, device="cpu", ema=None)
    with pytest.raises(DataEncodeChanged, match=rf"^{latents} was encoded again since the study started"):
        RayReporting(stale, {"output": str(tmp_path / "out")}).on_milestone(state, {"step": 10})
    longer = study_at(tmp_path, (10, 20, 40), patches=(2,), latents=latents)
    assert continue_recorded_runs(longer) == [
        f"DiT-P/2: trains from step 0 as {longer.trials[0].trial_id}: recorded trial {trial.trial_id} of the same "
        f"settings trained on another encode of {latents} ({short.trials[0].data_encode}, now {trial.data_encode})"]


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_latents_moved_elsewhere_go_on_from_their_recorded_trials(tmp_path, encode_tiny_latents, schedule):
    # The same latents on another disk: data.path, which ids hash, changed; the encode (core.latents.encode_id) did not.
    # A constant-lr trial measured at 10 and stopped at 15 goes on; a cosine one (a trial per step count), finished,
    # stays finished.
    steps, measured, at = ((10, 20), (10,), (10, 15)) if schedule == "constant" else ((20,), (20,), (20,))
    here, there = tmp_path / "here", tmp_path / "there"
    encode_tiny_latents(here, seed=0)
    ran = study_at(tmp_path, steps, patches=(2,), latents=here, lr_schedule=schedule)
    record(ran, measured)
    (recorded_id,) = (t.trial_id for t in ran.trials)
    checkpoint(ran, recorded_id, *at)
    here.rename(there)
    moved = study_at(tmp_path, steps, patches=(2,), latents=there, lr_schedule=schedule)
    new_id = moved.trials[0].trial_id
    assert new_id != recorded_id
    assert continue_recorded_runs(moved) == [
        f"DiT-P/2: continues recorded trial {recorded_id} (its latents moved from {here}, the same encode; steps "
        f"{measured[0]} measured, checkpoint at step {at[-1]}) instead of training {new_id} from step 0"]
    (trial,) = moved.trials
    assert trial.trial_id == recorded_id and trial.data["path"] == str(there)  # its workers read the data there
    longer = study_at(tmp_path, steps + (40,), patches=(2,), latents=there, lr_schedule=schedule)
    continue_recorded_runs(longer)
    if schedule == "constant":  # moved and given more steps
        assert [t.trial_id for t in longer.trials] == [recorded_id]
    else:  # a cosine run to 40 trains other weights, wherever its data lies: only the trial to 20 is the recorded one
        assert [t.trial_id for t in longer.trials][0] == recorded_id and len(longer.trials) == 2
        assert longer.trials[1].trial_id not in (recorded_id, new_id)


@pytest.mark.parametrize("case", ["other latents", "no encode recorded", "image folder", "encode names no folder"])
def test_data_elsewhere_that_cannot_be_told_the_same_trains_anew(tmp_path, encode_tiny_latents, case):
    here, there = tmp_path / "here", tmp_path / "there"
    encode_tiny_latents(here, seed=0)
    if case == "encode names no folder":  # an encode from before 2026-12-05: its id hashes its settings alone
        meta = json.loads((here / "meta.json").read_text())
        del meta["encoded_in"]
        (here / "meta.json").write_text(json.dumps(meta))
    ran = study_at(tmp_path, (10, 20), patches=(2,), latents=here)
    record(ran, (10, 20))
    (recorded_id,) = (t.trial_id for t in ran.trials)
    checkpoint(ran, recorded_id, 20)
    if case == "other latents":
        encode_tiny_latents(there, seed=1)
    else:  # a copy: the same encode, refused for what else it cannot tell
        shutil.copytree(here, there)
    moved = study_at(tmp_path, (10, 20), patches=(2,), latents=there)
    (trial,) = moved.trials
    if case == "other latents":
        reason = (f"trained on other latents, in {here} (encode {ran.trials[0].data_encode}; {there} holds "
                  f"{trial.data_encode})")
    if case == "no encode recorded":  # rows written before 2026-12-05
        rows = load_results(ran.output)
        rows["config_json"] = [json.dumps({k: v for k, v in json.loads(c).items() if k != "data_encode"})
                               for c in rows.config_json]
        write_table(rows, ran.output / RESULTS_FILE, RESULTS_SCHEMA)
        reason = f"trained on the latents in {here}, which cannot be matched to {there}'s (its rows name no encode)"
    if case == "image folder":  # an image folder has no encode: its move cannot be told from other images
        rows = load_results(ran.output)
        configs = [json.loads(c) for c in rows.config_json]
        for c in configs:
            c["data"] = {**c["data"], "dataset": "imagefolder", "path": str(here)}
            c.pop("data_encode")
        rows["config_json"] = [json.dumps(c) for c in configs]
        write_table(rows, ran.output / RESULTS_FILE, RESULTS_SCHEMA)
        trial = dataclasses.replace(trial, data={**trial.data, "dataset": "imagefolder"}, data_encode=None)
        moved.trials[0] = trial
        reason = f"trained on {here}: an image folder moved cannot be told from other images"
    if case == "encode names no folder":
        assert trial.data_encode == ran.trials[0].data_encode
        reason = (f"trained on the latents in {here}, whose encode (written before 2026-12-05) cannot be told from "
                  f"another folder's of the same settings")
    assert continue_recorded_runs(moved) == [
        f"DiT-P/2: trains from step 0 as {trial.trial_id}: recorded trial {recorded_id} of the same settings {reason}"]
    assert moved.trials[0].trial_id == trial.trial_id != recorded_id


def test_the_same_folder_through_a_link_is_not_a_move(tmp_path, encode_tiny_latents):
    here = tmp_path / "here"
    encode_tiny_latents(here, seed=0)
    ran = study_at(tmp_path, (10, 20), patches=(2,), latents=here)
    record(ran, (10,))
    checkpoint(ran, ran.trials[0].trial_id, 10)
    os.symlink(here, tmp_path / "link")
    linked = study_at(tmp_path, (10, 20), patches=(2,), latents=tmp_path / "link")
    new_id = linked.trials[0].trial_id
    assert new_id != ran.trials[0].trial_id  # the id hashes the path as written
    assert continue_recorded_runs(linked) == [
        f"DiT-P/2: continues recorded trial {ran.trials[0].trial_id} (steps 10 measured, checkpoint at step 10) "
        f"instead of training {new_id} from step 0"]


def test_eval_files_elsewhere_are_named_not_followed(tmp_path):
    # A VAE, extractor weights or FID's real images have no encode to match: their trials train anew, and say why.
    ran = study_at(tmp_path, (10, 20), patches=(2,), evals={"vae": str(tmp_path / "vae-a")})
    record(ran, (10, 20))
    checkpoint(ran, ran.trials[0].trial_id, 20)
    moved = study_at(tmp_path, (10, 20, 40), patches=(2,), evals={"vae": str(tmp_path / "vae-b")})
    new_id = moved.trials[0].trial_id
    assert continue_recorded_runs(moved) == [
        f"DiT-P/2: trains from step 0 as {new_id}: recorded trial {ran.trials[0].trial_id} of the same settings had "
        f"eval.vae at {tmp_path / 'vae-a'}; of the study's files only data.path's latents can be told the same "
        f"elsewhere (put the others back to go on from it)"]
    assert moved.trials[0].trial_id == new_id
    back = study_at(tmp_path, (10, 20, 40), patches=(2,), evals={"vae": str(tmp_path / "vae-a")})
    continue_recorded_runs(back)
    assert back.trials[0].trial_id == ran.trials[0].trial_id
    # The same file through a link: its id hashes the path as written, but it is the recorded run's file.
    (tmp_path / "vae-a").mkdir()
    os.symlink(tmp_path / "vae-a", tmp_path / "vae-link")
    linked = study_at(tmp_path, (10, 20, 40), patches=(2,), evals={"vae": str(tmp_path / "vae-link")})
    assert linked.trials[0].trial_id != back.trials[0].trial_id
    assert continue_recorded_runs(linked)[0].startswith(f"DiT-P/2: continues recorded trial {ran.trials[0].trial_id} "
                                                        f"(steps 10, 20 measured, checkpoint at step 20)")
    assert linked.trials[0].trial_id == ran.trials[0].trial_id
    # A setting added (a VAE named where there was none) is an edit, not a move: new trials, and nothing to say.
    plain = study_at(tmp_path, (10, 20), patches=(2,))
    record(plain, (10, 20))
    checkpoint(plain, plain.trials[0].trial_id, 20)
    added = study_at(tmp_path, (10, 20, 40), patches=(2,), evals={"vae": str(tmp_path / "vae-c")})
    own = added.trials[0].trial_id
    lines = continue_recorded_runs(added)
    assert added.trials[0].trial_id == own and not any(plain.trials[0].trial_id in line for line in lines)


def test_a_recorded_trials_configuration_is_its_latest_dated_rows():
    # Sorted with undated rows last (pandas' default), a row written by hand without a timestamp stood for the
    # trial's latest configuration, ahead of the recorder's dated ones.
    import pandas as pd

    from scaling.continuation import _latest_config

    rows = pd.DataFrame({"timestamp": [datetime(2026, 1, 2, tzinfo=timezone.utc), pd.NaT,
                                       datetime(2026, 1, 1, tzinfo=timezone.utc)],
                         "config_json": ['{"at": "later"}', '{"at": "by hand"}', '{"at": "earlier"}']})
    assert _latest_config(rows) == {"at": "later"}
