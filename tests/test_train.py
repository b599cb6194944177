"""core.train: DeepSpeed ZeRO training on CPU (gloo), exact resume, checkpoint errors."""
import dataclasses
import json
import os
import re
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from core import checkpoint as ckpt
from core.data import ShardedBatchSampler, build_dataset
from core.train import (BatchSource, Callbacks, TrainConfig, TrainingDiverged, UnloadableCheckpoint, ValidationBatch,
                        check_folder_shared, check_ranks_resume_alike, fits_on_device, ranks_spread, train)
from two_ranks import on_two_ranks  # tests/, on pytest's path

REPO = Path(__file__).resolve().parents[1]


def tiny_config(**kwargs):
    base = dict(model="DiT-P/2", dataset="digits", batch_size=32, max_steps=12, lr=1e-3, ema_decay=0.9,
                zero_stage=0, log_every=2, ckpt_every=1000, keep_checkpoints=5, val_batch=32, num_workers=0)
    return TrainConfig(**{**base, **kwargs})


class CrashAt(Callbacks):
    """Simulates a killed process right after the checkpoint of a given step."""

    def __init__(self, step):
        self.step = step

    def on_checkpoint(self, trial, path, metrics):
        if trial.step == self.step:
            raise KeyboardInterrupt(f"crash after step {self.step}")


def history(out):
    state = json.loads((ckpt.latest_checkpoint(Path(out) / "checkpoints") / ckpt.STATE_FILE).read_text())
    return [h["train_loss"] for h in state["history"]], state


# fp32 as the CPU studies train; bf16 with ZeRO-2 as the GPU studies do (bf16 weights, fp32 master copies);
# ZeRO-3, whose parameter hooks follow the order modules are called in (a resumed run replays it from step 1).
@pytest.mark.parametrize("precision, zero_stage", [("fp32", 0), ("bf16", 2), ("fp32", 3)])
def test_resume_is_bitwise_for_one_process(tmp_path, precision, zero_stage):
    cfg = tiny_config(precision=precision, zero_stage=zero_stage)
    train(cfg, tmp_path / "straight", milestones=[6])
    with pytest.raises(KeyboardInterrupt):
        train(cfg, tmp_path / "resumed", milestones=[6], callbacks=CrashAt(6))
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "resumed" / "checkpoints")] == ["step-000000006"]
    train(cfg, tmp_path / "resumed", milestones=[6], resume_from="auto")

    losses_a, state_a = history(tmp_path / "straight")
    losses_b, state_b = history(tmp_path / "resumed")
    assert state_a["config"]["precision"] == precision and losses_a == losses_b and len(losses_a) == 6
    assert state_a["metrics"]["val_loss"] == state_b["metrics"]["val_loss"]
    ema_a = load_file(str(ckpt.latest_checkpoint(tmp_path / "straight" / "checkpoints") / ckpt.EMA_FILE))
    ema_b = load_file(str(ckpt.latest_checkpoint(tmp_path / "resumed" / "checkpoints") / ckpt.EMA_FILE))
    assert ema_a and ema_a.keys() == ema_b.keys() and all(torch.equal(ema_a[k], ema_b[k]) for k in ema_a)


def test_a_resume_takes_its_data_position_from_the_step_not_the_saved_position(tmp_path):
    # trainer_state.json has no checksum (its history grows): a position edited or damaged within range was taken as
    # it stood, and the resumed run trained on other batches than the straight one, without a word.
    cfg = tiny_config()
    train(cfg, tmp_path / "straight", milestones=[6])
    with pytest.raises(KeyboardInterrupt):
        train(cfg, tmp_path / "resumed", milestones=[6], callbacks=CrashAt(6))
    state_file = ckpt.latest_checkpoint(tmp_path / "resumed" / "checkpoints") / ckpt.STATE_FILE
    state = json.loads(state_file.read_text())
    assert state["sampler"]["batch"] != 0
    state["sampler"]["batch"] = 0
    state_file.write_text(json.dumps(state))
    train(cfg, tmp_path / "resumed", milestones=[6], resume_from="auto")
    assert history(tmp_path / "straight")[0] == history(tmp_path / "resumed")[0]


def test_tf32_trains_as_fp32_on_a_cpu_and_each_run_sets_its_own_tf32_switches(tmp_path):
    # A Ray worker trains one trial after another: a tf32 trial's switches must not outlive it into an fp32 one.
    switches = lambda: (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)  # noqa: E731
    train(tiny_config(max_steps=4, precision="tf32"), tmp_path / "tf32")
    assert switches() == (True, True)
    train(tiny_config(max_steps=4, precision="fp32"), tmp_path / "fp32")
    assert switches() == (False, False)
    losses_tf32, state = history(tmp_path / "tf32")
    losses_fp32, _ = history(tmp_path / "fp32")
    assert state["config"]["precision"] == "tf32" and losses_tf32 == losses_fp32 and len(losses_tf32) == 2
    with pytest.raises(ckpt.CheckpointError, match=r"precision 'fp32' \(now 'tf32'\)"):
        train(tiny_config(max_steps=6, precision="tf32"), tmp_path / "fp32", resume_from="auto")


def test_a_run_given_more_steps_under_a_constant_lr_trains_on_as_one_straight_run(tmp_path):
    # What scaling.continuation builds on: a finished run of 6 steps, resumed with max_steps 12 and more milestones,
    # reaches the weights, losses and validation of one run to 12 (the constant lr and every step's randomness do not
    # depend on max_steps, and evaluations draw from their own seeds).
    train(tiny_config(), tmp_path / "straight", milestones=[3, 6])
    train(tiny_config(max_steps=6), tmp_path / "grown", milestones=[3])
    train(tiny_config(), tmp_path / "grown", milestones=[3, 6], resume_from="auto")
    losses_a, state_a = history(tmp_path / "straight")
    losses_b, state_b = history(tmp_path / "grown")
    assert losses_a == losses_b and len(losses_a) == 7 and state_b["step"] == 12  # logs at 2, 3, 4, 6, 8, 10, 12
    assert state_a["metrics"]["val_loss_ema"] == state_b["metrics"]["val_loss_ema"]
    ema_a, ema_b = (load_file(str(ckpt.latest_checkpoint(tmp_path / run / "checkpoints") / ckpt.EMA_FILE))
                    for run in ("straight", "grown"))
    assert ema_a and ema_a.keys() == ema_b.keys() and all(torch.equal(ema_a[k], ema_b[k]) for k in ema_a)


def test_a_resume_on_another_encode_of_the_latents_is_refused(tmp_path, encode_tiny_latents):
    # The same folder encoded again (another VAE, more images): the checkpoint's weights and data position are another
    # data's. The same encode resumes; a checkpoint names the encode it trained on.
    latents = tmp_path / "latents"
    encode_tiny_latents(latents, seed=0)
    cfg = tiny_config(dataset="latents", data_path=str(latents), max_steps=2, val_batch=0,
                      model_overrides=dict(input_size=4, in_channels=4, num_classes=2))
    train(cfg, tmp_path / "run")
    train(dataclasses.replace(cfg, max_steps=3), tmp_path / "run", resume_from="auto")
    earlier = history(tmp_path / "run")[1]["data_encode"]
    encode_tiny_latents(latents, seed=1)
    with pytest.raises(UnloadableCheckpoint, match=rf"step-000000003 was written training on another encode of the "
                                                   rf"latents in {latents} \({earlier}, now [0-9a-f]{{16}}\); resume "
                                                   r"on that encode, or train this one in another folder"):
        train(dataclasses.replace(cfg, max_steps=4), tmp_path / "run", resume_from="auto")


