"""One grid row as Ray jobs: a Tune function trainable that runs core.train in a Ray Train data-parallel trainer.

The Ray Train V2 pattern: Tune cannot take a TorchTrainer directly, so each Tune trial builds one
(here `TrialTrainer`: a TorchTrainer with lighter processes) and calls fit(); scaling.tune_relay
forwards each report (every rank's, as Train merges them: rank 0's metrics) to Tune, whose driver-side
callback (scaling.recorder) writes Parquet and MLflow. The trainer is named after the trial, so a restarted worker
group or a re-run of the study finds the trial's last reported checkpoint.
"""
import asyncio
import dataclasses
import os
import re
import shutil
import tempfile
from pathlib import Path
from types import SimpleNamespace

import pyarrow.fs
import ray.train
import ray.tune
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.v2._internal.callbacks import DatasetsCallback
from ray.train.v2._internal.execution.controller import TrainController
from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer

from core.folder_swap import fsync_copied
from scaling.held_logs import HELD_LOGS_KEY, HeldLogs, report_gap_s
from scaling.kept_sync_actor import kept_synchronization_actor
from scaling.placement_group_watch import replace_ray_cleaner
from scaling.startup_gc import resume_collector
from scaling.torch_backend import ProcessGroupConfig
from scaling.trial_storage import passed_milestones_message, train_run_name
from scaling.tune_relay import TuneRelay

KIND_LOG, KIND_CHECKPOINT, KIND_MILESTONE, KIND_END = "log", "checkpoint", "milestone", "end"
RESUMED_KEY = "resumed_train_time_s"  # in the first report after a resume: the restored checkpoint's training time


def train_config(trial, data_copies=None):
    """core.train's TrainConfig of a trial dict (scaling.study.Trial.to_dict()); data_copies: the study's workers one
    node may run at once, the most processes there that may hold the data in memory."""
    from core.models import preset_name
    from core.train import TrainConfig

    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    train = {k: v for k, v in trial["train"].items() if k in fields}
    data = trial["data"]
    # A registry name (a trial's own name also carries its swept architecture fields), overridden to the trial's.
    preset = preset_name(trial["size"], trial["patch"])
    return TrainConfig(**{**train, "model": preset, "model_overrides": dict(trial["model_config"]),
                          "dataset": data["dataset"], "data_path": data.get("path"),
                          "image_size": data.get("image_size"), "data_copies": data_copies,
                          "keep_checkpoints": 1})  # locally one; Ray keeps the trial's last K in storage


def eval_config(trial, cache_dir, inception_weights=None):
    """core.evaluate's EvalConfig of a trial dict. inception_weights: the file the driver found in its torch-fidelity
    cache, for a trial that names none (scaling.study.cached_inception_weights)."""
    from core.evaluate import EvalConfig

    e = trial["eval"]
    return EvalConfig(
        num_samples=e["fid_samples"], sampler=e["sampler"], num_steps=e["sampling_steps"], eta=e["eta"],
        cfg_scale=e["cfg_scale"], guided_channels=e["guided_channels"], seed=trial["train"]["seed"],
        feature_extractor=e["feature_extractor"],
        feature_extractor_weights=e.get("feature_extractor_weights") or inception_weights,
        grid_images_per_class=e["grid_images_per_class"], reference=e.get("reference"), heldout=e.get("heldout"),
        cache_dir=str(cache_dir), diffusion_steps=trial["train"]["diffusion_steps"],
    )


