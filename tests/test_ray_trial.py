"""A trial's trainer sets up torch's process group as Ray's TorchTrainer does, with fewer and lighter processes:
no Ray Data actor, no Train controller process (the controller runs in the Tune trial's actor), and no torch there."""
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import ray
import torch.distributed
from ray.train import RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer
from ray.util.state import list_actors

from scaling.ray_env import local_ray_options, study_runtime_env
from scaling.ray_trial import TrialTrainer

ENV_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "NODE_RANK", "MASTER_ADDR",
            "ACCELERATE_TORCH_DEVICE")


@ray.remote(num_cpus=0)
class TuneTrial:
    """Stands in for a Tune trial actor: a process of its own that calls fit(); whether it has imported torch."""

    def fit(self, trainer_class, pickled_loop, config, name, storage):
        def loop(config):  # unpickles the test's function on the workers only: it refers to torch
            import ray.cloudpickle
            ray.cloudpickle.loads(pickled_loop)(config)

        trainer_class(loop, train_loop_config=config, scaling_config=ScalingConfig(num_workers=2),
                      run_config=RunConfig(name=name, storage_path=storage)).fit()
        return "torch" in sys.modules


def dataset_managers(address):
    return len(list_actors(address=address, filters=[("class_name", "=", "DatasetManager")], limit=1000))


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads other processes' memory maps (Linux)")
def test_a_trial_trains_in_torchs_process_group_with_lighter_processes(tmp_path):
    ray.init(runtime_env=study_runtime_env(), **local_ray_options())
    try:
        address = ray.get_runtime_context().gcs_address

        def record(config):  # nested, names included: pickled by value, as the workers cannot import this module
            def controllers_with_torch():
                """For every live Train controller of this Ray (not another test's): whether its process has
                loaded torch's library."""
                alive = list_actors(address=config["address"], filters=[("class_name", "=", "TrainController"),
                                                                        ("state", "=", "ALIVE")])
                return [("libtorch_cpu" in Path(f"/proc/{a.pid}/maps").read_text()) for a in alive]

            import json

            rank = torch.distributed.get_rank()
            total = torch.ones(1)
            torch.distributed.all_reduce(total)  # the group works, not only exists
            state = {"backend": torch.distributed.get_backend(), "world_size": torch.distributed.get_world_size(),
                     "sum": total.item(), "env": {k: os.environ.get(k) for k in config["env_vars"]},
                     "controllers_with_torch": controllers_with_torch()}
            Path(config["out"], f"rank{rank}.txt").write_text(json.dumps(state))

        def fit(trainer_class, name):
            out = tmp_path / name
            out.mkdir()
            config = {"out": str(out), "env_vars": ENV_VARS, "address": address}
            caller = TuneTrial.remote()
            caller_has_torch = ray.get(caller.fit.remote(trainer_class, ray.cloudpickle.dumps(record), config, name,
                                                         str(tmp_path)))
            ranks = [json.loads(out.joinpath(f"rank{r}.txt").read_text()) for r in range(2)]
            return ranks, caller_has_torch

        ours, ours_caller_has_torch = fit(TrialTrainer, "ours")
        assert dataset_managers(address) == 0
        ray_s, _ = fit(TorchTrainer, "ray")
        # Ray's own trainer starts one, so the count above would see it: the override took effect.
        assert dataset_managers(address) == 1
        for rank in range(2):
            assert ours[rank]["backend"] == ray_s[rank]["backend"] == "gloo"
            assert ours[rank]["world_size"] == ray_s[rank]["world_size"] == 2
            assert ours[rank]["sum"] == ray_s[rank]["sum"] == 2.0
            assert ours[rank]["env"] == ray_s[rank]["env"]
            assert ours[rank]["env"]["RANK"] == str(rank)
        # Ray's trainer runs one controller actor during its fit, and that process imports torch; ours runs its
        # controller in the calling actor (no controller actor at all), which stays without torch.
        assert ours[0]["controllers_with_torch"] == [] and not ours_caller_has_torch
        assert ray_s[0]["controllers_with_torch"] == [True]
        assert len(list_actors(address=address, filters=[("class_name", "=", "TrainController")])) == 1
    finally:
        ray.shutdown()