def test_a_run_resumed_on_its_latents_moved_elsewhere_trains_on_as_one_straight_run(tmp_path, encode_tiny_latents):
    # What scaling.continuation builds on for moved data: the same encode read from another path resumes, and the
    # steps after the move are those of a run that never moved (data order and randomness follow the step, not the
    # path).
    here, there = tmp_path / "here", tmp_path / "there"
    encode_tiny_latents(here, seed=0)
    cfg = tiny_config(dataset="latents", data_path=str(here), max_steps=4, val_batch=0, batch_size=8,
                      model_overrides=dict(input_size=4, in_channels=4, num_classes=2))
    train(cfg, tmp_path / "straight")
    train(dataclasses.replace(cfg, max_steps=2), tmp_path / "moved")
    here.rename(there)
    train(dataclasses.replace(cfg, data_path=str(there)), tmp_path / "moved", resume_from="auto")
    (losses_a, state_a), (losses_b, state_b) = history(tmp_path / "straight"), history(tmp_path / "moved")
    assert losses_a == losses_b and len(losses_a) == 2 and state_b["step"] == 4  # logs at 2 and 4
    assert state_a["data_encode"] == state_b["data_encode"] is not None
    ema_a, ema_b = (load_file(str(ckpt.latest_checkpoint(tmp_path / run / "checkpoints") / ckpt.EMA_FILE))
                    for run in ("straight", "moved"))
    assert ema_a and ema_a.keys() == ema_b.keys() and all(torch.equal(ema_a[k], ema_b[k]) for k in ema_a)


def test_a_resume_may_switch_between_zero_1_and_2_and_is_refused_other_stages(tmp_path):
    train(tiny_config(zero_stage=1), tmp_path / "straight", milestones=[6])
    for first, then in ((1, 2), (2, 1), (0, 2), (3, 2)):
        out = tmp_path / f"zero{first}-{then}"
        with pytest.raises(KeyboardInterrupt):
            train(tiny_config(zero_stage=first), out, milestones=[6], callbacks=CrashAt(6))
        if {first, then} == {1, 2}:  # DeepSpeed keeps their optimizer state alike: the resume is exact
            train(tiny_config(zero_stage=then), out, milestones=[6], resume_from="auto")
            assert history(out)[0] == history(tmp_path / "straight")[0]
        else:  # DeepSpeed's own error (a missing file, a None) would not name the setting
            with pytest.raises(ckpt.CheckpointError, match=rf"step-000000006 was written with ZeRO-{first}; this run "
                               rf"has ZeRO-{then} \(a resume may switch between ZeRO-1 and ZeRO-2 only"):
                train(tiny_config(zero_stage=then), out, milestones=[6], resume_from="auto")


def test_validation_loss_is_a_function_of_the_weights_alone(tmp_path):
    # The same 12 steps, validated at step 12, after a validation at step 6 or without one: the same weights
    # (train losses, EMA) must give the same validation loss. A model validated in training mode drops labels
    # at random from the global generator, so its loss moved with whatever drew from it before.
    train(tiny_config(), tmp_path / "once")
    train(tiny_config(), tmp_path / "twice", milestones=[6])
    losses_1, state_1 = history(tmp_path / "once")
    losses_2, state_2 = history(tmp_path / "twice")
    assert losses_1 == losses_2 and state_1["metrics"]["val_loss_ema"] == state_2["metrics"]["val_loss_ema"]
    assert state_1["metrics"]["val_loss"] == state_2["metrics"]["val_loss"]


def test_validation_images_spread_over_the_classes_of_a_folder_sorted_by_class(tmp_path):
    # An image folder has no held-out split: validation draws from its (unflipped) images at a fixed seed
    # rather than taking the first val_batch, which are all of the first class.
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in ("ant", "bee", "cat"):
        (tmp_path / c).mkdir()
        for i in range(8):
            Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(tmp_path / c / f"{i}.png")
    cfg = TrainConfig(model="DiT-P/2", dataset="imagefolder", data_path=str(tmp_path), image_size=8, val_batch=6)
    val = ValidationBatch(cfg, 0, 1, torch.device("cpu"), 1000)
    assert len(val.y) == 6 and len(set(val.y.tolist())) > 1
    folder = build_dataset("imagefolder", split="heldout", path=tmp_path, image_size=8)
    first = val.y.tolist().index(val.y.min().item())
    assert any(torch.equal(val.x[first], folder[i][0]) for i in range(len(folder)))
    assert torch.equal(ValidationBatch(cfg, 0, 1, torch.device("cpu"), 1000).x, val.x)  # the same every time
    # Digits keep their held-out split's first images, which training never sees.
    digits = ValidationBatch(tiny_config(val_batch=5), 0, 1, torch.device("cpu"), 1000)
    assert torch.equal(digits.x, build_dataset("digits", split="heldout").tensors[0][:5])


def test_a_resume_on_an_image_folder_of_other_files_or_labels_is_refused_but_a_moved_one_resumes(tmp_path):
    # Only a count was compared: the same images under renamed class folders (labels swapped, in sorted order)
    # resumed, conditioning the rest of the run on other labels.
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in ("ant", "bee"):
        (tmp_path / "a" / c).mkdir(parents=True)
        for i in range(8):
            Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(tmp_path / "a" / c / f"{i}.png")
    cfg = dict(model="DiT-P/2", model_overrides=dict(input_size=8, in_channels=3, num_classes=2), dataset="imagefolder",
               image_size=8, batch_size=8, max_steps=4, zero_stage=0,
               log_every=2, ckpt_every=2, val_batch=0, num_workers=0)
    train(TrainConfig(data_path=str(tmp_path / "a"), max_steps=2, **{k: v for k, v in cfg.items() if k != "max_steps"}),
          tmp_path / "out")
    (tmp_path / "a").rename(tmp_path / "moved")  # the same files and labels elsewhere: resumes
    train(TrainConfig(data_path=str(tmp_path / "moved"), **cfg), tmp_path / "out", resume_from="auto")
    (tmp_path / "moved" / "ant").rename(tmp_path / "moved" / "zebra")  # bee is now label 0, zebra 1
    with pytest.raises(UnloadableCheckpoint) as err:  # on every rank alike: a retry (Ray's) meets the same files
        train(TrainConfig(data_path=str(tmp_path / "moved"), **{**cfg, "max_steps": 6}), tmp_path / "out",
              resume_from="auto")
    assert str(err.value) == (f"{tmp_path / 'out' / 'checkpoints' / 'step-000000004'} was written training on other "
                              f"files or labels than the image folder {tmp_path / 'moved'} holds now; resume on "
                              "those, or train this one in another folder")


def test_an_in_memory_dataset_too_large_for_the_gpu_stays_in_host_memory():
    gib = 2 ** 30
    assert fits_on_device(7 * 2 ** 20, torch.device("cuda"), free_bytes=70 * gib)  # the digits
    assert not fits_on_device(42 * 10 ** 9, torch.device("cuda"), free_bytes=70 * gib)  # ImageNet latents, 2 views
    assert fits_on_device(42 * 10 ** 9, torch.device("cpu"))
    # Copied batch by batch or indexed in place, the batches are the same.
    dataset = build_dataset("digits")
    sources = [iter(BatchSource(dataset, ShardedBatchSampler(len(dataset), 32, seed=1), torch.device("cpu"), 0,
                                resident=resident)) for resident in (True, False)]
    for _ in range(3):
        (x_a, y_a), (x_b, y_b) = (next(s) for s in sources)
        assert torch.equal(x_a, x_b) and torch.equal(y_a, y_b) and x_a.shape == (32, 1, 8, 8)


def test_milestones_checkpoints_and_pruning(tmp_path):
    seen, logs, saved = [], [], []

    class Record(Callbacks):
        def on_log(self, trial, metrics):
            logs.append((trial.step, trial.checkpoints_this_step()))

        def on_milestone(self, trial, metrics):
            seen.append((trial.step, round(metrics["val_loss"], 6)))
            return {"fid": 1.0}

        def on_checkpoint(self, trial, path, metrics):
            saved.append(trial.step)

    metrics = train(tiny_config(keep_checkpoints=2, ckpt_every=5), tmp_path, milestones=[4, 8], callbacks=Record())
    assert [s for s, _ in seen] == [4, 8, 12]
    # A log knows whether a checkpoint follows it (scaling's held logs ride on that checkpoint's report).
    assert saved == [4, 5, 8, 10, 12] and logs == [(2, False), (4, True), (6, False), (8, True), (10, True), (12, True)]
    assert metrics["fid"] == 1.0 and metrics["step"] == 12
    # 6 flops per forward multiply-add, by torch's own count of the model's (a factor wrong here misstates MFU).
    from core.flops import measure_gflops
    from core.models import DiT

    with torch.device("meta"):
        forward = measure_gflops(DiT(**tiny_config().resolved_model_config()))
    assert metrics["images_per_s"] > 0
    assert metrics["achieved_tflops"] == pytest.approx(metrics["images_per_s"] * 6 * forward * 1e9 / 1e12, rel=1e-3)
    assert "mfu" not in metrics  # no peak given
    # Checkpoints at 4, 5, 8, 10, 12; the newest two kept.
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "checkpoints")] == ["step-000000010", "step-000000012"]
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))