class RayReporting:
    """core.train callbacks that evaluate at milestones and report every step of interest to Ray (log reports
    held between two of its health checks: scaling.held_logs)."""

    def __init__(self, trial, run):
        self.trial, self.run = trial, run
        self.samples_dir = Path(run["output"]) / "trials" / trial["trial_id"] / "samples"
        self.held = HeldLogs(report_gap_s())
        self.resumed_train_time_s = None  # said once, in the first report after a resume

    def report(self, metrics, checkpoint=None):
        """ray.train.report, carrying the log reports held since the last one (scaling.held_logs), and after a resume
        the training time it resumed at (the driver counts this run's work from there)."""
        if self.resumed_train_time_s is not None:
            metrics = {**metrics, RESUMED_KEY: self.resumed_train_time_s}
            self.resumed_train_time_s = None
        ray.train.report({**metrics, HELD_LOGS_KEY: self.held.take()}, checkpoint=checkpoint,
                         checkpoint_upload_fn=persist_durably if checkpoint is not None else None)

    def on_log(self, state, metrics):
        # The wall-clock start of training lets the driver measure the trial's start-up.
        due = self.held.add({**metrics, "first_step_at": state.first_step_at})
        if state.checkpoints_this_step():
            return  # the checkpoint's report, next, carries the held logs
        if _on_every_rank(due, state):
            self.flush()

    def flush(self):
        """Report the held logs as one log report, the latest carrying the earlier ones. No run ends with logs held:
        core.train checkpoints its last step, and that report carries them."""
        if self.held.logs:
            self.report({**self.held.logs.pop(), "kind": KIND_LOG})

    def on_milestone(self, state, metrics):
        """evaluate_milestone, at a milestone the driver has no row of; collective: every rank calls it."""
        # A trial trained again from step 0 passes milestones it measured before (a continued trial whose checkpoints
        # are gone, scaling.continuation): the recorder keeps those first rows, and would drop an FID-50K's result.
        # Asked only where there is something to evaluate (the same answer on every rank: the trial's settings).
        if not self._evaluates() or self._driver_has_row(state):
            return {}
        return self.evaluate_milestone(state)

    def _evaluates(self):
        """Whether a milestone of the trial evaluates anything: FID, or a sample grid."""
        ev = self.trial["eval"]
        return bool(ev.get("fid", True) or ev.get("grid_images_per_class"))

    def evaluate_milestone(self, state):
        """FID and the sample grid of the EMA weights (core.evaluate.evaluate); without FID the grid alone
        (core.evaluate.draw_grid, the very grid evaluate draws); neither: nothing. Collective: every rank calls it."""
        ev = self.trial["eval"]
        fid = ev.get("fid", True)
        if not self._evaluates():
            return {}
        # The samples are decoded by the VAE and scale that data.path's meta.json names now: another encode's, where
        # the folder was encoded again in place since the study started (the training reads the shards it opened).
        check_data_encode_on_every_rank(self.trial, state)
        from core.evaluate import draw_grid, evaluate

        grid = self.samples_dir / f"step-{state.step:09d}.png"
        data = self.trial["data"]
        cfg = eval_config(self.trial, self.run["fid_cache"], self.run.get("inception_weights"))
        return (evaluate if fid else draw_grid)(
            state.ema.model, cfg, dataset=data["dataset"],
            data_path=data.get("path"), image_size=data.get("image_size"), vae=ev.get("vae"),
            device=state.device, rank=state.rank, world_size=state.world_size,
            autocast_dtype=state.autocast_dtype, grid_path=grid,
        )

    def on_resume(self, state, metrics, history):
        self.resumed_train_time_s = getattr(state, "resumed_train_time_s", None)
        # Logs the driver may never have written: those in the report of this checkpoint, which Ray registers before
        # the driver gets it (a driver killed in between), and those since its last Parquet write (at a milestone;
        # a driver killed later resumes from a later checkpoint). They ride on the next report again; the driver
        # replaces the curve points it has, and MLflow gets only steps past its last.
        for log in history:
            self.held.add(log)
        # A milestone before the checkpoint without a row cannot be measured any more (the weights of its step are
        # gone), and the trial would never finish. Ray registers no checkpoint before the driver has every earlier
        # row (scaling.tune_relay), and scaling.continuation gives no trial milestones its run is past: rows removed
        # by hand, then. Say so at once (before evaluating anything), rather than train on.
        passed = [m for m in self.trial["milestones"] if m < state.step]
        rows = self._driver_rows(passed) if passed and state.rank == 0 else None
        missing = [m for m in passed if rows is not None and m not in rows]
        if _on_every_rank(bool(missing), state):  # rank 0's list is the one reported: Ray Train takes its metrics
            raise MilestonePassed(self.trial, missing, state.step, self.run["storage"])
        # A milestone checkpoint reaches Ray's storage before its report reaches the driver: if the
        # driver died in between, the restored checkpoint is a milestone with no row. Its EMA weights
        # are the ones evaluated there, so evaluate them again and report the milestone; not when the driver
        # has its row (from an earlier run of the study, or written since a worker group restarted from it).
        if state.step in self.trial["milestones"] and not self._driver_has_row(state):
            metrics.update(self.evaluate_milestone(state) or {})
            self.report({**metrics, "step": state.step, "kind": KIND_MILESTONE})

    def _driver_has_row(self, state):
        """Whether the driver has the milestone row of state.step, as rank 0 asked it, on every rank."""
        return _on_every_rank(state.rank == 0 and self._driver_rows([state.step]) == [state.step], state)

    def _driver_rows(self, steps):
        """Those of steps at which the driver has this trial's milestone row (scaling.recorder tells the study's
        relay); None without a study's relay (core's trainer run by hand)."""
        try:
            mailboxes = ray.get_actor(self.run["relay_mailboxes"])
        except (KeyError, ValueError):
            return None
        found = ray.get([mailboxes.has_milestone_row.remote(self.trial["trial_id"], s) for s in steps])
        return [s for s, has in zip(steps, found) if has]

    def on_checkpoint(self, state, path, metrics):
        kind = KIND_MILESTONE if state.step in state.milestones else KIND_CHECKPOINT  # core's: max_steps the last
        # Every rank reports its own directory; Ray merges the per-rank files into one checkpoint.
        self.report({**metrics, "kind": kind}, checkpoint=Checkpoint.from_directory(str(path)))