def test_rank_zeros_store_listens_before_its_port_is_handed_on(tmp_path):
    # Ray's rendezvous closes the free port it found and binds it again later: another process took it between the
    # two in this suite (EADDRINUSE), failing the trial at its start. Ours binds first, on a port the OS chooses.
    # In a process of its own: a process group (and Ray, which Ray's shutdown step starts) would outlive the test.
    script = textwrap.dedent("""
        import errno, json, socket, sys
        import torch, torch.distributed as dist
        import scaling.torch_backend as backend

        addr, port = backend._bind_master_store(timeout_s=30)
        with socket.socket(socket.AF_INET6 if ":" in addr else socket.AF_INET) as other:
            try:
                other.bind(("", port))  # what a process taking the port in between would do
                taken = None
            except OSError as e:
                taken = e.errno
        backend._init_process_group("gloo", world_rank=0, world_size=1, timeout_s=30)
        total = torch.ones(1)
        dist.all_reduce(total)
        print(json.dumps({"taken": taken == errno.EADDRINUSE, "rank": dist.get_rank(), "sum": total.item()}))
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=Path(__file__).parents[1], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.splitlines()[-1]) == {"taken": True, "rank": 0, "sum": 1.0}


def sync_actors(address):
    """Ray Train's synchronization actors this Ray has started: their states, by actor id."""
    found = list_actors(address=address, filters=[("class_name", "=", "SynchronizationActor")], limit=1000)
    return {a.actor_id: a.state for a in found}


def test_a_tune_actor_keeps_its_idle_synchronization_actor_for_its_next_run(tmp_path):
    ray.init(runtime_env=study_runtime_env(), **local_ray_options())
    try:
        address = ray.get_runtime_context().gcs_address

        def reports(config):
            import os
            import time

            rank = ray.train.get_context().get_world_rank()
            marker = config["rank_0_reports"]
            if config["fail"] and rank == 1:  # rank 0 waits in the barrier when the run fails
                deadline = time.time() + 60
                while not os.path.exists(marker) and time.time() < deadline:  # not a fixed sleep: a loaded box
                    time.sleep(0.05)
                time.sleep(0.5)  # from its marker into the barrier
                raise RuntimeError("rank 1 fails before its report")
            for step in range(3):  # every report passes the barrier
                if rank == 0 and step == 0:
                    open(marker, "w").close()
                ray.train.report({"step": step, "rank": rank})

        caller = TuneTrial.remote()  # one actor for all runs, as Tune reuses a trial's actor

        def fit(name, fail=False):
            config = {"fail": fail, "rank_0_reports": str(tmp_path / f"{name}-rank-0-reports")}
            ray.get(caller.fit.remote(TrialTrainer, ray.cloudpickle.dumps(reports), config, name, str(tmp_path)))

        fit("first")
        first = sync_actors(address)
        assert list(first.values()) == ["ALIVE"]  # kept, though its run is over
        with pytest.raises(ray.exceptions.RayTaskError, match="rank 1 fails"):
            fit("failed", fail=True)
        # No other actor was started: the kept one served the failed run. Rank 0 was left waiting in
        # its barrier, so that actor is killed, not kept.
        assert sync_actors(address) == {next(iter(first)): "DEAD"}
        fit("after")
        after = sync_actors(address)
        assert len(after) == 2 and sorted(after.values()) == ["ALIVE", "DEAD"]
    finally:
        ray.shutdown()


def test_each_local_rank_finds_its_own_gpu_on_a_node_of_more_than_ten():
    # Ray numbers a node's local ranks in the numeric order of their GPUs but joins the GPUs as text sorts them:
    # on GPUs 8-11, cuda:LOCAL_RANK (core.train's, DeepSpeed's) was GPU 10 for local rank 0, whose reservation is 8.
    from ray.train.v2._internal.callbacks.accelerators import _get_visible_accelerator_ids_per_worker
    from ray.train.v2._internal.execution.worker_group.worker import ActorMetadata

    from scaling.torch_backend import gpus_in_numeric_order

    gpus = ["8", "9", "10", "11"]  # local ranks 0-3, as Ray's worker group orders them
    workers = [ActorMetadata("h", "n", "10.0.0.1", 100 + i, {"GPU": [g]}) for i, g in enumerate(gpus)]
    visible = _get_visible_accelerator_ids_per_worker(workers, "GPU")
    assert visible == ["10,11,8,9"] * 4  # Ray's, as text sorts
    ordered = gpus_in_numeric_order(visible[0])
    assert [ordered.split(",").index(g) for g in gpus] == [0, 1, 2, 3]  # cuda:LOCAL_RANK is each one's own
    assert gpus_in_numeric_order("GPU-5a1c,GPU-0b2d") == "GPU-5a1c,GPU-0b2d"  # ids, not numbers: as they are


def test_a_kept_synchronization_actor_that_a_rank_entered_since_is_not_handed_out():
    # Ray kills a run's workers without waiting for them to stop: one still running could enter the barrier after it
    # was found idle and kept, and the next run (the Tune actor's next trial, a worker group's restart) inherited a
    # rank waiting in it, its ranks then one report out of step.
    from ray.train.v2._internal.execution.worker_group import worker_group

    from scaling import kept_sync_actor as kept

    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        start = kept._KeptActorClass(worker_group.SynchronizationActor).options()
        first = start.remote(timeout_s=None)
        ray.get(first.get_counter.remote(), timeout=120)  # started, as a run's is before it ends (a busy box: seconds)
        kept._keep_or_kill(first)  # idle: kept
        assert start.remote(timeout_s=None) == first  # and handed out again
        kept._keep_or_kill(first)
        first.broadcast_from_rank_zero.remote(world_rank=0, world_size=2, data=1, caller_method_name="report")
        deadline = time.time() + 60
        while ray.get(first.get_counter.remote()) == 0 and time.time() < deadline:  # rank 0 waits for rank 1
            time.sleep(0.05)
        fresh = start.remote(timeout_s=None)
        assert fresh != first
        with pytest.raises(ray.exceptions.RayActorError):
            ray.get(first.get_counter.remote(), timeout=60)  # killed
        assert ray.get(fresh.get_counter.remote()) == 0
    finally:
        kept._kept.update(key=None, actor=None)
        kept._handed_out.clear()
        ray.shutdown()


def test_a_trials_evaluation_takes_every_eval_field_of_its_study(tmp_path):
    # Every field a value other than both the study's and EvalConfig's default: one dropped or hard-coded shows.
    from core.evaluate import EvalConfig
    from scaling.ray_trial import eval_config
    from scaling.study import cached_inception_weights, load_study

    path = tmp_path / "study.yaml"
    path.write_text(textwrap.dedent(f"""\
        name: evalfields
        data: {{dataset: digits}}
        sweep: {{model: [DiT-P], patch: [2], steps: [10]}}
        train: {{batch_size: 32, seed: 7, diffusion_steps: 500}}
        eval: {{fid_samples: 300, sampler: ddpm, sampling_steps: 25, eta: 0.5, cfg_scale: 1.5, guided_channels: 2,
                feature_extractor: inception-v3-compat, feature_extractor_weights: weights/inception.pth,
                grid_images_per_class: 2, reference: real, heldout: held}}
        output: {tmp_path / "out"}
        """))
    study = load_study(path, check_data=False)  # the weights and folders do not exist: warnings, not errors
    (trial,) = study.trials
    cfg = eval_config(trial.to_dict(), tmp_path / "fid-cache")
    assert cfg == EvalConfig(
        num_samples=300, sampler="ddpm", num_steps=25, eta=0.5, cfg_scale=1.5, guided_channels=2, seed=7,
        feature_extractor="inception-v3-compat", feature_extractor_weights=str(tmp_path / "weights" / "inception.pth"),
        grid_images_per_class=2, reference=str(tmp_path / "real"), heldout=str(tmp_path / "held"),
        cache_dir=str(tmp_path / "fid-cache"), diffusion_steps=500)
    # A null guided_channels (guide every noise channel) stays null.
    path.write_text(path.read_text().replace("guided_channels: 2", "guided_channels: null"))
    (trial,) = load_study(path, check_data=False).trials
    assert eval_config(trial.to_dict(), tmp_path).guided_channels is None
    # The study's weights file stands; without one, the trials read the file the driver found in torch-fidelity's
    # cache (scaling.study.cached_inception_weights), not whatever cache their node has.
    assert eval_config(trial.to_dict(), tmp_path, "/cache/w.pth").feature_extractor_weights == str(
        tmp_path / "weights" / "inception.pth")
    path.write_text(path.read_text().replace("feature_extractor_weights: weights/inception.pth",
                                             "feature_extractor_weights: null"))
    study = load_study(path, check_data=False)
    cached = cached_inception_weights(study.raw["eval"])
    assert cached == str(Path(torch.hub.get_dir()) / "checkpoints" / "weights-inception-2015-12-05-6726825d.pth")
    assert eval_config(study.trials[0].to_dict(), tmp_path, cached).feature_extractor_weights == cached
    assert cached_inception_weights({**study.raw["eval"], "feature_extractor": "digits"}) is None


def test_a_milestone_without_fid_draws_the_grid_it_draws_with_fid(tmp_path, monkeypatch):
    # RayReporting.on_milestone called as core.train calls it at a milestone, without Ray: the grid is drawn and
    # logged with FID off as with it on (the same PNG, path and name), and FID off does no FID work.
    from types import SimpleNamespace

    from core import evaluate as evaluate_module
    from core import fid as fid_module
    from evaluate_worker import jittered_model  # tests/, on pytest's path
    from scaling.ray_trial import RayReporting
    from scaling.study import load_study

    def milestone(fid, grid_images_per_class=2):
        path = tmp_path / f"fid-{fid}-{grid_images_per_class}.yaml"
        path.write_text(textwrap.dedent(f"""\
            name: grids
            data: {{dataset: digits}}
            sweep: {{model: [DiT-P], patch: [2], steps: [10]}}
            train: {{batch_size: 32}}
            eval: {{fid: {str(fid).lower()}, fid_samples: 20, sampling_steps: 4, guided_channels: null,
                    grid_images_per_class: {grid_images_per_class}}}
            output: {tmp_path / "out"}
            """))
        (trial,) = load_study(path, check_data=False).trials
        trial = trial.to_dict()
        run = {"output": str(tmp_path / "out"), "fid_cache": str(tmp_path / "fid_cache")}
        state = SimpleNamespace(step=10, ema=SimpleNamespace(model=jittered_model()), device="cpu", rank=0,
                                world_size=1, autocast_dtype=None)
        expected = tmp_path / "out" / "trials" / trial["trial_id"] / "samples" / "step-000000010.png"
        return RayReporting(trial, run).on_milestone(state, {"step": 10}), expected

    with_fid, grid_with_fid = milestone(fid=True)
    assert with_fid["fid"] > 0 and with_fid["grid_path"] == str(grid_with_fid)

    def refused(*args, **kwargs):
        raise AssertionError("FID work without FID")
    for name in ("reference_images", "heldout_images", "fidelity", "resolve_extractor", "check", "evaluate"):
        monkeypatch.setattr(evaluate_module, name, refused)
    monkeypatch.setattr(fid_module, "fidelity", refused)
    without, grid = milestone(fid=False)
    assert without["grid_path"] == str(grid) and grid.parent.name == "samples" and "fid" not in without
    assert without["eval_time_s"] > 0  # counted as evaluation in the study's efficiency
    assert grid.read_bytes() == grid_with_fid.read_bytes()
    # No FID, no grid: nothing to do, and the study's relay is not asked whether the driver has the row.
    monkeypatch.setattr(RayReporting, "_driver_rows", refused)
    assert milestone(fid=False, grid_images_per_class=0)[0] == {}


def test_the_first_report_after_a_resume_says_the_training_time_it_resumed_at(tmp_path, monkeypatch):
    # The driver counts the trial's work in this run from there (scaling.recorder.busy_seconds).
    from types import SimpleNamespace

    from scaling import ray_trial

    sent, uploads = [], []  # what Ray Train would be handed, outside a Train session

    def report(metrics, checkpoint=None, checkpoint_upload_fn=None):
        sent.append(metrics)
        uploads.append(checkpoint_upload_fn)
    monkeypatch.setattr(ray_trial.ray.train, "report", report)
    reporting = ray_trial.RayReporting({"trial_id": "t", "milestones": [10], "eval": {}}, {"output": str(tmp_path)})
    reporting.on_resume(SimpleNamespace(step=4, rank=0, world_size=1, resumed_train_time_s=12.5), {}, [])
    reporting.report({"step": 6, "kind": ray_trial.KIND_LOG})
    reporting.report({"step": 8, "kind": ray_trial.KIND_LOG})
    assert [m.get(ray_trial.RESUMED_KEY) for m in sent] == [12.5, None]
    # A checkpoint's copy into storage is Ray's, then put on disk (ray_trial.persist_durably).
    reporting.report({"step": 10, "kind": ray_trial.KIND_CHECKPOINT}, checkpoint=ray_trial.Checkpoint(str(tmp_path)))
    assert uploads == [None, None, ray_trial.persist_durably]


def _check_encode_as_rank(rank, trial, store_path, out):
    """One of two gloo processes: what check_data_encode_on_every_rank raised there (None: nothing), to out."""
    from types import SimpleNamespace

    from scaling.ray_trial import DataEncodeChanged, check_data_encode_on_every_rank

    torch.distributed.init_process_group("gloo", store=torch.distributed.FileStore(store_path, 2), rank=rank,
                                         world_size=2)
    try:
        check_data_encode_on_every_rank(trial, SimpleNamespace(rank=rank, world_size=2, device="cpu"))
        out.put((rank, None))
    except (DataEncodeChanged, FileNotFoundError, RuntimeError) as e:
        out.put((rank, f"{type(e).__name__}: {e}"))
    finally:
        torch.distributed.destroy_process_group()


def test_a_milestones_encode_check_stops_every_rank_on_rank_0s_reading(tmp_path, encode_tiny_latents):
    # Before its samples are decoded: a rank that raised alone would leave the others waiting in the evaluation.
    from two_ranks import on_two_ranks  # tests/, on pytest's path

    latents = tmp_path / "latents"
    trial = {"trial_id": "DiT-P-2-abc", "data": {"path": str(latents)}, "data_encode": "e0"}
    # A meta.json rank 0 cannot read: an error Ray retries (the trial is not ended), on both ranks.
    said = on_two_ranks(_check_encode_as_rank, trial, store=tmp_path / "store")
    assert said == {0: f"FileNotFoundError: latent folder {latents} does not exist",
                    1: f"RuntimeError: rank 0 could not read the latents' meta.json in {latents}"}
    # Another encode: the trial ends, on both ranks.
    encode_tiny_latents(latents, seed=0)
    said = on_two_ranks(_check_encode_as_rank, trial, store=tmp_path / "store-2")
    assert said[0].startswith(f"DataEncodeChanged: {latents} was encoded again since the study started (encode e0, "
                              "now "), said
    assert said[1].endswith("(encode e0, now another, as rank 0 read it): trial DiT-P-2-abc would train on data its rows "
                            "do not name; run the study again (in another output: its rows are the earlier encode's)")
    unrecorded = {**trial, "data_encode": None}  # data in pixels, or rows from before encodes were recorded
    assert on_two_ranks(_check_encode_as_rank, unrecorded, store=tmp_path / "store-3") == {0: None, 1: None}


def test_a_persisted_checkpoint_is_put_on_disk(tmp_path, monkeypatch):
    # Ray copies a worker's checkpoint into storage with pyarrow and syncs nothing; the copy a re-run resumes from is
    # synced as it is persisted, through Ray's own copy (its StorageContext, a DeveloperAPI).
    from types import SimpleNamespace

    import pyarrow.fs

    from scaling import ray_trial

    local = tmp_path / "scratch" / "step-000000010"
    (local / "deepspeed").mkdir(parents=True)
    (local / "rng-rank0.pt").write_text("r")
    (local / "deepspeed" / "mp_rank_00_model_states.pt").write_text("w")
    storage = tmp_path / "ray" / "train-t"
    storage.mkdir(parents=True)

    def persist_current_checkpoint(checkpoint, name):  # as Ray's: a copy under the run's folder
        shutil.copytree(checkpoint.path, storage / name, dirs_exist_ok=True)
        return ray_trial.Checkpoint(str(storage / name))
    context = SimpleNamespace(get_storage=lambda: SimpleNamespace(persist_current_checkpoint=persist_current_checkpoint))
    monkeypatch.setattr(ray_trial.ray.train, "get_context", lambda: context)
    synced, fsync = [], os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(os.readlink(f"/proc/self/fd/{fd}")) or fsync(fd))
    persisted = ray_trial.persist_durably(ray_trial.Checkpoint(str(local)), "checkpoint_1")
    copy = storage / "checkpoint_1"
    assert persisted.path == str(copy) and isinstance(persisted.filesystem, pyarrow.fs.LocalFileSystem)
    assert sorted(synced) == sorted(map(str, [copy / "rng-rank0.pt", copy / "deepspeed" / "mp_rank_00_model_states.pt",
                                              copy / "deepspeed", copy, storage]))