def test_mfu_is_the_achieved_flops_over_the_peak_of_every_process(tmp_path):
    metrics = train(tiny_config(max_steps=2, peak_tflops=0.5), tmp_path)
    assert metrics["mfu"] == pytest.approx(metrics["achieved_tflops"] / 0.5, rel=1e-12)  # one process


def test_a_resume_from_an_earlier_checkpoint_replaces_the_later_one_of_the_same_step(tmp_path):
    cfg = tiny_config(max_steps=6, ckpt_every=3)
    train(cfg, tmp_path)
    checkpoints = tmp_path / "checkpoints"
    first = (checkpoints / "step-000000006").stat().st_ino
    losses_first, _ = history(tmp_path)
    train(cfg, tmp_path, resume_from=checkpoints / "step-000000003")  # steps 4..6 again, step 6 saved again
    # The log of step 4 (log_every 2) averages steps 3 and 4 again: step 3's loss is kept in its checkpoint.
    assert [p.name for p in ckpt.list_checkpoints(checkpoints)] == ["step-000000003", "step-000000006"]
    assert (checkpoints / "step-000000006").stat().st_ino != first and history(tmp_path)[0] == losses_first
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-000000003", "step-000000006"]  # nothing stale


def test_a_resume_past_max_steps_is_refused_naming_both(tmp_path):
    # The loop took no step and the run ended as if it were done, at the later checkpoint's weights.
    train(tiny_config(max_steps=4, ckpt_every=2), tmp_path)
    step_4 = tmp_path / "checkpoints" / "step-000000004"
    # Unloadable, as every rank finds it (Ray retried it, as it retries a crash, to the same end).
    with pytest.raises(UnloadableCheckpoint, match=re.escape(
            f"{step_4} is at step 4, past max_steps 2: resume from a checkpoint at or before step 2, or train to 4 "
            "steps or more")):
        train(tiny_config(max_steps=2, ckpt_every=2), tmp_path, resume_from=step_4)
    before = {p.name: p.stat().st_mtime_ns for p in ckpt.list_checkpoints(tmp_path / "checkpoints")}
    # At max_steps: a finished run, which returns its checkpoint's metrics (it returned none).
    metrics = train(tiny_config(max_steps=4, ckpt_every=2), tmp_path, resume_from=step_4)
    assert before == {p.name: p.stat().st_mtime_ns for p in ckpt.list_checkpoints(tmp_path / "checkpoints")}
    assert "step-000000004" in before  # it trained nothing and wrote nothing
    saved = json.loads((step_4 / ckpt.STATE_FILE).read_text())
    assert metrics == saved["metrics"] and metrics["step"] == 4 and "val_loss" in metrics
    saved["sampler"]["batch"] = 10**6  # a data position of other data: as unloadable
    (step_4 / ckpt.STATE_FILE).write_text(json.dumps(saved))
    with pytest.raises(UnloadableCheckpoint, match=f"^{re.escape(str(step_4 / ckpt.STATE_FILE))} does not match "
                                                   "this run's data: sampler state has batch=1000000"):
        train(tiny_config(max_steps=6, ckpt_every=2), tmp_path, resume_from=step_4)


def _resume_at(rank, steps, store_path, out):
    """One of two gloo processes: check_ranks_resume_alike with this rank's resumed step; what it raised, to out."""
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.FileStore(store_path, 2), rank=rank, world_size=2)
    try:
        check_ranks_resume_alike(steps[rank], "/shared/checkpoints", torch.device("cpu"))
        out.put((rank, None))
    except ckpt.CheckpointError as e:
        out.put((rank, str(e)))
    finally:
        dist.destroy_process_group()


def _spread_as_rank(rank, store_path, out):
    """One of two gloo processes: ranks_spread of 10 + rank, to out."""
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.FileStore(store_path, 2), rank=rank, world_size=2)
    try:
        out.put((rank, ranks_spread(10 + rank, torch.device("cpu"))))
    finally:
        dist.destroy_process_group()


def test_every_rank_learns_the_lowest_and_highest_of_a_count():
    # What the data-size and resume checks of core.train compare: each rank's dataset size or resumed step.
    assert ranks_spread(7, torch.device("cpu")) == (7, 7)  # alone


def test_ranks_spread_across_two_processes(tmp_path):
    assert on_two_ranks(_spread_as_rank, store=tmp_path / "store") == {0: (10, 11), 1: (10, 11)}


@pytest.mark.parametrize("steps, error", [
    ((6, 6), None), ((-1, -1), None),
    ((6, 12), "the processes resume from different checkpoints (step 6 to step 12) under /shared/checkpoints: every "
              "node must see the same checkpoints there (a shared folder; give the checkpoint's path to resume from)"),
    ((12, -1), "the processes resume from different checkpoints (a fresh start to step 12) under /shared/checkpoints"),
])
def test_ranks_that_resume_from_different_checkpoints_all_stop(tmp_path, steps, error):
    # Each rank picks "auto"'s newest checkpoint from its own listing of the folder; where the nodes list it apart
    # (node-local folders, a lagging network file system) they trained on from different weights, unnoticed.
    said = on_two_ranks(_resume_at, steps, store=tmp_path / "store")
    for rank in range(2):
        assert (said[rank] is None) if error is None else said[rank].startswith(error), said


def _check_shared_as_rank(rank, folders, store_path, out):
    """One of two gloo processes: check_folder_shared of folders[rank] (no wait for a late marker), to out."""
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.FileStore(store_path, 2), rank=rank, world_size=2)
    try:
        check_folder_shared(Path(folders[rank]), rank, torch.device("cpu"), wait_s=0)
        out.put((rank, sorted(p.name for p in Path(folders[rank]).iterdir())))
    except ckpt.CheckpointError as err:
        out.put((rank, str(err)))
    finally:
        dist.destroy_process_group()


def test_a_checkpoint_folder_that_is_not_shared_by_the_ranks_stops_them_all(tmp_path):
    # Each node's own folder under torchrun: the run trained to its end, rank 0 renaming its own checkpoints while the
    # other nodes' optimizer shards piled up in .tmp-step-* folders, unpruned; the first resume then failed.
    shared = tmp_path / "shared"
    said = on_two_ranks(_check_shared_as_rank, [str(shared)] * 2, store=tmp_path / "store")
    assert said == {0: [], 1: []}  # the marker is gone
    local = [str(tmp_path / "node0"), str(tmp_path / "node1")]
    (tmp_path / "node1").mkdir()
    said = on_two_ranks(_check_shared_as_rank, local, store=tmp_path / "store2")
    for rank in range(2):
        assert said[rank] == (f"{local[rank]} is not one folder shared by every process: some do not see what rank 0 "
                              "writes there (a folder on each node's own disk?); the checkpoints of a run of several "
                              "nodes go to a folder every node sees")
    assert not list((tmp_path / "node0").iterdir()) and not list((tmp_path / "node1").iterdir())
    # Rank 0 cannot write its marker (a file where its folder goes): every rank stops, none waits at a barrier.
    (tmp_path / "a-file").write_text("")
    unwritable = [str(tmp_path / "a-file" / "checkpoints"), str(shared)]
    said = on_two_ranks(_check_shared_as_rank, unwritable, store=tmp_path / "store3")
    assert said == {0: f"{unwritable[0]} cannot be written: Not a directory",
                    1: f"{shared} cannot be written by another process"}