def persist_durably(checkpoint, dir_name):
    """Ray's copy of this worker's checkpoint files into storage, then put on disk: the copy a re-run resumes from.
    Ray copies with pyarrow and syncs nothing, so a crash of the storage's machine could leave the registered latest
    checkpoint short, and every re-run of the trial fails on it (its checksums), with no way back to an older one."""
    persisted = ray.train.get_context().get_storage().persist_current_checkpoint(checkpoint, dir_name)
    if isinstance(persisted.filesystem, pyarrow.fs.LocalFileSystem):  # a local or mounted folder (NFS included)
        fsync_copied(checkpoint.path, persisted.path)
    return persisted


class MilestonePassed(RuntimeError):
    """A trial resumed past a milestone that has no result."""

    def __init__(self, trial, milestones, step, storage):
        super().__init__(f"resumed: {passed_milestones_message(trial, milestones, step, storage)}")
        self.step = step


class DataEncodeChanged(RuntimeError):
    """The latents at data.path are another encode than the one the driver read at the study's start."""

    step = None  # the trial stops before it trains: its row goes after its last measurement

    def __init__(self, trial, now):
        super().__init__(f"{trial['data']['path']} was encoded again since the study started (encode "
                         f"{trial['data_encode']}, now {now}): trial {trial['trial_id']} would train on data its rows "
                         f"do not name; run the study again (in another output: its rows are the earlier encode's)")


def check_data_encode(trial):
    """Raise DataEncodeChanged when data.path's latents are no longer the encode the trial's rows name (the driver
    read it at launch, scaling.study.Trial.data_encode; each rank reads meta.json, a few kB)."""
    if trial.get("data_encode") is None:
        return
    from core.latents import encode_id, read_meta

    now = encode_id(read_meta(trial["data"]["path"]))
    if now != trial["data_encode"]:
        raise DataEncodeChanged(trial, now)


def check_data_encode_on_every_rank(trial, state):
    """check_data_encode where every rank goes on to collectives: rank 0 reads, and its verdict raises on all of them
    (one rank raising alone would leave the others waiting). Another encode ends the trial (DataEncodeChanged); a
    meta.json rank 0 cannot read (a network file system's hiccup, a folder being replaced) is an error Ray retries."""
    failure, verdict = None, 0  # 0: the same encode; 1: another; 2: unreadable
    if state.rank == 0:
        try:
            check_data_encode(trial)
        except DataEncodeChanged as e:
            failure, verdict = e, 1
        except (OSError, ValueError) as e:  # what read_meta raises for a folder or meta.json it cannot use
            failure, verdict = e, 2
    verdict = _on_every_rank(verdict, state)
    if verdict == 1:
        raise failure or DataEncodeChanged(trial, "another, as rank 0 read it")
    if verdict == 2:
        raise failure or RuntimeError(f"rank 0 could not read the latents' meta.json in {trial['data']['path']}")


def _worker_state(context):
    """What _on_every_rank reads of a trial's state, before core.train makes one: rank, world size, the device of
    the process group's collectives (a GPU's under NCCL)."""
    import torch
    import torch.distributed as dist

    nccl = context.get_world_size() > 1 and dist.get_backend() == "nccl"
    device = torch.device("cuda", context.get_local_rank()) if nccl else torch.device("cpu")
    return SimpleNamespace(rank=context.get_world_rank(), world_size=context.get_world_size(), device=device)


def _on_every_rank(due, state):
    """Rank 0's answer (a bool or a small int), on every rank: Ray Train needs each rank's same reports, and an
    evaluation takes them all."""
    if state.world_size == 1:
        return due
    import torch
    import torch.distributed as dist

    flag = torch.tensor([int(due)], device=state.device)
    dist.broadcast(flag, src=0)
    return type(due)(flag.item())


def _import_core_train():
    """core.train and DeepSpeed, which core.train imports only when training starts (without MLflow, which
    DeepSpeed's autotuner would import: workers never log to MLflow, the driver does; see import_deepspeed)."""
    import core.train
    core.train.import_deepspeed()
    return core.train


def worker_loop(config):
    """Runs on every worker of a trial: resume from Ray's latest checkpoint, train, evaluate, report."""
    core_train = _import_core_train()
    resume_collector()  # this worker's start-up is done (scaling.startup_gc)
    TrainingDiverged, train = core_train.TrainingDiverged, core_train.train

    trial, run = config["trial"], config["run"]
    context = ray.train.get_context()
    local = scratch_dir(trial["trial_id"], context.get_world_rank())
    checkpoint = ray.train.get_checkpoint()
    reporting = RayReporting(trial, run)
    try:
        # Through rank 0 (the process group is up): a rank that read a new encode alone would end while the others
        # train on, waiting in their first collective.
        check_data_encode_on_every_rank(trial, _worker_state(context))
        if checkpoint is None:
            _train(train, trial, run, reporting, local, None)
        else:
            with checkpoint.as_directory() as resume_dir:
                _train(train, trial, run, reporting, local, resume_dir)
    except TrainingDiverged as e:
        # Every rank sees the divergence at the same step (the loss is all-reduced), so this
        # report is reached by all of them. A retry would diverge again: end the trial here.
        reporting.report({"kind": KIND_END, "status": "diverged", "step": e.step, "error": str(e)})
    except (MilestonePassed, DataEncodeChanged) as e:  # every rank, as above; a retry would find the same
        reporting.report({"kind": KIND_END, "status": "failed", "step": e.step, "error": str(e)})
    except core_train.UnloadableCheckpoint as e:  # every rank together; each of Train's and Tune's retries started
        # the workers, loaded the data and failed on the same files. Ray resumes from its latest registered one only.
        run_folder = Path(run["storage"]) / train_run_name(trial["trial_id"])
        reporting.report({"kind": KIND_END, "status": "failed", "error": f"resuming: {e}; delete {run_folder} to train "
                                                                         "this trial again from step 0"})
    finally:
        shutil.rmtree(local, ignore_errors=True)


def scratch_dir(trial_id, rank):
    """A fresh local folder for this worker's checkpoints before Ray persists them. The folders of
    workers that died on this node go first: a killed worker cannot remove its own, and a large
    model's checkpoint is gigabytes."""
    base = Path(tempfile.gettempdir())
    for old in base.glob("dit-*-pid*-*"):
        found = re.fullmatch(r"dit-.+-pid(\d+)-[^-]+", old.name)
        if found and not _process_alive(int(found.group(1))):
            shutil.rmtree(old, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=f"dit-{trial_id}-rank{rank}-pid{os.getpid()}-", dir=base))


def _process_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _train(train, trial, run, reporting, local, resume_dir):
    out = Path(run["output"]) / "trials" / trial["trial_id"]
    # The local folder is scratch: Ray's copy in storage is the checkpoint, made durable as it is persisted.
    train(train_config(trial, run.get("workers_per_node")), out, trial["milestones"], reporting,
          resume_from=resume_dir, checkpoint_dir=local, shared_checkpoint_dir=False, durable_checkpoints=False)