def test_every_checkpoint_report_names_its_own_step(tmp_path):
    # Checkpoints before the first log, or between two logs, carried the last log's metrics: no step, or an
    # earlier one, under which the driver would file the checkpoint.
    reported = []

    class Record(Callbacks):
        def on_checkpoint(self, trial, path, metrics):
            reported.append((trial.step, metrics.get("step")))

    train(tiny_config(max_steps=6, log_every=4, ckpt_every=1, val_batch=0), tmp_path, callbacks=Record())
    assert reported == [(s, s) for s in range(1, 7)]


def test_loss_falls_and_ema_differs_from_weights(tmp_path):
    losses, _ = [], None
    train(tiny_config(max_steps=30, log_every=5), tmp_path)
    losses, state = history(tmp_path)
    assert losses[-1] < 0.6 * losses[0]
    assert state["metrics"]["val_loss_ema"] != state["metrics"]["val_loss"]


def test_divergence_stops_at_once(tmp_path):
    with pytest.raises(TrainingDiverged, match="diverged at step 2: loss nan"):
        train(tiny_config(lr=1e30, max_steps=5, log_every=1), tmp_path)


def test_checkpoints_are_ordered_by_step_past_nine_digits(tmp_path):
    for step in (999_999_999, 10**9, 10**9 + 1):
        (tmp_path / ckpt.checkpoint_name(step)).mkdir()
        (tmp_path / ckpt.checkpoint_name(step) / ckpt.STATE_FILE).write_text("{}")
    (tmp_path / "step-latest").mkdir()  # not a step: ignored, never pruned
    (tmp_path / "step-latest" / ckpt.STATE_FILE).write_text("{}")
    assert ckpt.latest_checkpoint(tmp_path).name == "step-1000000001"
    ckpt.prune_checkpoints(tmp_path, 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-1000000000", "step-1000000001", "step-latest"]


def test_checkpoint_errors_name_the_file(tmp_path):
    cfg = tiny_config(max_steps=2)
    train(cfg, tmp_path / "run")
    good = ckpt.latest_checkpoint(tmp_path / "run" / "checkpoints")

    with pytest.raises(ckpt.CheckpointError, match="checkpoint not found: .*nowhere"):
        train(cfg, tmp_path / "x", resume_from=tmp_path / "nowhere")

    other = tiny_config(max_steps=4, model="DiT-N/2")
    with pytest.raises(ckpt.CheckpointError, match="trainer_state.json belongs to another model"):
        train(other, tmp_path / "x", resume_from=good)

    # Another lr: not the run the checkpoint is of (max_steps may grow under a constant lr, as above and below).
    with pytest.raises(ckpt.CheckpointError, match=f"^{re.escape(str(good))} was written by a run with other "
                                                   r"settings: lr 0\.001 \(now 0\.002\); seed 0 \(now 1\); resume "):
        train(tiny_config(max_steps=4, lr=2e-3, seed=1), tmp_path / "x", resume_from=good)
    train(tiny_config(max_steps=2, lr_schedule="cosine"), tmp_path / "cosine")
    with pytest.raises(ckpt.CheckpointError, match=r"settings: max_steps 2 \(now 4\); resume"):
        train(tiny_config(max_steps=4, lr_schedule="cosine"), tmp_path / "x", resume_from="auto",
              checkpoint_dir=tmp_path / "cosine" / "checkpoints")
    assert not (tmp_path / "x").exists()  # refused before anything is written
    resumed = train(tiny_config(max_steps=3, image_size=8), tmp_path / "y", resume_from=good)  # digits take no size
    assert resumed["step"] == 3

    cut = tmp_path / "cut"
    import shutil
    shutil.copytree(good, cut)
    data = (cut / ckpt.EMA_FILE).read_bytes()
    (cut / ckpt.EMA_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(ckpt.CheckpointError, match="ema.safetensors cannot be loaded"):
        train(tiny_config(max_steps=4), tmp_path / "x", resume_from=cut)

    (cut / ckpt.STATE_FILE).write_text("{not json")
    with pytest.raises(ckpt.CheckpointError, match="trainer_state.json is corrupt"):
        train(tiny_config(max_steps=4), tmp_path / "x", resume_from=cut)

    (cut / ckpt.STATE_FILE).unlink()
    with pytest.raises(ckpt.CheckpointError, match="trainer_state.json is missing"):
        train(tiny_config(max_steps=4), tmp_path / "x", resume_from=cut)


def test_a_checkpoint_folder_that_cannot_be_resumed_from_is_refused_on_every_rank(tmp_path, monkeypatch):
    # "auto"'s newest checkpoint without its trainer state, or a trainer state this user cannot read, raised on the
    # rank that met it alone (a plain CheckpointError, or a PermissionError's traceback), the others going on.
    train(tiny_config(max_steps=2, ckpt_every=2, val_batch=0), tmp_path)
    checkpoints = tmp_path / "checkpoints"
    (checkpoints / ckpt.checkpoint_name(4)).mkdir()
    with pytest.raises(UnloadableCheckpoint, match=f"^{checkpoints / ckpt.checkpoint_name(4) / ckpt.STATE_FILE} is "
                                                   "missing: "):
        train(tiny_config(max_steps=6, ckpt_every=2, val_batch=0), tmp_path, resume_from="auto")
    (checkpoints / ckpt.checkpoint_name(4)).rmdir()
    read_text = Path.read_text

    def unreadable(path, *args, **kwargs):
        if path.name == ckpt.STATE_FILE:
            raise PermissionError(13, "Permission denied", str(path))
        return read_text(path, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", unreadable)
    state_file = checkpoints / ckpt.checkpoint_name(2) / ckpt.STATE_FILE
    with pytest.raises(UnloadableCheckpoint, match=f"^{state_file} cannot be read: Permission denied$"):
        train(tiny_config(max_steps=6, ckpt_every=2, val_batch=0), tmp_path, resume_from="auto")


class FailingEngine:
    """What load_checkpoint asks of a DeepSpeed engine, whose loader raises a given error."""

    def __init__(self, error):
        self.error, self.global_steps = error, 2

    def bfloat16_enabled(self):
        return False

    def load_checkpoint(self, load_dir, tag):
        raise self.error


def test_only_errors_of_the_files_make_a_checkpoint_unloadable(tmp_path):
    from core.ema import EMA
    from core.models import DiT

    train(tiny_config(max_steps=2, ckpt_every=2, val_batch=0), tmp_path)
    step_2 = ckpt.latest_checkpoint(tmp_path / "checkpoints")
    mcfg = json.loads((step_2 / ckpt.STATE_FILE).read_text())["model_config"]
    ema = EMA(DiT(**mcfg), 0.9)
    # The machine's or the process group's: a retry may load the checkpoint (it was named one to delete).
    passed = [torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
              torch.distributed.DistBackendError("NCCL error in: ProcessGroupNCCL.cpp, remote process exited"),
              RuntimeError("[../third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:81] Timed out waiting 1800000ms "
                           "for recv operation to complete"),
              OSError(5, "Input/output error")]
    # The files': DeepSpeed's bare assertion of a missing file, a state dict of other keys or shapes.
    unloadable = {AssertionError(): "AssertionError", KeyError("optimizer"): "'optimizer'",
                  RuntimeError("Error(s) in loading state_dict for DiT: size mismatch for pos_embed"):
                  "Error(s) in loading state_dict for DiT: size mismatch for pos_embed"}
    for error in [*passed, *unloadable]:
        agreed = []
        with pytest.raises(Exception) as raised:
            ckpt.load_checkpoint(step_2, FailingEngine(error), ema, mcfg, 1, 0, 0, agree=agreed.append)
        assert agreed == [None]  # every file this rank reads was found whole before DeepSpeed's loader
        if error in passed:
            assert raised.value is error
        else:
            assert isinstance(raised.value, ckpt.CheckpointError)
            assert str(raised.value) == f"{step_2 / ckpt.ENGINE_DIR} cannot be loaded: {unloadable[error]}"


EAGER_START = """
import os, sys, torch
from core.train import TrainConfig, train
train(TrainConfig(model="DiT-P/2", dataset="digits", batch_size=32, max_steps=2, zero_stage=2,
                  val_batch=32, num_workers=0), sys.argv[1])
print("inductor compiler imported:", "torch._inductor.compile_fx" in sys.modules)
print("TORCHDYNAMO_DISABLE:", os.environ.get("TORCHDYNAMO_DISABLE"))
print("PYTORCH_NVML_BASED_CUDA_CHECK:", os.environ.get("PYTORCH_NVML_BASED_CUDA_CHECK"))
graphs = []
def count_graphs(gm, example_inputs):
    graphs.append(gm)
    return gm.forward
assert torch.compile(lambda x: x * 2 + 1, backend=count_graphs)(torch.ones(3)).tolist() == [3.0, 3.0, 3.0]
print("graphs compiled afterwards:", len(graphs))
"""


def test_an_eager_trial_does_not_import_the_compiler(tmp_path, fresh_process_env):
    # DeepSpeed's ZeRO imports its Muon module, whose torch.compile decorators import Inductor's compiler
    # (seconds of every trial's start); core imports that module with TorchDynamo off. Afterwards compiling
    # works as before and the environment is as it was. A fresh process: the test session may have compiled.
    # DeepSpeed's import sets torch's NVML-based CUDA check for good (0.3 ms a step on CPU): it is unset again.
    env = {k: v for k, v in fresh_process_env.items()
           if k not in ("TORCHDYNAMO_DISABLE", "PYTORCH_NVML_BASED_CUDA_CHECK")}
    proc = subprocess.run([sys.executable, "-c", EAGER_START, str(tmp_path)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.splitlines()[-4:] == ["inductor compiler imported: False", "TORCHDYNAMO_DISABLE: None",
                                             "PYTORCH_NVML_BASED_CUDA_CHECK: None", "graphs compiled afterwards: 1"]


@pytest.mark.parametrize("user_setting", [None, "0", "1"])
def test_deepspeeds_import_leaves_torchs_cuda_check_as_the_user_set_it(fresh_process_env, user_setting):
    check = "PYTORCH_NVML_BASED_CUDA_CHECK"
    env = {k: v for k, v in fresh_process_env.items() if k != check}
    if user_setting is not None:
        env[check] = user_setting
    code = ("import os, sys; from core.train import import_deepspeed; ds = import_deepspeed(); "
            "print(os.environ.get('{0}'), import_deepspeed() is ds is sys.modules['deepspeed'])")
    plain = subprocess.run([sys.executable, "-c", f"import os, deepspeed; print(os.environ.get('{check}'))"],
                           cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert plain.returncode == 0, plain.stderr[-3000:]
    assert plain.stdout.split()[-1] == (user_setting or "1")  # DeepSpeed's own import: "1" unless the user set it
    proc = subprocess.run([sys.executable, "-c", code.format(check)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split()[-2:] == [str(user_setting), "True"]


@pytest.mark.parametrize("mlflow_first", [False, True])
def test_deepspeeds_import_leaves_mlflow_to_whoever_uses_it(fresh_process_env, mlflow_first):
    # DeepSpeed's autotuner imports MLflow where it can (most of DeepSpeed's import time): not while
    # import_deepspeed imports it, and `import mlflow` works afterwards; an MLflow imported before is left as it is.
    code = ("import sys\n" + ("import mlflow\n" if mlflow_first else "")
            + "from core.train import import_deepspeed\nimport_deepspeed()\n"
              "from deepspeed.autotuning import autotuner\n"
              "print('mlflow' in sys.modules, autotuner.has_mlflow)\n"
              "import mlflow\nprint(mlflow.__name__, callable(mlflow.set_tracking_uri))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=fresh_process_env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split()[-4:] == [str(mlflow_first), str(mlflow_first), "mlflow", "True"]


def torchrun(out, zero_stage, nproc=2, resume="none", val_batch=32, max_steps=12, fails=False, extra=()):
    # --standalone: the agent binds a free port itself. A port picked here and closed again could be taken before
    # torchrun bound it (EADDRINUSE once in the parallel suite, beside Ray's workers).
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--standalone",
           "-m", "core.train", "--model", "DiT-P/2", "--dataset", "digits", "--results-dir", str(out),
           "--global-batch-size", "32", "--max-steps", str(max_steps), "--log-every", "2", "--lr", "1e-3",
           "--ema-decay", "0.9", "--val-batch", str(val_batch), "--zero-stage", str(zero_stage), "--num-workers", "0",
           "--ckpt-every", "6", "--resume", resume, *extra]
    # Its own extensions folder: whatever DeepSpeed compiles at run time shows up there.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCH_EXTENSIONS_DIR": str(Path(out).parent / "torch_extensions")}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    if fails:  # its stderr
        assert proc.returncode != 0
        return proc.stderr
    assert proc.returncode == 0, proc.stderr[-3000:]
    return history(Path(out) / "DiT-P-2")


def fp32_masters_and_ema(run, zero_stage):
    """The fp32 master weights of a bf16 ZeRO run's latest checkpoint and its EMA: ZeRO-2's reassembled by DeepSpeed's
    own tool, ZeRO-0's (whole, in its optimizer's state) named in the order of the model's trained parameters."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    latest = ckpt.latest_checkpoint(Path(run) / "checkpoints")
    ema = load_file(str(latest / ckpt.EMA_FILE))
    if zero_stage == 0:
        saved = torch.load(latest / ckpt.ENGINE_DIR / ckpt.ENGINE_TAG / "mp_rank_00_model_states.pt", weights_only=False)
        from core.models import DiT

        mcfg = json.loads((latest / ckpt.STATE_FILE).read_text())["model_config"]
        names = [n for n, p in DiT(**mcfg).named_parameters() if p.requires_grad]  # the optimizer's order
        (group,) = saved["optimizer"]["fp32_groups"]
        return dict(zip(names, group, strict=True)), ema
    masters = get_fp32_state_dict_from_zero_checkpoint(str(latest / ckpt.ENGINE_DIR), tag=ckpt.ENGINE_TAG,
                                                       exclude_frozen_parameters=True)
    return masters, ema


@pytest.mark.parametrize("nproc, zero_stage", [(1, 2), (2, 2), (1, 0), (2, 0), (2, 3)])
def test_under_bf16_the_ema_averages_the_fp32_masters_not_the_bf16_weights(tmp_path, nproc, zero_stage):
    # DeepSpeed's bf16 module is a rounding of the fp32 masters its optimizer steps (a bf16 step at 0.02 is about one
    # AdamW step at lr 1e-4): the EMA averaged that rounding. With decay 0 the EMA is the last weights it followed.
    # Under ZeRO-2 two processes each hold half of the masters: each moves its half, and the halves are gathered at a
    # checkpoint; ZeRO-0's optimizer holds them whole on every process.
    extra = ["--precision", "bf16", "--ema-decay", "0", "--log-every", "3"]
    if nproc == 1:
        train(tiny_config(max_steps=6, ckpt_every=6, precision="bf16", zero_stage=zero_stage, ema_decay=0.0),
              tmp_path / "run")
        run = tmp_path / "run"
    else:
        torchrun(tmp_path / "two", zero_stage, max_steps=6, extra=extra)
        run = tmp_path / "two" / "DiT-P-2"
    masters, ema = fp32_masters_and_ema(run, zero_stage)
    assert masters.keys() == ema.keys() - {"pos_embed"} and len(masters) > 10
    assert all(torch.equal(ema[k], masters[k]) for k in masters), [k for k in masters if not torch.equal(ema[k], masters[k])]
    rounded = sum(torch.equal(v, v.bfloat16().float()) for v in masters.values() if v.numel() > 1)
    assert rounded < 3  # the masters are no bf16 values: the EMA did not take the module's
    from core.models import get_2d_sincos_pos_embed  # the fixed positions keep their fp32 values, not a rounding

    assert torch.equal(ema["pos_embed"][0], torch.from_numpy(get_2d_sincos_pos_embed(64, 4)).float())


@pytest.mark.parametrize("zero_stage", [2, 3])
def test_two_gloo_processes_match_one(tmp_path, zero_stage):
    train(tiny_config(zero_stage=zero_stage), tmp_path / "one")
    losses_1, state_1 = history(tmp_path / "one")
    losses_2, state_2 = torchrun(tmp_path / "two", zero_stage)
    assert state_2["world_size"] == 2 and state_2["zero_stage"] == zero_stage
    # Nothing was compiled: DeepSpeed's shared-memory all-reduce op (inference only) took a minute on a fresh machine.
    assert not list((tmp_path / "torch_extensions").rglob("*.so"))
    assert losses_2[-1] < 0.7 * losses_2[0]
    # Same global batch, same per-sample noise: only reduction order and thread count differ, so the
    # stated tolerance for several processes is 1e-4 relative on training losses and on the validation
    # loss after 12 steps (seen: 7e-8 and 1e-8).
    assert losses_2 == pytest.approx(losses_1, rel=1e-4, abs=1e-5)
    assert state_2["metrics"]["val_loss"] == pytest.approx(state_1["metrics"]["val_loss"], rel=1e-4)
    # Resumed by two processes from that run's step-6 checkpoint: the same losses as the run that
    # never stopped, within the same tolerance (reduction order is the only difference).
    step_6 = tmp_path / "two" / "DiT-P-2" / "checkpoints" / ckpt.checkpoint_name(6)
    losses_r, state_r = torchrun(tmp_path / "resumed", zero_stage, resume=str(step_6))
    assert state_r["step"] == 12 and len(losses_r) == len(losses_2)
    assert losses_r == pytest.approx(losses_2, rel=1e-4, abs=1e-5)
    assert state_r["metrics"]["val_loss"] == pytest.approx(state_2["metrics"]["val_loss"], rel=1e-4)
    if zero_stage == 2:  # rank 1's own shard damaged: rank 1 names it, rank 0 stops too (it waited in a collective)
        shard = next(step_6.rglob("*zero_pp_rank_1_*optim_states.pt"))
        assert f"{ckpt.ENGINE_DIR}/{ckpt.ENGINE_TAG}/{shard.name}" in json.loads(
            (step_6 / "checksums-rank1.json").read_text())  # rank 1's record, not rank 0's
        data = bytearray(shard.read_bytes())
        data[len(data) // 2] ^= 0x10
        shard.write_bytes(bytes(data))
        err = torchrun(tmp_path / "damaged", zero_stage, resume=str(step_6), fails=True)
        assert f"error: {shard} is damaged: its contents are not those written" in err, err[-3000:]
        assert f"error: {step_6} cannot be resumed from by another process (its error names the file)" in err, \
            err[-3000:]
    if zero_stage == 3:  # rank 1's own module states gone: rank 1 failed inside DeepSpeed's loader, rank 0 waited in
        # its closing all-gather, rank 1 in the refusal's all-reduce, for good
        own = step_6 / ckpt.ENGINE_DIR / ckpt.ENGINE_TAG / "zero_pp_rank_1_mp_rank_00_model_states.pt"
        own.unlink()
        err = torchrun(tmp_path / "missing", zero_stage, resume=str(step_6), fails=True)
        assert f"error: {own} is missing: {step_6} is not a complete checkpoint" in err, err[-3000:]
        assert f"error: {step_6} cannot be resumed from by another process (its error names the file)" in err, \
            err[-3000:]


#################################################################################
#        What one step optimises and reports, checked outside the trainer       #
#################################################################################

CPU = torch.device("cpu")


def first_batch(cfg):
    """The first global batch of digits as ShardedBatchSampler documents it: epoch 0's permutation."""
    images, labels = build_dataset("digits", split="train").tensors
    perm = ShardedBatchSampler(len(images), cfg.batch_size, seed=cfg.seed).permutation(0)[:cfg.batch_size]
    return images[perm], labels[perm]


def test_the_reported_loss_of_the_first_step_is_mse_plus_vb_of_its_batch(tmp_path):
    # One step of a learn_sigma model from the initial weights: the loss it reports is the diffusion loss of the
    # paper (ε-MSE + the VB of the learned variance) of the batch, noise, timesteps and label drops it drew.
    from core.diffusion import create_diffusion
    from core.models import DiT
    from core.train import step_randomness

    cfg = tiny_config(max_steps=1, log_every=1, val_batch=0)
    seen = {}

    class Keep(Callbacks):
        def on_log(self, trial, metrics):
            seen["loss"] = metrics["train_loss"]
            seen["out_weight"] = trial.engine.module.final_layer.linear.weight.detach().clone()

    train(cfg, tmp_path, callbacks=Keep())

    mcfg = cfg.resolved_model_config()
    assert mcfg["learn_sigma"] and mcfg["in_channels"] == 1
    # On the trainer's device: a GPU's generator draws other noise than the CPU's for the same seed (a lent H200
    # failed this test when it recomputed on the CPU).
    device = torch.device("cuda") if torch.cuda.is_available() else CPU
    torch.manual_seed(cfg.seed)
    model = DiT(**mcfg).train().to(device)  # the trainer's initial weights
    x, y = (v.to(device) for v in first_batch(cfg))
    t, noise, drop = step_randomness(cfg.seed, 0, cfg.batch_size, (1, 8, 8), mcfg["class_dropout_prob"],
                                     cfg.diffusion_steps, device)
    terms = create_diffusion(learn_sigma=True, diffusion_steps=cfg.diffusion_steps).training_losses(
        model, x, t, dict(y=y, force_drop_ids=drop), noise=noise)
    mse, vb = terms["mse"].mean().item(), terms["vb"].mean().item()
    assert vb > 1e-3 * mse  # the VB term is far above the tolerance: a loss without it shows
    # A GPU's reductions may be ordered otherwise between the two computations.
    assert seen["loss"] == pytest.approx(mse + vb, rel=1e-6 if device == CPU else 1e-5)
    # The VB alone reaches the variance outputs (the zero-initialised output layer's rows for channel 1 of each
    # patch position): the first step moved them off zero.
    rows = seen["out_weight"].reshape(2, 2, 2, -1)  # (p, p, 2C, D)
    assert torch.count_nonzero(rows[:, :, 1]) == rows[:, :, 1].numel()


def test_labels_are_dropped_to_the_null_class_where_step_randomness_says(tmp_path, monkeypatch):
    # With class_dropout_prob p, step s replaces label i by the null class exactly where step_randomness(seed, s)
    # drew it: what the model embeds is recorded at its label embedding.
    from core.models import DiT
    from core.train import step_randomness

    embedded = []

    def recording_dit(**kwargs):
        model = DiT(**kwargs)
        model.y_embedder.embedding_table.register_forward_pre_hook(lambda m, args: embedded.append(args[0].clone()))
        return model

    monkeypatch.setattr("core.train.DiT", recording_dit)
    p = 0.3
    cfg = tiny_config(max_steps=2, log_every=1, val_batch=0, seed=3, model_overrides={"class_dropout_prob": p})
    train(cfg, tmp_path)

    assert len(embedded) == 2
    images, labels = build_dataset("digits", split="train").tensors
    perm = ShardedBatchSampler(len(images), cfg.batch_size, seed=cfg.seed).permutation(0)
    drops = 0
    for step in range(2):
        y = labels[perm[step * cfg.batch_size:(step + 1) * cfg.batch_size]]
        _, _, drop = step_randomness(cfg.seed, step, cfg.batch_size, (1, 8, 8), p, cfg.diffusion_steps, CPU)
        assert torch.equal(embedded[step], torch.where(drop == 1, 10, y)), step  # 10: the null class
        drops += int(drop.sum())
    assert 0 < drops < 2 * cfg.batch_size


def test_lr_schedules():
    from core.optim import lr_lambda

    warm, total = 4, 12
    # Linear warmup from 1/warm at step 0 to 1 at step warm - 1, the same for every schedule.
    for schedule in ("constant", "cosine", "linear"):
        f = lr_lambda(schedule, warm, total)
        assert [f(s) for s in range(warm)] == [0.25, 0.5, 0.75, 1.0], schedule
    constant, cosine, linear = (lr_lambda(s, warm, total) for s in ("constant", "cosine", "linear"))
    assert [constant(s) for s in (4, 8, 12, 20)] == [1.0] * 4
    # After warmup, progress (step - warm) / (total - warm): cosine 0.5 (1 + cos(π progress)), linear 1 - progress,
    # both 0 from total on.
    assert [cosine(s) for s in (4, 8, 12, 13)] == pytest.approx([1.0, 0.5, 0.0, 0.0], abs=1e-15)
    assert cosine(6) == pytest.approx(0.5 * (1 + np.cos(np.pi / 4)), rel=1e-15)
    assert [linear(s) for s in (4, 6, 8, 10, 12, 13)] == pytest.approx([1.0, 0.75, 0.5, 0.25, 0.0, 0.0], abs=1e-15)
    assert lr_lambda("cosine", 0, 10)(0) == 1.0 and lr_lambda("linear", 0, 10)(5) == 0.5
    with pytest.raises(ValueError, match="lr_schedule"):
        lr_lambda("step", 0, 10)


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_the_reported_lr_is_the_one_its_step_trained_with(tmp_path, grad_accum):
    # LambdaLR starts at factor(0) and moves on after each update: step k (1-based) trains with factor(k - 1).
    # Read after the update, the lr would be the next step's (a cosine run's last row said 0).
    from core.optim import lr_lambda

    cfg = tiny_config(lr_schedule="cosine", warmup_steps=3, max_steps=8, log_every=1, grad_accum=grad_accum)
    train(cfg, tmp_path / "run")
    seen = [h["lr"] for h in history(tmp_path / "run")[1]["history"]]
    factor = lr_lambda("cosine", 3, 8)
    assert seen == pytest.approx([cfg.lr * factor(k - 1) for k in range(1, 9)], rel=1e-12)
    assert seen[-1] > 0


def test_resume_is_bitwise_with_a_warmup_and_cosine_schedule(tmp_path):
    # The schedule's position is part of the checkpoint: a resumed run goes on with the lr of the step it stopped
    # at, not the warmup's first one.
    cfg = tiny_config(lr_schedule="cosine", warmup_steps=4)
    train(cfg, tmp_path / "straight", milestones=[6])
    with pytest.raises(KeyboardInterrupt):
        train(cfg, tmp_path / "resumed", milestones=[6], callbacks=CrashAt(6))
    train(cfg, tmp_path / "resumed", milestones=[6], resume_from="auto")

    losses_a, state_a = history(tmp_path / "straight")
    losses_b, state_b = history(tmp_path / "resumed")
    assert len(losses_a) == 6 and losses_a == losses_b
    lrs_a, lrs_b = ([h["lr"] for h in s["history"]] for s in (state_a, state_b))
    assert lrs_a == lrs_b and len(set(lrs_a)) == 6  # every logged lr is a different point of the schedule
    assert state_a["metrics"]["val_loss"] == state_b["metrics"]["val_loss"]


def test_two_accumulated_micro_batches_match_one_batch(tmp_path):
    # The same global batch in two micro-batches of 16: the gradients accumulate to those of one batch of 32,
    # so losses agree up to summation order (seen: 1.4e-7 relative), and the reported loss is the batch's mean.
    train(tiny_config(max_steps=6, log_every=1), tmp_path / "one")
    train(tiny_config(max_steps=6, log_every=1, grad_accum=2), tmp_path / "two")
    losses_1, state_1 = history(tmp_path / "one")
    losses_2, state_2 = history(tmp_path / "two")
    assert len(losses_1) == 6 and losses_1[0] == pytest.approx(losses_2[0], rel=1e-6)
    assert losses_2 == pytest.approx(losses_1, rel=1e-5)
    assert state_2["metrics"]["val_loss"] == pytest.approx(state_1["metrics"]["val_loss"], rel=1e-5)
    assert state_2["config"]["grad_accum"] == 2


def test_a_validation_batch_smaller_than_the_world_validates_under_zero_3(tmp_path):
    # One image for two processes: the rank without one still runs the model (ZeRO-3 gathers the weights in every
    # forward, collectively; a rank that skipped it hung the other), and counts nothing.
    train(tiny_config(zero_stage=3, val_batch=1, max_steps=2), tmp_path / "one")
    _, state_1 = history(tmp_path / "one")
    _, state_2 = torchrun(tmp_path / "two", 3, val_batch=1, max_steps=2)
    assert state_2["metrics"]["val_loss"] == pytest.approx(state_1["metrics"]["val_loss"], rel=1e-4)
    assert state_2["metrics"]["val_loss_ema"] == pytest.approx(state_1["metrics"]["val_loss_ema"], rel=1e-4)


def test_pruning_keeps_the_newest_checkpoints_in_every_ranks_folder(tmp_path):
    def folders(steps, state):
        root = tmp_path / f"{state}-{len(list(tmp_path.iterdir()))}"
        for step in steps:
            (root / ckpt.checkpoint_name(step)).mkdir(parents=True)
            if state:
                (root / ckpt.checkpoint_name(step) / ckpt.STATE_FILE).write_text("{}")
        return root

    def left(root):
        return sorted(int(p.name.split("-")[1]) for p in root.iterdir())

    # Rank 0's (or a shared) folder: the newest two marked ones stay; an older one a killed prune left half-deleted
    # (no trainer state) goes too.
    shared = folders([4, 6, 8], state=True)
    (shared / ckpt.checkpoint_name(2)).mkdir()
    # What saves killed mid-way left (a checkpoint's whole size each), removed by a save of that step alone: those
    # older than the newest checkpoint go (a newer one's would be a save in progress: none runs during a prune).
    for leftover in (".tmp-step-000000005", ".stale-step-000000006", ".tmp-step-000000009", ".tmp-other"):
        (shared / leftover).mkdir()
    ckpt.prune_checkpoints(shared, 2)
    assert sorted(p.name for p in shared.iterdir() if p.name.startswith(".")) == [".tmp-other", ".tmp-step-000000009"]
    for leftover in (".tmp-other", ".tmp-step-000000009"):
        (shared / leftover).rmdir()
    assert left(shared) == [6, 8]
    # Another rank's own folder (Ray's workers): only rank 0 writes trainer states, so there every step folder is a
    # checkpoint. Counted as rank 0's, none was ever complete and all of them piled up (a GB each for DiT-XL/2).
    rank_1 = folders([2, 4, 6, 8], state=False)
    ckpt.prune_checkpoints(rank_1, 2, marked=False)
    assert left(rank_1) == [6, 8]
    ckpt.prune_checkpoints(rank_1, 5, marked=False)
    assert left(rank_1) == [6, 8]


def test_a_resume_tells_its_callbacks_the_training_time_it_resumed_at(tmp_path):
    # The driver counts a resumed trial's work in this run from there (scaling.recorder.busy_seconds), not from the
    # last row of an earlier run, which may lie before the checkpoint.
    seen = []

    class Record(Callbacks):
        def on_resume(self, trial, metrics, history):
            seen.append(trial.resumed_train_time_s)

    train(tiny_config(max_steps=4, log_every=2, ckpt_every=2, val_batch=0), tmp_path / "a")
    step_2 = tmp_path / "a" / "checkpoints" / ckpt.checkpoint_name(2)
    saved = json.loads((step_2 / ckpt.STATE_FILE).read_text())["train_time_s"]
    train(tiny_config(max_steps=4, log_every=2, ckpt_every=2, val_batch=0), tmp_path / "b", callbacks=Record(),
          resume_from=step_2)
    assert seen == [saved] and saved > 0


def test_a_milestone_added_at_a_checkpoint_that_was_none_is_validated_on_resume(tmp_path):
    # A study given a milestone at its run's latest checkpoint (ckpt_every's, not a milestone's) resumed there and
    # reported the milestone with that checkpoint's metrics: no validation loss, for good (the row is ok).
    seen = []

    class Record(Callbacks):
        def on_resume(self, trial, metrics, history):
            seen.append(metrics)

    train(tiny_config(max_steps=6, log_every=2, ckpt_every=2), tmp_path / "a", milestones=[6])
    step_4 = tmp_path / "a" / "checkpoints" / ckpt.checkpoint_name(4)
    assert "val_loss" not in json.loads((step_4 / ckpt.STATE_FILE).read_text())["metrics"]
    train(tiny_config(max_steps=6, log_every=2, ckpt_every=2), tmp_path / "b", milestones=[4, 6],
          callbacks=Record(), resume_from=step_4)
    straight = tmp_path / "c"
    train(tiny_config(max_steps=6, log_every=2, ckpt_every=2), straight, milestones=[4, 6])
    measured = json.loads((straight / "checkpoints" / ckpt.checkpoint_name(4) / ckpt.STATE_FILE).read_text())["metrics"]
    assert {k: seen[0][k] for k in ("val_loss", "val_mse", "val_loss_ema")} == {
        k: measured[k] for k in ("val_loss", "val_mse", "val_loss_ema")}  # as a straight run measures it there
    seen.clear()
    train(tiny_config(max_steps=8, log_every=2, ckpt_every=2), tmp_path / "d", milestones=[6, 8],
          callbacks=Record(), resume_from=step_4)
    assert "val_loss" not in seen[0]  # no milestone at the checkpoint: nothing measured
    # A checkpoint between two logs (step 3, the last log at 2, with step 2's milestone validation): its metrics
    # were step 2's, reported as step 3's.
    train(tiny_config(max_steps=6, log_every=2, ckpt_every=3), tmp_path / "e", milestones=[2, 6])
    step_3 = tmp_path / "e" / "checkpoints" / ckpt.checkpoint_name(3)
    assert json.loads((step_3 / ckpt.STATE_FILE).read_text())["metrics"]["step"] == 2
    seen.clear()
    train(tiny_config(max_steps=6, log_every=2, ckpt_every=3), tmp_path / "f", milestones=[2, 3, 6],
          callbacks=Record(), resume_from=step_3)
    assert seen[0]["step"] == 3 and "train_loss" not in seen[0] and "val_loss" in seen[0]
    assert seen[0]["train_time_s"] == json.loads((step_3 / ckpt.STATE_FILE).read_text())["train_time_s"]


def test_each_rank_records_the_files_it_wrote_and_checks_those_it_reads(tmp_path):
    # One folder of two ranks (torchrun's): rank 0 records the files of no rank and its own, rank 1 its own; a rank
    # checks the shared files and its own, not another rank's shard, which it never reads.
    files = {"ema.safetensors": b"e" * 10, "deepspeed/state/mp_rank_00_model_states.pt": b"m" * 20,
             "deepspeed/state/bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt": b"a" * 30,
             "deepspeed/state/bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt": b"b" * 30,
             "rng-rank0.pt": b"r" * 5, "rng-rank1.pt": b"s" * 5, ckpt.STATE_FILE: b"{}"}
    for name, data in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(data)
    ckpt.write_checksums(tmp_path, 1)
    ckpt.write_checksums(tmp_path, 0)
    records = [json.loads((tmp_path / f"checksums-rank{r}.json").read_text()) for r in (0, 1)]
    assert sorted(records[0]) == ["deepspeed/state/bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt",
                                  "deepspeed/state/mp_rank_00_model_states.pt", "ema.safetensors", "rng-rank0.pt"]
    assert sorted(records[1]) == ["deepspeed/state/bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt", "rng-rank1.pt"]
    assert records[0]["ema.safetensors"] == {"bytes": 10, "crc32": f"{zlib.crc32(b'e' * 10):08x}"}
    for rank in (0, 1):
        ckpt.verify_checksums(tmp_path, rank)
    (tmp_path / "deepspeed/state/bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt").write_bytes(b"c" * 30)
    ckpt.verify_checksums(tmp_path, 0)  # rank 1's to check
    with pytest.raises(ckpt.CheckpointError, match=r"bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt is damaged: its "
                                                   r"contents are not those written \(CRC-32 [0-9a-f]{8}, "
                                                   r"checksums-rank1.json records [0-9a-f]{8}\)$"):
        ckpt.verify_checksums(tmp_path, 1)
    (tmp_path / "ema.safetensors").write_bytes(b"e" * 9)
    with pytest.raises(ckpt.CheckpointError, match=r"ema.safetensors is damaged: 9 bytes, where 10 were written "
                                                   r"\(checksums-rank0.json\)$"):
        ckpt.verify_checksums(tmp_path, 0)
    (tmp_path / "checksums-rank0.json").write_text("{")
    with pytest.raises(ckpt.CheckpointError, match="checksums-rank0.json is corrupt: "):
        ckpt.verify_checksums(tmp_path, 0)



def test_a_finished_runs_engine_and_its_states_do_not_outlive_it(tmp_path):
    # ZeRO's optimizer is held by the gradient hooks it puts on the weights: the engine, its gradients and optimizer
    # states stayed for good in a process that trains again (a GPU benchmark's next configuration counted them in its
    # peak memory).
    import gc
    import weakref

    class KeepsAWeakReference(Callbacks):
        def on_log(self, trial, metrics):
            self.engine = weakref.ref(trial.engine)
            self.optimizer = weakref.ref(trial.engine.optimizer)

    class FailsAfterItsFirstLog(KeepsAWeakReference):
        def on_log(self, trial, metrics):
            super().on_log(trial, metrics)
            raise RuntimeError("a callback's failure")

    for stage in (0, 2):
        seen = KeepsAWeakReference()
        train(tiny_config(zero_stage=stage, max_steps=2, val_batch=0), tmp_path / f"zero-{stage}", callbacks=seen)
        gc.collect()
        assert seen.engine() is None and seen.optimizer() is None, stage
    failing = FailsAfterItsFirstLog()  # a run that ends in an error frees them too
    with pytest.raises(RuntimeError, match="^a callback's failure$"):
        train(tiny_config(zero_stage=2, max_steps=2, val_batch=0), tmp_path / "failed", callbacks=failing)
    gc.collect()  # the error, its traceback and the frames it held are gone
    assert failing.engine() is None and failing.optimizer() is None


def _refuse_as_rank(rank, store_path, out):
    """One of two gloo processes, rank 1 alone with a CheckpointError: what refuse_on_every_rank raised there."""
    from core.train import UnloadableCheckpoint, refuse_on_every_rank

    torch.distributed.init_process_group("gloo", store=torch.distributed.FileStore(store_path, 2), rank=rank,
                                         world_size=2)
    try:
        problem = ckpt.CheckpointError("/c/step-000000004/trainer_state.json is corrupt") if rank == 1 else None
        refuse_on_every_rank(problem, "/c/step-000000004", "cpu")
        out.put((rank, None))
    except UnloadableCheckpoint as e:
        out.put((rank, str(e)))
    finally:
        torch.distributed.destroy_process_group()


def test_a_checkpoint_one_rank_cannot_resume_from_stops_every_rank_for_good(tmp_path):
    # Its trainer state or settings refused on one rank alone (its own copy of the checkpoint): that rank raised, the
    # others went on into their first collective, and each of a launcher's retries met the same files.
    assert on_two_ranks(_refuse_as_rank, store=tmp_path / "store") == {
        0: "/c/step-000000004 cannot be resumed from by another process (its error names the file)",
        1: "/c/step-000000004/trainer_state.json is corrupt"}
    from core.train import UnloadableCheckpoint

    train(tiny_config(max_steps=2, ckpt_every=2), tmp_path)
    step_2 = tmp_path / "checkpoints" / "step-000000002"
    with pytest.raises(UnloadableCheckpoint, match=f"^{step_2} was written by a run with other settings: seed 0 "
                                                   "\\(now 1\\)"):
        train(tiny_config(max_steps=4, ckpt_every=2, seed=1), tmp_path, resume_from=step_2)