class TrialTrainer(DataParallelTrainer):
    """Ray's TorchTrainer for a trial: the same process group, without torch in the Tune actor (scaling.torch_backend),
    with its Train controller in the process that calls fit() rather than in a process of its own, which keeps the
    run's synchronization actor for its next run (scaling.kept_sync_actor), without a Ray
    Data actor when it is given no Ray datasets, and, given the name of the study's placement-group watch, without
    a placement-group cleaner of its own."""

    def __init__(self, train_loop_per_worker, *, scaling_config, placement_group_watch=None, **kwargs):
        self._placement_group_watch = placement_group_watch  # before super().__init__, which builds the callbacks
        backend = "nccl" if scaling_config.use_gpu else "gloo"  # as TorchTrainer chooses
        super().__init__(train_loop_per_worker, backend_config=ProcessGroupConfig(backend=backend),
                         scaling_config=scaling_config, **kwargs)

    def _create_default_callbacks(self):
        # Ray Train starts a DatasetManager actor for every run, datasets or not: a fresh process
        # (it imports Ray Data and pandas) beside every trial's start, 1-2 CPU-seconds of a
        # trial's first seconds (a lone trial started in 10.0-10.8 s with it, 8.6-9.8 without, on
        # the 2-core box), and an idle actor for the trial's whole run. core.train loads its own
        # data, so the callback that starts it goes. Ray Train's own hook for trimming its default
        # callbacks is private (Ray is pinned in pyproject.toml); tests/test_ray_trial.py checks
        # that it still takes effect.
        callbacks = super()._create_default_callbacks()
        if not self.datasets:
            callbacks = [c for c in callbacks if not isinstance(c, DatasetsCallback)]
        if self._placement_group_watch is not None:
            callbacks = replace_ray_cleaner(callbacks, self._placement_group_watch)
        return callbacks

    def _initialize_and_run_controller(self, **controller_init_kwargs):
        # Ray Train runs each run's controller as an actor of its own, pinned to the node of the process that calls
        # fit() and owned by it: one more fresh process per trial that imports Ray Train before it asks for the
        # trial's workers (2.1-2.6 s of every trial's start on the 2-core box, benchmarks/README.md). Here the
        # controller runs in the calling process itself, the Tune trial's actor, which has Ray Train imported and
        # whose fate the controller shared anyway. The controller is the same object running the same loop, so the
        # worker-group restarts of FailureConfig, checkpoints and reports are Ray Train's own; the study's placement-
        # group watch, given the Tune actor's id, frees the trial's resources when that actor dies. Ray Train's hook
        # is private (Ray is pinned in pyproject.toml); tests/test_ray_trial.py checks it still takes effect. What
        # this gives up: `ray.train.get_all_reported_checkpoints()` on a worker, which asks the controller's actor
        # (here the Tune actor, which has no such method); core.train resumes from `ray.train.get_checkpoint()`.
        # The actor also keeps the run's synchronization actor for its next trial (scaling.kept_sync_actor).
        controller = TrainController(**controller_init_kwargs)
        with kept_synchronization_actor():
            asyncio.run(controller.run())
        return controller.get_result()


def trial_function(config):
    """The Tune function trainable of one grid row."""
    trial, run = config["trial"], config["run"]
    res = run["resources"]
    relay = TuneRelay(run["relay_mailboxes"])
    trainer = TrialTrainer(
        worker_loop,
        train_loop_config=config,
        placement_group_watch=run["placement_group_watch"],
        scaling_config=ScalingConfig(
            num_workers=res["workers_per_trial"], use_gpu=res["gpus_per_worker"] > 0,
            resources_per_worker={"CPU": res["cpus_per_worker"], "GPU": res["gpus_per_worker"]},
        ),
        run_config=RunConfig(
            name=train_run_name(trial["trial_id"]), storage_path=run["storage"],
            failure_config=FailureConfig(max_failures=res["max_failures"]),
            checkpoint_config=CheckpointConfig(num_to_keep=run["keep_checkpoints"]),
            callbacks=[relay],
        ),
    )
    try:
        relay.fit(trainer)
    except Exception as e:  # TrainingFailedError after the retries: record the trial as failed
        ray.tune.report({"kind": KIND_END, "status": "failed", "error": _error_summary(e)})


def _error_summary(error):
    return shortened(f"{type(error).__name__}: {error}")


def shortened(text, limit=2000):
    """An error's text as a row and a tag keep it: its first and last limit / 2 characters."""
    return text if len(text) <= limit else text[: limit // 2] + " … " + text[-limit // 2:]
