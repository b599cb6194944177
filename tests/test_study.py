"""scaling.study and scaling.dry_run: the schema, grid expansion, trial ids, the --dry-run table, and bad input."""
import datetime
import os
import re
import shutil
import textwrap
from pathlib import Path

import pytest
import torch
import yaml

from core.models import DiT
from scaling.dry_run import format_plan, local_slots, wall_seconds
from scaling.results import RESULTS_SCHEMA, write_table
from scaling.study import StudyError, check_cluster, load_study, max_concurrent_trials
from test_data import save_tiny_vae

STUDIES = Path(__file__).resolve().parent.parent / "studies"
TABLE_4_GFLOPS = {
    "DiT-S/8": 0.36, "DiT-S/4": 1.41, "DiT-S/2": 6.06, "DiT-B/8": 1.42, "DiT-B/4": 5.56, "DiT-B/2": 23.01,
    "DiT-L/8": 5.01, "DiT-L/4": 19.70, "DiT-L/2": 80.71, "DiT-XL/8": 7.39, "DiT-XL/4": 29.05, "DiT-XL/2": 118.64,
}

# A small valid study; the line numbers of the bad-input cases below count from its first line.
BASE = """\
name: tiny
data:
  dataset: digits
sweep:
  model: [DiT-P, DiT-N]
  patch: [2, 4]
  steps: [10, 20, 40]
train:
  batch_size: 32
  lr: 1.0e-3
eval:
  fid_samples: 100
resources:
  workers_per_trial: 1
"""


def write(tmp_path, text, name="study.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def line_of(path, key):
    """'path:line' of a top-level key in a study file, as the study's messages locate it."""
    lines = path.read_text().splitlines()
    return f"{path}:{next(n for n, line in enumerate(lines, 1) if line.startswith(f'{key}:'))}"


def load(tmp_path, text=BASE, overrides=(), **kwargs):
    return load_study(write(tmp_path, text), overrides, **kwargs)


def edit(old, new):
    """BASE with one line replaced (keeps every other line number)."""
    assert old in BASE
    return BASE.replace(old, new)


#################################################################################
#                               The shipped studies                             #
#################################################################################

def test_default_study_loads():
    study = load_study(STUDIES / "gflops_sweep.yaml")
    assert study.name == "gflops_sweep" and study.output == Path.cwd() / "outputs" / "gflops_sweep"
    assert {t.model for t in study.trials} == {f"DiT-{s}/{p}" for s in "PNT" for p in (2, 4)}
    assert all(len(t.milestones) == 3 and t.train["max_steps"] == t.milestones[-1] for t in study.trials)
    assert study.dataset_info["input_size"] == 8 and not study.warnings


def test_paper_study_shows_table_4():
    study = load_study(STUDIES / "dit_imagenet256.yaml", check_data=False)
    assert any("data.path: latent folder /data/imagenet256-latents does not exist" in w for w in study.warnings)
    assert len(study.trials) == 12
    assert all(t.milestones == tuple(range(50_000, 400_001, 50_000)) for t in study.trials)
    plan = format_plan(study, estimate=False)
    shown = {}
    for line in plan.splitlines():
        cells = line.split()
        if cells and cells[0].startswith("DiT-") and cells[1] in TABLE_4_GFLOPS:
            shown[cells[1]] = float(cells[4])
    assert shown.keys() == TABLE_4_GFLOPS.keys()
    for name, gflops in TABLE_4_GFLOPS.items():
        assert abs(shown[name] - gflops) <= max(0.005 * gflops, 0.005), name
    assert "DiT-XL/2" in plan and "675.1M" in plan and "50K,100K,...,400K" in plan


def test_paper_study_needs_its_data():
    with pytest.raises(StudyError, match=r"dit_imagenet256.yaml:8: data.path: latent folder "
                                         r"/data/imagenet256-latents does not exist$"):
        load_study(STUDIES / "dit_imagenet256.yaml")


#################################################################################
#                               Grid expansion                                  #
#################################################################################

def test_constant_lr_shares_step_prefixes(tmp_path):
    study = load(tmp_path)
    assert [t.model for t in study.trials] == ["DiT-P/2", "DiT-P/4", "DiT-N/2", "DiT-N/4"]
    assert all(t.milestones == (10, 20, 40) and t.train["max_steps"] == 40 for t in study.trials)


def test_other_schedules_make_one_trial_per_step_count(tmp_path):
    study = load(tmp_path, overrides=["train.lr_schedule=cosine"])
    assert len(study.trials) == 12
    assert [t.milestones for t in study.trials[:3]] == [(10,), (20,), (40,)]
    assert len({t.trial_id for t in study.trials}) == 12


def test_compute_budgets_derive_steps_per_model(tmp_path):
    study = load(tmp_path, overrides=["sweep.steps=null", "sweep.compute=[1e3, 3e3, 1e4, 0.01]"])
    for trial in study.trials:
        per_step = 3 * trial.gflops * 32
        expected = sorted({max(1, round(c / per_step)) for c in (1e3, 3e3, 1e4, 0.01)})
        assert trial.milestones == tuple(expected)
        assert trial.milestones[0] == 1  # a budget below one step still trains one step
        assert dict(trial.budgets)[1e4] == round(1e4 / per_step)


def test_swept_train_field_doubles_the_trials(tmp_path):
    text = BASE.replace("  lr: 1.0e-3\n", "").replace("  steps:", "  train.lr: [1e-4, 3e-4]\n  steps:")
    study = load(tmp_path, text)
    assert len(study.trials) == 8
    assert [t.swept for t in study.trials[:2]] == [{"train.lr": 1e-4}, {"train.lr": 3e-4}]
    assert [t.train["lr"] for t in study.trials[:2]] == [1e-4, 3e-4]
    assert "train.lr" in format_plan(study, estimate=False).splitlines()[2]


def test_full_model_names_without_patch_axis(tmp_path):
    study = load(tmp_path, edit("  model: [DiT-P, DiT-N]\n  patch: [2, 4]\n", "  model: [DiT-P/1, DiT-M/4]\n"))
    assert [(t.model, t.size, t.patch) for t in study.trials] == [("DiT-P/1", "P", 1), ("DiT-M/4", "M", 4)]


def test_parameters_are_exact(tmp_path):
    study = load(tmp_path, overrides=["train.learn_sigma=false", "train.class_dropout_prob=0"])
    for trial in study.trials:
        assert trial.params == sum(p.numel() for p in DiT(**trial.model_config).parameters())
        assert trial.model_config["learn_sigma"] is False and trial.model_config["num_classes"] == 10


def test_overrides(tmp_path):
    study = load(tmp_path, overrides=["sweep.patch=[1]", "train.lr=3e-4", "name=other", "eval.cfg_scale=1.5"])
    assert [t.model for t in study.trials] == ["DiT-P/1", "DiT-N/1"]
    swept = load(tmp_path, overrides=["sweep.train.seed=[1, 2]"])
    assert [t.swept for t in swept.trials[:2]] == [{"train.seed": 1}, {"train.seed": 2}]
    assert study.trials[0].train["lr"] == 3e-4 and study.trials[0].eval["cfg_scale"] == 1.5
    assert study.name == "other" and study.output.name == "other"
    assert study.locate("train.lr") == "--set train.lr=3e-4" and study.locate("train.batch_size").endswith(":9")


def test_a_set_field_moves_between_fixed_and_swept(tmp_path):
    # BASE fixes train.lr: `--set sweep.train.lr` sweeps it instead, and `--set train.lr` fixes a swept one.
    swept = load(tmp_path, overrides=["sweep.train.lr=[1e-4, 3e-4]"])
    assert [t.train["lr"] for t in swept.trials[:2]] == [1e-4, 3e-4] and len(swept.trials) == 8
    assert swept.locate("sweep.train.lr") == "--set sweep.train.lr=[1e-4, 3e-4]"
    unswept = load(tmp_path, BASE.replace("  lr: 1.0e-3\n", "").replace("  patch:", "  train.lr: [1e-4, 2e-4]\n  patch:"),
                   overrides=["train.lr=3e-4"])
    assert [t.train["lr"] for t in unswept.trials] == [3e-4] * 4 and "train.lr" not in unswept.raw["sweep"]
    # The same ids as a file that said so itself.
    written = load(tmp_path, BASE.replace("  lr: 1.0e-3\n", "").replace("  patch:", "  train.lr: [1e-4, 3e-4]\n  patch:"))
    assert [t.trial_id for t in written.trials] == [t.trial_id for t in swept.trials]
    with pytest.raises(StudyError, match=re.escape("--set sweep.train.lr=[1e-4]: sweep.train.lr: train.lr is also set "
                                                   "(--set train.lr=2e-4); give it in one place")):
        load(tmp_path, overrides=["train.lr=2e-4", "sweep.train.lr=[1e-4]"])
    # A field a --set gave with its whole section conflicts too.
    with pytest.raises(StudyError, match=re.escape("sweep.train.lr: train.lr is also set (--set train={batch_size: 32, "
                                                   "lr: 5e-4}); give it in one place")):
        load(tmp_path, overrides=["train={batch_size: 32, lr: 5e-4}", "sweep.train.lr=[1e-4]"])
    # Removing an axis the file does not have leaves the file's fixed value.
    assert {t.train["lr"] for t in load(tmp_path, overrides=["sweep.train.lr=null"]).trials} == {1e-3}
    # A fixed field's null replaces its swept form as any value does (it was "give it in one place").
    clipped = BASE.replace("  patch:", "  train.grad_clip: [1.0, 2.0]\n  patch:")
    unclipped = load(tmp_path, clipped, overrides=["train.grad_clip=null"])
    assert [t.train["grad_clip"] for t in unclipped.trials] == [None] * 4
    assert "train.grad_clip" not in unclipped.raw["sweep"]
    assert unclipped.locate("train.grad_clip") == "--set train.grad_clip=null"
    # A null lr is refused as the lr's own problem, not as a second place.
    with pytest.raises(StudyError, match=re.escape("--set train.lr=null: train.lr: expected a number, got null; leave "
                                                   "train.lr out for its default, 0.0001")):
        load(tmp_path, BASE.replace("  lr: 1.0e-3\n", "").replace("  patch:", "  train.lr: [1e-4]\n  patch:"),
             overrides=["train.lr=null"])


def test_resolved_study_round_trips_and_paths_are_absolute(tmp_path):
    study = load(tmp_path, overrides=["output=runs/x"])
    assert yaml.safe_load(study.resolved_yaml()) == study.raw
    assert study.output == Path.cwd() / "runs" / "x" and not study.output.exists()  # loading writes nothing
    assert study.raw["tracking"]["experiment"] == "tiny"
    assert study.trials[0].to_dict()["milestones"] == (10, 20, 40)


@pytest.mark.parametrize("overrides", [[], ["sweep.train.lr=[1e-4, 3e-4]"], ["sweep.train.seed=[1, 2]"],
                                       ["sweep.steps=null", "sweep.compute=[1e3, 1e4]"],
                                       # Written unquoted, read back as the float 1000.0: no longer a name.
                                       ["name='1e3'", "tracking.experiment='2E10'", "output='.5e3'"]])
def test_the_resolved_study_file_loads_as_the_same_study(tmp_path, overrides):
    # <output>/study.yaml: what the replay reads, and what a person re-runs or shares.
    study = load(tmp_path, BASE.replace("  lr: 1.0e-3\n", ""), overrides)
    again = load_study(write(tmp_path, study.resolved_yaml(), "resolved.yaml"))
    assert [t.trial_id for t in again.trials] == [t.trial_id for t in study.trials]
    assert [t.train for t in again.trials] == [t.train for t in study.trials]
    assert again.raw == study.raw


def test_the_readme_documents_every_study_key_with_its_default():
    from scaling.study import BOOKKEEPING, REQUIRED, SCHEMA, SWEEP_AXES, TOP_LEVEL

    readme = (STUDIES.parent / "README.md").read_text()
    rows = dict(re.findall(r"^\| `([a-z_.A-Z]+)` \| (?:`([^`]*)`|\(required\)) \|", readme, re.M))
    fields = {f"{section}.{key}": default for section, keys in SCHEMA.items() for key, (default, _) in keys.items()}
    fields.update({key: spec[0] for key, spec in TOP_LEVEL.items() if spec is not None})
    assert set(rows) == set(fields)
    for key, default in fields.items():
        assert (rows[key] == "" if default is REQUIRED else yaml.safe_load(rows[key]) == default), key
    axes = set(re.findall(r"^\| `sweep\.([a-z_.A-Z]+)` \| ", readme, re.M))
    assert axes == {*SWEEP_AXES, "train.FIELD"}
    assert all(f"`{key}`" in readme.split("`sweep.train.FIELD`")[1].split("\n")[0] for key in BOOKKEEPING)


#################################################################################
#                                  Trial ids                                    #
#################################################################################

def test_trial_ids_are_stable_and_readable(tmp_path):
    ids = [t.trial_id for t in load(tmp_path).trials]
    assert ids == [t.trial_id for t in load(tmp_path).trials]
    assert all(re.fullmatch(r"DiT-[PN]-[24]-[0-9a-f]{10}", i) for i in ids)
    # The hash is canonical JSON, so it is the same in every process and on every machine.
    assert ids[0] == "DiT-P-2-" + ids[0][-10:] and load(tmp_path).trials[0].trial_id == ids[0]


# A changed value of every train field that is not bookkeeping, and of the evaluation's: each changes a result.
RESULT_FIELDS = {
    "train.batch_size": "64", "train.grad_accum": "2", "train.lr": "2e-3", "train.lr_schedule": "cosine",
    "train.warmup_steps": "5", "train.betas": "[0.9, 0.95]", "train.weight_decay": "0.01", "train.grad_clip": "1.0",
    "train.ema_decay": "0.99", "train.precision": "bf16", "train.zero_stage": "1", "train.seed": "1",
    "train.class_dropout_prob": "0.2", "train.learn_sigma": "false", "train.diffusion_steps": "500",
    "train.val_batch": "128", "train.compile": "true",
    "train.fused_adamw": "false", "train.hidden_size": "192", "train.depth": "3", "train.num_heads": "4",
    "train.mlp_ratio": "2", "eval.fid_samples": "200", "eval.sampler": "ddpm", "eval.sampling_steps": "25",
    "eval.eta": "0.5", "eval.cfg_scale": "2", "eval.fid": "false", "sweep.steps": "[10, 20, 80]",
}


def test_every_result_field_is_covered_below():
    # A field added to the schema without a case here could be left out of the trial id unnoticed.
    from scaling.study import BOOKKEEPING, NO_RESULT, SCHEMA

    train = {f"train.{k}" for k in SCHEMA["train"] if k not in BOOKKEEPING and ("train", k) not in NO_RESULT}
    assert train <= set(RESULT_FIELDS)
    # Each setting that changes no result is covered by the two tests of it below.
    assert {f"{section}.{name}" for section, name in NO_RESULT} == {
        o.split("=")[0] for case in NO_RESULT_EDITS for o in case[1]}


def test_trial_ids_change_with_the_data(tmp_path):
    from PIL import Image

    for name in ("a", "b"):
        for label in ("cat", "dog"):
            (tmp_path / name / label).mkdir(parents=True)
            Image.new("RGB", (8, 8)).save(tmp_path / name / label / "0.png")
    text = edit("dataset: digits", "dataset: imagefolder\n  path: a\n  image_size: 8").replace(
        "fid_samples: 100", "fid: false").replace("batch_size: 32", "batch_size: 4")
    ids = {overrides: [t.trial_id for t in load(tmp_path, text, overrides=list(overrides)).trials]
           for overrides in [(), ("data.path=b",), ("data.image_size=16",)]}
    assert len({i for trial_ids in ids.values() for i in trial_ids}) == 3 * 4


@pytest.mark.parametrize("override", [f"{k}={v}" for k, v in RESULT_FIELDS.items()])
def test_trial_ids_change_with_what_determines_the_result(tmp_path, override):
    # One step count: a cosine lr makes a trial of each step count, so a multi-step base paired trials of other
    # steps (different ids whatever the schedule).
    one = ["sweep.steps=[40]"]
    base = {t.trial_id for t in load(tmp_path, overrides=one).trials}
    changed = {t.trial_id for t in load(tmp_path, overrides=[*one, override]).trials}
    assert len(base) == len(changed) == 4 and not base & changed


def test_the_finest_share_is_rays():
    import ray._raylet

    from scaling.study import RAY_RESOURCE_UNIT

    assert RAY_RESOURCE_UNIT * ray._raylet.RESOURCE_UNIT_SCALING == 1


def test_each_precision_has_its_own_trial_ids(tmp_path):
    ids = {p: {t.trial_id for t in load(tmp_path, overrides=[f"train.precision={p}"]).trials}
           for p in ("fp32", "tf32", "bf16")}
    assert all(len(i) == 4 for i in ids.values()) and len(set().union(*ids.values())) == 12
    with pytest.raises(StudyError, match=r"train\.precision: expected one of 'fp32', 'tf32', 'bf16', got 'tf16'"):
        load(tmp_path, overrides=["train.precision=tf16"])


@pytest.mark.parametrize("override", [
    "resources.workers_per_trial=2", "resources.max_failures=3", "tracking.experiment=x", "output=elsewhere",
    "name=renamed", "train.log_every=1", "train.ckpt_every=5", "train.lr=0.001", "eval.cfg_scale=1",
])
def test_trial_ids_ignore_what_does_not(tmp_path, override):
    same = load(tmp_path, overrides=[override])
    assert [t.trial_id for t in load(tmp_path).trials] == [t.trial_id for t in same.trials]


# The trial ids of the shipped studies, as they were before the settings that change no result were set aside:
# results and checkpoints on disk are keyed by them (the Ray storage folder is named by the id).
SHIPPED_IDS = {
    "gflops_sweep.yaml": ["DiT-P-2-cf77b12e7a", "DiT-P-4-08a19d648c", "DiT-N-2-3594a07413", "DiT-N-4-6b9d54807e",
                          "DiT-T-2-0088a8191b", "DiT-T-4-237f775f6a"],
    # Its ids moved once, with these changes and its decoder's (sd-vae-ft-mse), before any run of it was recorded.
    "dit_imagenet256.yaml": ["DiT-S-8-efffb4c7f7", "DiT-S-4-70fc7b9326", "DiT-S-2-792322cc18", "DiT-B-8-fa3625716c",
                             "DiT-B-4-071db2333f", "DiT-B-2-c243e85df4", "DiT-L-8-0caf410a6e", "DiT-L-4-e6285c8671",
                             "DiT-L-2-9a9279ec6d", "DiT-XL-8-fb9e49977b", "DiT-XL-4-f28db07329",
                             "DiT-XL-2-0da1fda865"],
}


@pytest.mark.parametrize("name", SHIPPED_IDS)
def test_the_shipped_studies_keep_their_trial_ids(name):
    study = load_study(STUDIES / name, check_data=False)
    assert [t.trial_id for t in study.trials] == SHIPPED_IDS[name]


# (study edits, settings that change no result under them): each setting's other values keep every trial id.
NO_RESULT_EDITS = [
    ([], ["train.grad_checkpointing=true"]),
    (["train.compile=false"], ["train.grad_checkpointing=true"]),
    ([], ["eval.grid_images_per_class=0", "eval.grid_images_per_class=9"]),
    (["eval.sampler=ddpm"], ["eval.eta=0.5", "eval.eta=1"]),
    ([], ["eval.guided_channels=null", "eval.guided_channels=1", "eval.guided_channels=7"]),
    (["eval.cfg_scale=1"], ["eval.guided_channels=null"]),
    (["eval.fid=false"], ["eval.fid_samples=100", "eval.feature_extractor=inception-v3-compat",
                          "eval.feature_extractor_weights=w.pth", "eval.reference=images", "eval.heldout=images"]),
]


@pytest.mark.parametrize("base, changes", NO_RESULT_EDITS)
def test_trial_ids_ignore_settings_that_change_no_result(tmp_path, base, changes):
    # Activation checkpointing gives the same loss and gradients; the grid draws seeds of its own, and FID reads
    # only its own images; DDPM has no eta; without guidance (cfg_scale 1) no channel is guided.
    ids = [t.trial_id for t in load(tmp_path, overrides=base).trials]
    for change in changes:
        assert [t.trial_id for t in load(tmp_path, overrides=[*base, change]).trials] == ids, change
    # On the shipped studies too, which write some of them (gflops_sweep: guided_channels null; dit_imagenet256:
    # no grid, DDPM).
    for name, shipped in SHIPPED_IDS.items():
        study = load_study(STUDIES / name, [*base, *changes[:1]], check_data=False)
        unchanged = [t.trial_id for t in load_study(STUDIES / name, base, check_data=False).trials]
        assert [t.trial_id for t in study.trials] == unchanged and len(unchanged) > 0, name
        if name == "dit_imagenet256.yaml" and base == ["eval.sampler=ddpm"]:
            assert [t.trial_id for t in study.trials] == shipped  # DDPM already: eta is not read
        elif not base:
            assert [t.trial_id for t in study.trials] == shipped


@pytest.mark.parametrize("overrides", [
    ["train.compile=true", "train.grad_checkpointing=true"],  # compiled, the recomputation may be fused otherwise
    ["eval.eta=0.5"],  # DDIM's eta
    ["eval.cfg_scale=4", "eval.guided_channels=null"],  # guidance of one channel or all: the same on 1 channel, but
    ["train.lr=2e-3"],                                  # guided_channels is hashed as written when guidance runs
])
def test_the_same_settings_change_ids_where_they_matter(tmp_path, overrides):
    base = [t.trial_id for t in load(tmp_path, overrides=overrides[:-1]).trials]
    changed = [t.trial_id for t in load(tmp_path, overrides=overrides).trials]
    assert len(base) == len(changed) > 0 and all(a != b for a, b in zip(base, changed))


def test_guided_channels_count_under_guidance(tmp_path):
    # On latents (4 channels) guiding 3 of them is not guiding all: with cfg_scale 4 the ids differ, with 1 not.
    ids = {(cfg, channels): [t.trial_id for t in load_study(STUDIES / "dit_imagenet256.yaml", [
        f"eval.cfg_scale={cfg}", f"eval.guided_channels={channels}"], check_data=False).trials]
        for cfg in (1, 4) for channels in (3, "null")}
    assert ids[1, 3] == ids[1, "null"] == SHIPPED_IDS["dit_imagenet256.yaml"]
    assert len(ids[4, 3]) == len(ids[4, "null"]) == 12 and all(a != b for a, b in zip(ids[4, 3], ids[4, "null"]))


#################################################################################
#                                 The dry run                                   #
#################################################################################

def test_dry_run_estimates_from_a_probe(tmp_path):
    study = load(tmp_path, edit("  model: [DiT-P, DiT-N]\n", "  model: [DiT-P]\n"))
    plan = format_plan(study)
    rows = [line for line in plan.splitlines() if line.startswith("DiT-P-")]
    assert len(rows) == 2 and all(re.search(r"\d+(\.\d)?[smhd]\S*$", row) for row in rows), plan
    assert re.search(r"^total: 2 trials, training compute \S+ Gflop, estimated time \S+ \((one trial|2 trials) at a "
                     r"time on this machine, a trial of N workers at N times one worker's rate probed here; training, "
                     r"and FID's and the grids' sampling, VAE decoding and feature extraction, not Ray's start-up nor the real "
                     r"images' features, extracted once a study\)$",
                     plan, re.M), plan
    assert ("training compute: Gflops × global batch × steps × 3 (forward and backward), a multiply-add counted once, "
            "as in the paper") in plan and "~" not in plan  # both probed here


def test_the_dry_run_counts_every_worker_of_a_trial_and_probes_on_its_threads(tmp_path, monkeypatch):
    import scaling.dry_run as dry_run

    probed = []

    def probe(config, batch, device, precision, threads, checkpointing):
        probed.append((batch, threads, checkpointing))
        return 1000.0

    monkeypatch.setattr(dry_run, "probe_images_per_s", probe)
    one = dry_run.estimate_seconds(load(tmp_path, overrides=["eval.fid=false"]))
    two = dry_run.estimate_seconds(load(tmp_path, overrides=["eval.fid=false", "resources.workers_per_trial=2",
                                                             "resources.cpus_per_worker=64"]))
    assert [two[k] * 2 for k in two] == list(one.values())  # 40 steps × 32 images at 2 × 1000 images/s
    cpus = len(os.sched_getaffinity(0))
    # Each worker's micro-batch, at most this machine's threads.
    assert probed == [(32, 1, False)] * 4 + [(16, min(64, cpus), False)] * 4
    probed.clear()  # a trial that recomputes its activations is probed doing so
    dry_run.estimate_seconds(load(tmp_path, overrides=["eval.fid=false", "train.grad_checkpointing=true"]))
    assert probed == [(32, 1, True)] * 4
    # Half a CPU a worker: two trials share it, each at half its rate.
    half = dry_run.estimate_seconds(load(tmp_path, overrides=["eval.fid=false", "resources.cpus_per_worker=0.5"]))
    assert [half[k] / 2 for k in half] == list(one.values())
    # Without FID the grid is still sampled at each of the 3 milestones: 4 images × 10 classes × 50 steps, each a
    # third of a training step at 1000 images/s.
    no_grid = dry_run.estimate_seconds(load(tmp_path, overrides=["eval.fid=false", "eval.grid_images_per_class=0"]))
    assert [one[k] - no_grid[k] for k in one] == pytest.approx([3 * 40 * 50 / 3 / 1000.0] * len(one))


def test_the_dry_run_marks_the_models_it_extrapolates(tmp_path, monkeypatch):
    import scaling.dry_run as dry_run

    monkeypatch.setattr(dry_run, "probe_images_per_s", lambda config, batch, device, precision, threads, ckpt: 1000.0)
    study = load(tmp_path, overrides=["eval.fid=false"])  # DiT-P and DiT-N, each /2 and /4
    small = max(t.gflops for t in study.trials if t.model.startswith("DiT-P"))
    monkeypatch.setitem(dry_run.PROBE_BUDGET_GFLOP, "cpu", small * dry_run.PROBE_BATCHES[1])  # DiT-N: too big
    extrapolated = set()
    times = dry_run.estimate_seconds(study, extrapolated)
    assert extrapolated == {t.trial_id for t in study.trials if t.model.startswith("DiT-N")}
    # At the Gflop/s of the largest probed (DiT-P/2 at 1000 images/s): DiT-N's images/s in proportion.
    p2 = next(t for t in study.trials if t.model == "DiT-P/2")
    n2 = next(t for t in study.trials if t.model == "DiT-N/2")
    assert times[n2.trial_id] / times[p2.trial_id] == pytest.approx(n2.gflops / p2.gflops)
    plan = format_plan(study)
    rows = {line.split()[0]: line for line in plan.splitlines() if line.startswith("DiT-")}
    assert all(rows[t.trial_id].split()[-1].startswith("~") == t.model.startswith("DiT-N") for t in study.trials), plan
    assert "~: too big to probe here; extrapolated from the Gflop/s of the largest model probed" in plan


def test_the_dry_run_counts_the_vaes_decoding_and_the_inception_networks_features(tmp_path):
    # A latent study's FID and grids decode every sample through the VAE, and FID runs Inception on each: for the small
    # models that is most of a milestone's work (sd-vae-ft-mse's decoder: 311 G multiply-adds an image, DiT-S/8's
    # whole 250-step sample 90).
    import scaling.dry_run as dry_run
    from diffusers import AutoencoderKL

    sd_vae = dict(block_out_channels=[128, 256, 512, 512], layers_per_block=2, latent_channels=4,
                  down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4)
    AutoencoderKL.from_config(sd_vae).save_config(tmp_path / "vae")  # its config alone: no weights are read
    decode = dry_run.vae_decode_gmac(str(tmp_path / "vae"), (4, 32, 32))
    assert decode == pytest.approx(311.09, abs=0.01)
    assert dry_run.vae_decode_gmac(str(tmp_path / "none"), (4, 32, 32)) is None  # only warned of by --dry-run
    study = load_study(STUDIES / "dit_imagenet256.yaml", ["sweep.model=[DiT-S]", "sweep.patch=[8]",
                                                         f"eval.vae={tmp_path / 'vae'}"], check_data=False)
    (trial,) = study.trials
    g, m, last = trial.gflops, len(trial.milestones), trial.milestones[-1]  # 0.358 G multiply-adds an image
    assert trial.eval["fid_samples"] == 50_000 and trial.eval["sampling_steps"] == 250 and trial.train["batch_size"] == 256
    # One worker training 1000 images/s: 3 forward passes' work an image; 50K samples of 250 steps, each a forward
    # pass; their decoding and Inception features at the same multiply-adds a second.
    expected = (last * 256 / 1000 + m * 50_000 * 250 / (3 * 1000) + m * 50_000 * decode / (1000 * g * 3)
                + m * 50_000 * 5.71 / (1000 * g * 3))
    assert dry_run._trial_seconds(trial, 1000.0) == pytest.approx(expected)
    assert m * 50_000 * decode / (1000 * g * 3) > m * 50_000 * 250 / (3 * 1000)  # decoding outweighs the sampling
    # Two workers recomputing activations: 4 forward passes an image; training, sampling and decoding shared by both,
    # Inception on the first alone.
    recomputing = load_study(STUDIES / "dit_imagenet256.yaml", ["sweep.model=[DiT-S]", "sweep.patch=[8]",
                                                               f"eval.vae={tmp_path / 'vae'}",
                                                               "train.grad_checkpointing=true"], check_data=False)
    expected = (last * 256 / 2000 + m * 50_000 * 250 / (4 * 2000) + m * 50_000 * decode / (1000 * g * 4 * 2)
                + m * 50_000 * 5.71 / (1000 * g * 4))
    assert dry_run._trial_seconds(recomputing.trials[0], 1000.0, workers=2) == pytest.approx(expected)
    # A VAE config that does not decode these latents (another class, other channels, not a config) is left out.
    AutoencoderKL.from_config({**sd_vae, "latent_channels": 16}).save_config(tmp_path / "vae16")
    (tmp_path / "list").mkdir()
    (tmp_path / "list" / "config.json").write_text("[]")
    for other in ("vae16", "list"):
        assert dry_run.vae_decode_gmac(str(tmp_path / other), (4, 32, 32)) is None


def test_a_dry_run_says_when_it_leaves_the_vaes_decoding_out(tmp_path, encode_tiny_latents):
    encode_tiny_latents(tmp_path / "latents", seed=0)
    latents = ["data.dataset=latents", f"data.path={tmp_path / 'latents'}", "eval.fid=false",
               "sweep.model=[DiT-P]", "sweep.patch=[2]"]
    note = "eval.vae: no AutoencoderKL config that decodes the study's latents reads here; the estimate leaves its"
    missing = load(tmp_path, overrides=[*latents, f"eval.vae={tmp_path / 'no-vae'}"], check_data=False)
    assert note in format_plan(missing)  # --dry-run warns of the folder too (study.warnings)
    unread = load(tmp_path, overrides=[*latents, f"eval.vae={tmp_path / 'no-vae'}", "eval.grid_images_per_class=0"],
                  check_data=False)
    assert note not in format_plan(unread)  # no FID, no grid: nothing decodes, the VAE is not read
    from diffusers import AutoencoderKL

    AutoencoderKL(block_out_channels=(8,) * 4, layers_per_block=1, latent_channels=4, norm_num_groups=8,
                  down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4
                  ).save_pretrained(tmp_path / "vae8")  # decodes the data's 4×4×4 latents to 32 pixels
    assert note not in format_plan(load(tmp_path, overrides=[*latents, f"eval.vae={tmp_path / 'vae8'}"]))


def test_the_dry_run_estimates_a_trial_to_resume_from_its_checkpoint(tmp_path, monkeypatch):
    import scaling.dry_run as dry_run
    from scaling.trial_storage import ray_storage, train_run_name

    monkeypatch.setattr(dry_run, "probe_images_per_s", lambda config, batch, device, precision, threads, ckpt: 1000.0)
    study = load(tmp_path, overrides=[f"output={tmp_path / 'out'}"])
    fresh = dry_run.estimate_seconds(study)
    resumed = study.trials[0]
    folder = ray_storage(study.output) / train_run_name(resumed.trial_id) / "checkpoint_2026-12-05_13-00-00.000000"
    folder.mkdir(parents=True)
    (folder / "trainer_state.json").write_text('{"step": 20}')
    from test_results import row

    from scaling.results import RESULTS_SCHEMA, load_results, write_table

    def measured(*rows):
        write_table([row(trial_id=t.trial_id, model=t.model, step=step) for t, step in rows],
                    study.output / "results.parquet", RESULTS_SCHEMA)
        return dry_run.estimate_seconds(study, results=load_results(study.output))

    # Its rows at 10 and 20: 20 of its 40 steps and the sampling of 10 and 20 left out (one milestone's: FID's 100
    # images and the grid's 4 × 10 classes, × 50 steps, each a third of a training step); the others' as they were.
    later = measured((resumed, 10), (resumed, 20))
    sampling = (100 + 4 * 10) * 50 / 3 / 1000.0
    assert later[resumed.trial_id] == pytest.approx(fresh[resumed.trial_id] - 20 * 32 / 1000.0 - 2 * sampling)
    assert {k: v for k, v in later.items() if k != resumed.trial_id} == \
           {k: v for k, v in fresh.items() if k != resumed.trial_id}
    # Its driver killed before the row of 20 was written: the resume evaluates 20 again.
    assert measured((resumed, 10))[resumed.trial_id] == pytest.approx(later[resumed.trial_id] + sampling)
    # A trial trained again from step 0 skips the milestones it has rows of; a finished trial is not estimated.
    again, finished = study.trials[1], study.trials[2]
    times = measured((resumed, 10), (resumed, 20), (again, 10), *((finished, m) for m in finished.milestones))
    assert times[again.trial_id] == pytest.approx(fresh[again.trial_id] - sampling)
    assert finished.trial_id not in times and set(times) == {t.trial_id for t in study.trials} - {finished.trial_id}


def test_the_dry_runs_total_time_schedules_trials_on_the_free_slots(tmp_path):
    assert wall_seconds([3, 1, 1, 2], 2) == 4  # 3 | 1, 1, 2: each trial takes the first slot free, in order
    assert wall_seconds([3, 1, 1, 2], 1) == 7 and wall_seconds([5], 4) == 5
    one = load(tmp_path, overrides=["resources.max_concurrent_trials=1"])
    assert local_slots(one) == 1 and "(one trial at a time on this machine" in format_plan(one, estimate=True)
    cpus = len(os.sched_getaffinity(0))
    assert local_slots(load(tmp_path, overrides=["resources.max_concurrent_trials=3"])) == min(3, cpus)
    assert local_slots(load(tmp_path)) == cpus  # one CPU per trial's worker, as BASE asks
    assert local_slots(load(tmp_path, overrides=["resources.cpus_per_worker=2"])) == max(1, cpus // 2)


def test_the_dry_run_runs_no_more_trials_at_once_than_this_machine_holds(tmp_path, monkeypatch):
    # A max_concurrent_trials above what the machine holds was taken as given: on 2 CPUs, eight one-CPU trials of
    # 100 s were estimated at 100 s, where the Ray started here runs two at a time (400 s).
    import scaling.dry_run as dry_run

    monkeypatch.setattr(dry_run, "local_resources", lambda: {"CPU": 2, "GPU": 0})
    eight = load(tmp_path, overrides=["resources.max_concurrent_trials=8"])
    assert local_slots(eight) == 2 and wall_seconds([100] * 8, local_slots(eight)) == 400
    assert local_slots(load(tmp_path, overrides=["resources.max_concurrent_trials=1"])) == 1  # fewer: as given
    monkeypatch.setattr(dry_run, "local_resources", lambda: {"CPU": 4, "GPU": 0})
    assert local_slots(load(tmp_path, overrides=["resources.max_concurrent_trials=3"])) == 3
    monkeypatch.setattr(dry_run, "local_resources", lambda: {"CPU": 2, "GPU": 0})
    assert ("2 trials at a time (resources.max_concurrent_trials asks for 8; this machine holds 2) on this machine"
            in format_plan(eight, estimate=True))


def test_the_workers_a_node_runs_at_once_count_every_trial_packed_there(tmp_path):
    # Each of a node's processes decides alone whether latents fit in memory: eight one-GPU trials packed on an
    # 8-GPU node are eight copies, where each trial's own ranks on it (LOCAL_WORLD_SIZE) are one.
    from scaling.study import workers_per_node

    gpu = load(tmp_path, overrides=["resources.gpus_per_worker=1", "resources.cpus_per_worker=4"])
    eight_gpus, cpu_head = {"CPU": 96.0, "GPU": 8.0}, {"CPU": 8.0}
    assert workers_per_node(gpu, [cpu_head, eight_gpus], concurrent_trials=16) == 8
    assert workers_per_node(gpu, [cpu_head, eight_gpus], concurrent_trials=3) == 3  # no more trials than that
    assert workers_per_node(gpu, [{"CPU": 16.0, "GPU": 8.0}], concurrent_trials=16) == 4  # CPUs hold four
    assert workers_per_node(gpu, [cpu_head], concurrent_trials=5) == 5  # none up holds one: as many as may come
    two = load(tmp_path, overrides=["resources.workers_per_trial=2"])  # one CPU each
    assert workers_per_node(two, [{"CPU": 2.0}], concurrent_trials=2) == 2
    # Shares counted as Ray counts them (to 1e-4), not floating point's 1.0 // 0.1 = 9.
    tenth = load(tmp_path, overrides=["resources.cpus_per_worker=0.1"])
    assert workers_per_node(tenth, [{"CPU": 1.0}], concurrent_trials=20) == 10
    assert max_concurrent_trials(tenth, {"CPU": 1.0}) == 10 and max_concurrent_trials(tenth, {"CPU": 0.3}) == 3
    from scaling.ray_trial import train_config

    assert train_config(gpu.trials[0].to_dict(), 8).data_copies == 8  # what the trial's workers load data with
    assert train_config(gpu.trials[0].to_dict()).data_copies is None  # core.train on its own: LOCAL_WORLD_SIZE


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_dry_run_without_the_gpus_a_study_asks_for(tmp_path):
    plan = format_plan(load(tmp_path, overrides=["resources.gpus_per_worker=1"]))
    assert plan.count("n/a (needs GPU)") == 5  # four trials and the total


#################################################################################
#                                   Bad input                                   #
#################################################################################

# Names from other trainers, and typos, each with the field meant: difflib once compared the whole dotted key, and the
# shared "train." found an unrelated field nearest (train.learning_rate: train.learn_sigma).
DID_YOU_MEAN = {
    "train.learning_rate=1": "train.lr", "train.num_steps=1": "sweep.steps", "train.ema=1": "train.ema_decay",
    "train.dropout=0.1": "train.class_dropout_prob", "train.gradient_accumulation_steps=2": "train.grad_accum",
    "train.clip_grad=1": "train.grad_clip", "train.max_grad_norm=1": "train.grad_clip",
    "train.wd=0.1": "train.weight_decay", "eval.cfg=4": "eval.cfg_scale", "eval.guidance_scale=4": "eval.cfg_scale",
    "learning_rate=1": "train.lr", "train.lrr=1": "train.lr", "eval.fid_sample=10": "eval.fid_samples",
    # The sampler's steps in the eval section (core.evaluate's num_steps), not the training's.
    "eval.num_steps=50": "eval.sampling_steps", "eval.steps=50": "eval.sampling_steps",
}


@pytest.mark.parametrize("item", DID_YOU_MEAN)
def test_an_unknown_key_names_the_field_meant(tmp_path, item):
    key = item.partition("=")[0]
    with pytest.raises(StudyError) as err:
        load(tmp_path, overrides=[item])
    assert str(err.value) == f"--set {item}: {key}: unknown key; did you mean {DID_YOU_MEAN[item]!r}?"


@pytest.mark.parametrize("item, axis", [("sweep.train.learning_rate=[1e-4]", "train.lr"),
                                        ("sweep.train.clip_grad=[1]", "train.grad_clip"),
                                        ("sweep.num_steps=[10]", "steps"), ("sweep.seeds=[1, 2]", "train.seed"),
                                        ("sweep.train.seeds=[1, 2]", "train.seed")])
def test_an_unknown_axis_names_the_axis_meant(tmp_path, item, axis):
    key = item.partition("=")[0]
    with pytest.raises(StudyError) as err:
        load(tmp_path, overrides=[item])
    assert str(err.value) == f"--set {item}: {key}: unknown axis; did you mean {axis!r}?"


def test_every_moved_key_names_a_field():
    from scaling.study import MOVED, SCHEMA, SWEEP_AXES

    from scaling.study import MOVED_IN

    fields = {f"{section}.{name}" for section, names in SCHEMA.items() for name in names}
    moved_in = {target for words in MOVED_IN.values() for target in words.values()}
    assert set(MOVED.values()) | moved_in <= fields | {f"sweep.{axis}" for axis in SWEEP_AXES}

BAD = {
    "unknown top-level key": (edit("train:", "trian:"), [], "{f}:8: trian: unknown key; did you mean 'train'?"),
    "unknown nested key": (edit("  lr:", "  lrr:"), [], "{f}:10: train.lrr: unknown key; did you mean 'train.lr'?"),
    "wrong type": (edit("lr: 1.0e-3", "lr: fast"), [], "{f}:10: train.lr: expected a number, got 'fast'"),
    # YAML's null is no "unset" for a field that has no null: the message says how to get its default.
    "one sampling step": (BASE, ["eval.sampling_steps=1"], "--set eval.sampling_steps=1: eval.sampling_steps: must "
                          "be >= 2, got 1"),
    "a null lr": (edit("lr: 1.0e-3", "lr: null"), [],
                  "{f}:10: train.lr: expected a number, got null; leave train.lr out for its default, 0.0001"),
    "a null lr by --set": (BASE, ["train.lr=null"], "--set train.lr=null: train.lr: expected a number, got null; "
                           "leave train.lr out for its default, 0.0001"),
    "a null name": (edit("name: tiny", "name: null"), [], "{f}:1: name: expected a name of letters, digits, '_', '.' "
                    "and '-', got null"),
    "a bool is not an int": (edit("batch_size: 32", "batch_size: true"), [],
                             "{f}:9: train.batch_size: expected an integer, got true"),
    "choice with a typo": (edit("1.0e-3", "1.0e-3\n  lr_schedule: cosin"), [], "{f}:11: train.lr_schedule: "
                           "expected one of 'constant', 'cosine', 'linear', got 'cosin'; did you mean 'cosine'?"),
    "a field in the wrong section": (edit("  lr:", "  max_steps: 10\n  lr:"), [],
                                     "{f}:10: train.max_steps: unknown key; did you mean 'sweep.steps'?"),
    "negative steps": (edit("[10, 20, 40]", "[10, -20, 40]"), [], "{f}:7: sweep.steps: must be >= 1, got -20"),
    "zero steps": (edit("[10, 20, 40]", "[0]"), [], "{f}:7: sweep.steps: must be >= 1, got 0"),
    # YAML 1.1 read both as integers (8 steps, 90 steps) without a word.
    "an octal step count": (edit("[10, 20, 40]", "[010, 20, 40]"), [], "{f}:7: not a YAML file: 010 is YAML 1.1's "
                            "octal number 8; write it without the leading 0, or quote it for text"),
    "a base-60 step count": (BASE, ["sweep.steps=[1:30]"], "--set sweep.steps=[1:30]: sweep.steps: the value is not "
                             "YAML: 1:30 is YAML 1.1's base-60 number 90; write it without :, or quote it for text"),
    "a base-60 number": (BASE, ["train.lr=1:30.5"], "--set train.lr=1:30.5: train.lr: the value is not YAML: 1:30.5 is "
                         "YAML 1.1's base-60 number 90.5; write it without :, or quote it for text"),
    # Values YAML's resolver takes for a date, a number or a tag's type that are none: a ValueError, TypeError or
    # AttributeError from PyYAML's constructors, as a traceback.
    "an impossible date": (edit("name: tiny", "name: 2024-02-30"), [], "{f}: not a YAML file: a value cannot be read "
                           "as the type YAML takes it for (ValueError: day is out of range for month); quote it to "
                           "have it read as text, or write it as that type"),
    "a tagged value of another type": (edit("batch_size: 32", "batch_size: !!int [1]"), [], "{f}: not a YAML file: a "
                                       "value cannot be read as the type YAML takes it for (AttributeError: 'list' "
                                       "object has no attribute 'lstrip'); quote it to have it read as text, or "
                                       "write it as that type"),
    "an impossible date set": (BASE, ["name=2024-02-30"], "--set name=2024-02-30: name: a value cannot be read as the "
                               "type YAML takes it for (ValueError: day is out of range for month); quote it to have "
                               "it read as text, or write it as that type"),
    # A NUL, or a lone surrogate, in a path: a ValueError or UnicodeEncodeError where the path is first used.
    "a NUL in a path": (BASE, ['output="/tmp/a\\0b"'], "--set output=\"/tmp/a\\0b\": output: '/tmp/a\\x00b': not a "
                        "file name (a NUL, or characters the file system cannot hold)"),
    "a NUL after ~user": (BASE, ['output="~a\\0b/x"'], "--set output=\"~a\\0b/x\": output: '~a\\x00b/x': not a file "
                          "name (a NUL, or characters the file system cannot hold)"),
    # No upper bound: accepted, and the first milestone (after the training) overflowed or built a list of 1e20 seeds.
    "FID of more images than any study samples": (BASE, ["eval.fid_samples=100000000000000000000"],
                                                  "--set eval.fid_samples=100000000000000000000: eval.fid_samples: "
                                                  "must be <= 10000000, got 100000000000000000000"),
    "a grid beyond any PNG": (BASE, ["eval.grid_images_per_class=1001"], "--set eval.grid_images_per_class=1001: "
                              "eval.grid_images_per_class: must be <= 1000, got 1001"),
    "a process per data item": (BASE, ["train.num_workers=100000"], "--set train.num_workers=100000: "
                                "train.num_workers: must be <= 1024, got 100000"),
    "a year for a name": (BASE, ["name=2024"], "--set name=2024: name: expected a name of letters, digits, '_', '.' "
                          "and '-', got 2024 (YAML read it as an integer: quote it)"),
    "steps and compute": (edit("  steps:", "  compute: [1e12]\n  steps:"), [],
                          "{f}:7: sweep.compute: give either sweep.steps or sweep.compute, not both"),
    "patch does not divide the input": (edit("[2, 4]", "[2, 3]"), [], "{f}:6: sweep.patch: patch_size 3 does not "
                                        "divide input_size 8 (DiT-P/3 on digits, 8×8×1)"),
    "heads do not divide the width": (BASE.replace("  lr: 1.0e-3\n", "  num_heads: 3\n"), [],
                                      "{f}:10: train.num_heads: num_heads 3 does not divide hidden_size 64 "
                                      "(DiT-P/2 on digits, 8×8×1)"),
    "unknown model": (edit("DiT-P, DiT-N", "DiT-P, DiT-XXL"), [],
                      "{f}:5: sweep.model: unknown model 'DiT-XXL'; did you mean 'DiT-XL'?"),
    "a patch in the name and a patch axis": (edit("DiT-P, DiT-N", "DiT-S/2"), [],
                                             "{f}:5: sweep.model: 'DiT-S/2' names a patch, but sweep.patch gives "
                                             "the patches: write 'DiT-S'"),
    "unknown sweep axis": (edit("  patch:", "  lr: [1]\n  patch:"), [],
                           "{f}:6: sweep.lr: unknown axis; did you mean 'train.lr'?"),
    "swept and fixed": (edit("  patch:", "  train.lr: [1e-4]\n  patch:"), [],
                        "{f}:6: sweep.train.lr: train.lr is also set ({f}:11); give it in one place"),
    "sweeping bookkeeping": (BASE, ["sweep.train.log_every=[1, 2]"], "--set sweep.train.log_every=[1, 2]: "
                             "sweep.train.log_every: cannot be swept: it changes no result"),
    # Its two trials would train the same model to the same losses, under one trial id.
    "sweeping activation checkpointing": (edit("  patch:", "  train.grad_checkpointing: [false, true]\n  patch:"),
                                          [], "{f}:6: sweep.train.grad_checkpointing: cannot be swept: it changes "
                                              "no result"),
    "duplicate grid values": (edit("[2, 4]", "[2, 2]"), [], "{f}:6: sweep.patch: duplicate value 2: the 2nd entry "
                                                            "repeats the 1st"),
    "duplicate grid values, spelt differently": (edit("  patch:", "  train.seed: [1, 1]\n  patch:"), [],
                                                 "{f}:6: sweep.train.seed: duplicate value 1: the 2nd entry repeats "
                                                 "the 1st"),
    # Shown as YAML writes them (was "duplicate value True"), and which entry they repeat.
    "duplicate booleans": (BASE, ["sweep.train.compile=[false, true, yes]"], "--set sweep.train.compile=[false, true, "
                           "yes]: sweep.train.compile: duplicate value true: the 3rd entry repeats the 2nd"),
    "duplicate numbers spelt apart": (BASE, ["sweep.train.lr=[1e-3, 0.001]"], "--set sweep.train.lr=[1e-3, 0.001]: "
                                      "sweep.train.lr: duplicate value 0.001: the 2nd entry repeats the 1st"),
    "an int and its float": (BASE, ["sweep.train.lr=[1, 2, 1.0]"], "--set sweep.train.lr=[1, 2, 1.0]: sweep.train.lr: "
                             "duplicate value 1.0: the 3rd entry repeats the 1st (1)"),
    "duplicate key": (BASE + "train:\n  lr: 1\n", [], "{f}:15: train: duplicate key (first on line 8)"),
    # Passed, and Ray refused each trial's workers after the study's files and MLflow runs were written.
    "a share finer than Ray's": (BASE, ["resources.cpus_per_worker=0.00001"], "--set resources.cpus_per_worker="
                                 "0.00001: resources.cpus_per_worker: Ray's finest share is 0.0001; got 1e-05"),
    "zero workers": (edit("workers_per_trial: 1", "workers_per_trial: 0"), [],
                     "{f}:14: resources.workers_per_trial: must be >= 1, got 0"),
    "negative guidance": (edit("fid_samples: 100", "cfg_scale: -0.5"), [], "{f}:12: eval.cfg_scale: must be >= 0, "
                          "got -0.5"),
    # Passed, and every trial failed at its first milestone: the DDIM step's square root of a negative number.
    "DDIM's eta above 1": (edit("fid_samples: 100", "eta: 1.05"), [], "{f}:12: eval.eta: must be <= 1, got 1.05"),
    "DDIM steps that do not divide the chain": (edit("fid_samples: 100", "sampling_steps: 30"), [],
                                                "{f}:12: eval.sampling_steps: DDIM takes every k-th of "
                                                "train.diffusion_steps (1000) steps: 30 does not divide it"),
    "DDIM steps that do not divide a swept chain": (
        edit("fid_samples: 100", "sampling_steps: 40"), ["sweep.train.diffusion_steps=[1000, 400, 300]"],
        "{f}:12: eval.sampling_steps: DDIM takes every k-th of train.diffusion_steps (300) steps: 40 does not "
        "divide it"),
    "sampling steps beyond the chain": (edit("fid_samples: 100", "sampling_steps: 25\n  sampler: ddpm"),
                                        ["train.diffusion_steps=24"],
                                        "{f}:12: eval.sampling_steps: 25 is more than train.diffusion_steps (24)"),
    "DDPM steps beyond a swept chain": (
        edit("fid_samples: 100", "sampling_steps: 25\n  sampler: ddpm"), ["sweep.train.diffusion_steps=[1000, 24]"],
        "{f}:12: eval.sampling_steps: 25 is more than train.diffusion_steps (24)"),
    "DDIM steps beyond a swept chain": (  # said as such, not as a chain that 25 does not divide
        edit("fid_samples: 100", "sampling_steps: 25"), ["sweep.train.diffusion_steps=[1000, 24]"],
        "{f}:12: eval.sampling_steps: 25 is more than train.diffusion_steps (24)"),
    "guidance without a null class": (edit("fid_samples: 100", "cfg_scale: 4"), ["train.class_dropout_prob=0"],
                                      "{f}:12: eval.cfg_scale: guidance (4.0) needs the null class, which "
                                      "train.class_dropout_prob 0 never trains; use cfg_scale 1"),
    "one image for FID": (edit("fid_samples: 100", "fid_samples: 1"), [], "{f}:12: eval.fid_samples: must be >= 2, "
                          "got 1"),
    # inf and nan would reach the trial ids' JSON, which has no such numbers.
    "an infinite number": (edit("lr: 1.0e-3", "lr: .inf"), [], "{f}:10: train.lr: must be a finite number, got inf"),
    "not a number": (edit("fid_samples: 100", "eta: .nan"), [], "{f}:12: eval.eta: must be a finite number, got nan"),
    "--set an infinite number": (BASE, ["train.weight_decay=.inf"], "--set train.weight_decay=.inf: "
                                 "train.weight_decay: must be a finite number, got inf"),
    "an infinite compute budget": (edit("steps: [10, 20, 40]", "compute: [1e6, .inf]"), [],
                                   "{f}:7: sweep.compute: must be a finite number, got inf"),
    "an infinite swept value": (BASE.replace("  lr: 1.0e-3\n", ""), ["sweep.train.lr=[1e-4, -.inf]"],
                                "--set sweep.train.lr=[1e-4, -.inf]: sweep.train.lr: must be a finite number, "
                                "got -inf"),
    "an integer beyond floats": (edit("lr: 1.0e-3", "lr: 1" + "0" * 400), [],
                                 "{f}:10: train.lr: expected a number, got an integer too large for a float"),
    "batch not divisible by the workers": (edit("workers_per_trial: 1", "workers_per_trial: 3"), [],
                                           "{f}:9: train.batch_size: 32 is not divisible by grad_accum × "
                                           "workers_per_trial = 1 × 3"),
    "batch larger than the data": (edit("batch_size: 32", "batch_size: 4096"), [],
                                   "{f}:9: train.batch_size: 4096 is larger than the dataset (1500 items)"),
    "missing name": (BASE.replace("name: tiny\n", "\n"), [], "{f}: name: missing (required)"),
    "bad name": (edit("name: tiny", "name: my study"), [], "{f}:1: name: expected a name of letters, digits, "
                 "'_', '.' and '-', got 'my study'"),
    "an MLP without hidden units": (BASE, ["train.mlp_ratio=0.001"],
                                    "--set train.mlp_ratio=0.001: train.mlp_ratio: mlp_ratio 0.001 leaves the MLP no "
                                    "hidden units at hidden_size 64 (DiT-P/2 on digits, 8×8×1)"),
    "a width past any DiT": (BASE, ["train.hidden_size=4000000000", "train.num_heads=1"],
                             "--set train.hidden_size=4000000000: train.hidden_size: hidden_size 4000000000 is past "
                             "65536, the most a DiT here may have (DiT-P/2 on digits, 8×8×1)"),
    "a depth past any DiT": (BASE, ["sweep.train.depth=[2, 5000]"],
                             "--set sweep.train.depth=[2, 5000]: sweep.train.depth: depth 5000 is past 1000, the most "
                             "a DiT here may have (DiT-P/2 on digits, 8×8×1)"),
    "a number as a key": (BASE.replace("  patch: [2, 4]", "  1: [2, 4]"),
                          [], "{f}:6: sweep.1: a key must be a name, got 1 (YAML reads it as int)"),
    "null as a key in --set": (BASE, ["train={null: 3}"], "--set train={{null: 3}}: train: a key must be a name, got "
                                                          "null (YAML reads it as null)"),
    "null as a key": ("null: 3\n" + BASE, [], "{f}:1: null: a key must be a name, got null (YAML reads "
                      "it as null)"),
    "a name too long for a folder": (edit("name: tiny", "name: " + "a" * 101), [],
                                     "{f}:1: name: expected at most 100 characters (it names the output and report "
                                     "folders), got 101"),
    "latents without a path": (edit("dataset: digits", "dataset: latents"), [],
                               "{f}:3: data.path: the latents dataset needs a path"),
    "a YAML list": ("- name: tiny\n- data: {}\n", [], "{f}:1: the study must be a mapping of sections (name, data, "
                    "sweep, train, eval, resources, tracking, output), got a list"),
    "not YAML": ("name: [tiny\ndata: {{\n", [], "{f}:2: not a YAML file: while parsing a flow sequence, expected ',' "
                 "or ']', but got ':'"),
    "empty file": ("# nothing\n", [], "{f}: the study file is empty"),
    "--set without =": (BASE, ["foo"], "--set foo: expected key=value, e.g. --set train.lr=3e-4"),
    # eval.sampling_steps at its default was named, with no line, for the chain written elsewhere.
    "a chain the default sampling steps do not fit": (edit("  lr: 1.0e-3\n", "  diffusion_steps: 30\n"), [],
                                                     "{f}:10: train.diffusion_steps: 30 steps: DDIM cannot sample "
                                                     "eval.sampling_steps's 50 (its default) from them; set "
                                                     "eval.sampling_steps to at most the chain's steps"),
    # It replaced the whole train section ("train: expected a mapping of fields, got 1").
    "--set of an empty key name": (BASE, ["train.=1"], "--set train.=1: train.: a key of dotted names, none empty, e.g. "
                                   "--set train.lr=3e-4"),
    "warm-up longer than a run": (BASE, ["train.warmup_steps=11"], "--set train.warmup_steps=11: "
                                  "train.warmup_steps: 11 is longer than the shortest run, DiT-P/2's 10 steps: its lr "
                                  "would never reach train.lr; shorten the warm-up or drop the short step counts"),
    "--set without a value": (BASE, ["output="], "--set output=: output: no value (an unset shell variable?); "
                                                 "output=null gives the default"),
    # train.lr=null is refused (expected a number): no hint to it
    "--set without a value, not nullable": (BASE, ["train.lr="], "--set train.lr=: train.lr: no value (an unset "
                                                                 "shell variable?); give one"),
    "a model in another case": (BASE.replace("[DiT-P, DiT-N]", "[DiT-P, DiT-n]"), [],
                                "{f}:5: sweep.model: unknown model 'DiT-n'; did you mean 'DiT-N'?"),
    "swept train fields nested": (BASE.replace("  steps: [10, 20, 40]\n", "  steps: [10, 20, 40]\n  train:\n"
                                                                          "    seed: [0, 1]\n    lr: [1, 2]\n"), [],
                                  "{f}:8: sweep.train: a swept train field is an axis of its own, its key dotted: "
                                  "write 'train.seed: [...]', 'train.lr: [...]' under sweep"),
    "--set unknown key": (BASE, ["train.lrr=1"], "--set train.lrr=1: train.lrr: unknown key; did you mean 'train.lr'?"),
    # The --set spelling in the file was "unknown key; did you mean 'train'?".
    "a dotted key in the file": (BASE + "train.lr: 3.0e-4\n", [], "{f}:15: train.lr: unknown key; write 'lr:' under "
                                                                 "'train:'"),
    "a dotted sweep key in the file": (BASE.replace("  steps: [10, 20, 40]\n", "") + "sweep.steps: [10]\n", [],
                                       "{f}:14: sweep.steps: unknown key; write 'steps:' under 'sweep:'"),
    # Python's True was shown.
    "a section given a boolean": (BASE, ["train=yes"], "--set train=yes: train: expected a mapping of fields, "
                                                       "got true"),
    "a sweep given a list": (BASE, ["sweep=[true, null]"], "--set sweep=[true, null]: sweep: expected a mapping of "
                                                           "axes, got [true, null]"),
    # The paper's 400K steps written as 4e5: YAML reads a float, refused (types stay strict), with how to write it.
    "steps in exponent form": (edit("[10, 20, 40]", "[5e4, 4e5]"), [], "{f}:7: sweep.steps: expected an integer, got "
                               "50000.0; write 50000 or 50_000"),
    "--set steps in exponent form": (BASE, ["sweep.steps=[10, 4e5]"], "--set sweep.steps=[10, 4e5]: sweep.steps: "
                                     "expected an integer, got 400000.0; write 400000 or 400_000"),
    "a small whole float": (BASE, ["train.warmup_steps=5.0"], "--set train.warmup_steps=5.0: train.warmup_steps: "
                            "expected an integer, got 5.0; write 5"),
    "a fraction for an integer": (BASE, ["train.warmup_steps=2.5"], "--set train.warmup_steps=2.5: train.warmup_steps: "
                                  "expected an integer, got 2.5"),
    "--set unknown section": (BASE, ["trian.lr=1"], "--set trian.lr=1: trian: unknown key; did you mean 'train'?"),
    "--set wrong type": (BASE, ["train.lr=fast"], "--set train.lr=fast: train.lr: expected a number, got 'fast'"),
    "--set with a key twice": (BASE, ["train={lr: 1e-3, batch_size: 16, lr: 5e-3}"],  # the last one was kept
                               "--set train={{lr: 1e-3, batch_size: 16, lr: 5e-3}}: train: lr: duplicate key"),
    "--set into a value": (BASE, ["name.x=1"], "--set name.x=1: name is not a section"),
    # Values that used to pass, every trial then failing at its start or its first evaluation:
    "EMA that never moves": (BASE, ["train.ema_decay=1"], "--set train.ema_decay=1: train.ema_decay: must be < 1, "
                                                           "got 1"),  # as written, not as the float 1.0
    "betas reaching 1": (BASE, ["train.diffusion_steps=20"], "--set train.diffusion_steps=20: train.diffusion_steps: "
                                                             "must be >= 21, got 20"),
    "steps past int64's reach": (BASE, ["sweep.steps=[100000000000000000000]"],
                                 "--set sweep.steps=[100000000000000000000]: sweep.steps: must be <= 1000000000000, "
                                 "got 100000000000000000000"),
    "compute past any run": (BASE, ["sweep.steps=null", "sweep.compute=[1e30]"],
                             "--set sweep.compute=[1e30]: sweep.compute: 1e+30 Gflops is 6.03e+30 steps of DiT-P/2, "
                             "more than 1e+12"),
    "compute past a float's steps": (BASE, ["sweep.steps=null", "sweep.compute=[1e308]"],
                                     "--set sweep.compute=[1e308]: sweep.compute: 1e+308 Gflops is inf steps of "
                                     "DiT-P/2, more than 1e+12"),
    "a seed past torch's generator": (BASE, ["train.seed=100000000000000000000"],
                                      "--set train.seed=100000000000000000000: train.seed: must be <= 18446687733646, "
                                      "got 100000000000000000000"),
    "empty output": (BASE + 'output: ""\n', [], "{f}:15: output: must not be empty"),
    "alias inside itself": (BASE.replace("model: [DiT-P, DiT-N]", "model: &m [DiT-P, *m]"), [],
                            "{f}:5: an alias refers to the value that contains it"),
    "alias bomb": (BASE + "a: &a [x, x, x, x, x, x, x, x, x, x]\n"
                   + "".join(f"{c}: &{c} [{', '.join([f'*{p}'] * 10)}]\n" for p, c in zip("abcdef", "bcdefg")),
                   [], "{f}:19: through its aliases this value expands to more than 100,000 values"),
}


def test_merge_keys_and_aliases_load_as_yaml_says(tmp_path):
    # A merge key's entries may be overridden by the mapping's own (not a duplicate key), and an alias is its
    # anchor's value.
    text = BASE.replace("train:\n  batch_size: 32\n  lr: 1.0e-3\n", "train: {<<: {batch_size: 32, lr: 1.0e-3}, "
                                                                      "lr: 2.0e-3}\n")
    study = load(tmp_path, text)
    assert {(t.train["batch_size"], t.train["lr"]) for t in study.trials} == {(32, 2.0e-3)}
    text = BASE.replace("  patch: [2, 4]", "  patch: &p [2, 4]").replace("resources:", "eval2: *p\nresources:")
    with pytest.raises(StudyError, match=r"study.yaml:13: eval2: unknown key"):
        load(tmp_path, text)


def test_fewer_fid_images_than_feature_dimensions_warns(tmp_path):
    # FID's covariance of D-d features is singular from D images or fewer: allowed (a smoke test), but said.
    study = load(tmp_path, edit("fid_samples: 100", "fid_samples: 64"))
    path = tmp_path / "study.yaml"
    assert study.warnings == [f"{path}:12: eval.fid_samples: FID from 64 images of 64-d features: their covariance "
                              "is rank-deficient, so FID is biased upwards and noisy; use several times 64 images"]
    assert not load(tmp_path, edit("fid_samples: 100", "fid_samples: 65")).warnings
    assert not load(tmp_path, edit("fid_samples: 100", "fid_samples: 64\n  fid: false")).warnings
    inception = load(tmp_path, overrides=["eval.feature_extractor=inception-v3-compat", "eval.fid_samples=2048"],
                     check_data=False)  # warns of the Inception weights it finds in no cache here, too
    assert any("FID from 2048 images of 2048-d features" in w for w in inception.warnings)


def test_fid_inputs_are_checked_before_any_training(tmp_path, monkeypatch, inception_weights):
    # Each of these failed only at a trial's first evaluation, after training to its first milestone.
    from core.fid import inception_weights_file

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # torch-fidelity's cache, here empty
    inception = ["eval.feature_extractor=inception-v3-compat", "eval.fid_samples=4096"]
    path = tmp_path / "study.yaml"
    with pytest.raises(StudyError) as err:
        load(tmp_path, overrides=inception)
    assert str(err.value).startswith(f"{path}:11: eval.feature_extractor_weights: Inception-v3 weights for FID "
                                     f"not found: put ")
    assert str(inception_weights_file()) in str(err.value)
    assert "Inception-v3 weights for FID not found" in load(tmp_path, overrides=inception, check_data=False).warnings[0]
    assert not load(tmp_path, overrides=[*inception, "eval.fid=false"]).warnings
    inception_weights_file().parent.mkdir(parents=True)
    inception_weights_file().write_bytes(b"weights")
    with pytest.raises(StudyError, match=f"eval.feature_extractor_weights: {inception_weights_file()} is not "
                                         "torch-fidelity's Inception-v3 weights "):
        load(tmp_path, overrides=inception)  # torch-fidelity read it only to score the first milestone's samples
    shutil.copyfile(inception_weights, inception_weights_file())
    assert not load(tmp_path, overrides=inception).warnings
    for key in ("reference", "heldout"):
        with pytest.raises(StudyError) as err:
            load(tmp_path, overrides=[f"eval.{key}={tmp_path / 'nowhere'}"])
        assert str(err.value) == f"--set eval.{key}={tmp_path / 'nowhere'}: eval.{key}: {tmp_path / 'nowhere'} " \
                                 f"does not exist"
        study = load(tmp_path, overrides=[f"eval.{key}={tmp_path / 'nowhere'}", "eval.fid=false"])
        assert study.warnings == [f"--set eval.{key}={tmp_path / 'nowhere'}: eval.{key}: {tmp_path / 'nowhere'} "
                                  f"does not exist (not read: eval.fid is false)"]
    # What exists but is not what it should be.
    (tmp_path / "images" / "a").mkdir(parents=True)
    (tmp_path / "vae").mkdir()
    (tmp_path / "vae" / "config.json").write_text("{")
    (tmp_path / "hostname").write_text("box\n")
    cases = {"eval.heldout": (tmp_path / "images", f"image folder {tmp_path / 'images'} has class folders ['a'] "
                                                   f"but no images ("),
             "eval.vae": (tmp_path / "vae", f"{tmp_path / 'vae'} is not a diffusers model folder: config.json: "
                                            f"not JSON (Expecting property name"),
             "eval.feature_extractor_weights": (tmp_path / "hostname", f"{tmp_path / 'hostname'} is not the digits "
                                                                       f"classifier's weights (a safetensors file")}
    for key, (value, message) in cases.items():
        with pytest.raises(StudyError) as err:
            load(tmp_path, overrides=[f"{key}={value}"])
        assert str(err.value).startswith(f"--set {key}={value}: {key}: {message}")
    with pytest.raises(StudyError) as err:  # Inception's weights are torch.save's
        load(tmp_path, overrides=[*inception, f"eval.feature_extractor_weights={tmp_path / 'hostname'}"])
    assert str(err.value).endswith(f"eval.feature_extractor_weights: {tmp_path / 'hostname'} is not a PyTorch "
                                   f"weights file")
    (tmp_path / "vae" / "config.json").write_text("{}")
    with pytest.raises(StudyError, match="no diffusion_pytorch_model.safetensors"):
        load(tmp_path, overrides=[f"eval.vae={tmp_path / 'vae'}"])
    (tmp_path / "vae" / "diffusion_pytorch_model.fp16.safetensors").write_bytes(b"")  # a variant: not loaded
    with pytest.raises(StudyError, match="no diffusion_pytorch_model.safetensors"):
        load(tmp_path, overrides=[f"eval.vae={tmp_path / 'vae'}"])
    (tmp_path / "vae" / "diffusion_pytorch_model.safetensors").write_bytes(b"")
    with pytest.raises(StudyError, match=f"eval.vae: VAE folder {tmp_path / 'vae'} cannot be loaded: "):
        load(tmp_path, overrides=[f"eval.vae={tmp_path / 'vae'}"])
    torch.save({}, tmp_path / "weights.pth")
    with pytest.raises(StudyError, match=f"eval.feature_extractor_weights: {tmp_path / 'weights.pth'} is not "
                                         "torch-fidelity's Inception-v3 weights .*Missing key"):
        load(tmp_path, overrides=[*inception, f"eval.feature_extractor_weights={tmp_path / 'weights.pth'}"])
    shutil.rmtree(tmp_path / "vae")
    save_tiny_vae(tmp_path / "vae")
    (tmp_path / "empty").mkdir()  # FID takes a flat folder: "it needs one sub-folder of images per class" misled
    with pytest.raises(StudyError) as err:
        load(tmp_path, overrides=[f"eval.vae={tmp_path / 'vae'}", f"eval.reference={tmp_path / 'empty'}"])
    assert str(err.value).endswith(f"eval.reference: image folder {tmp_path / 'empty'} holds no images (.jpg, .jpeg, "
                                   ".png, .ppm, .bmp, .pgm, .tif, .tiff, .webp), loose or in sub-folders")
    (tmp_path / "images" / "a" / "0.png").write_bytes(b"")
    for key in ("reference", "heldout"):  # passed, and FID refused it at the first milestone, after training
        with pytest.raises(StudyError) as err:
            load(tmp_path, overrides=[f"eval.vae={tmp_path / 'vae'}", f"eval.{key}={tmp_path / 'images'}"])
        assert str(err.value).endswith(f"eval.{key}: {tmp_path / 'images'} holds 1 image; FID's statistics need at "
                                       "least 2 real images")
    (tmp_path / "images" / "a" / "1.png").write_bytes(b"")
    (tmp_path / "images" / "b").mkdir()  # a class folder of no images: FID's real images have no labels to miss
    assert not load(tmp_path, overrides=[f"eval.vae={tmp_path / 'vae'}", f"eval.heldout={tmp_path / 'images'}",
                                         *inception, f"eval.feature_extractor_weights={inception_weights}"]
                    ).warnings
    (tmp_path / "flat").mkdir()  # a flat folder of images (ImageNet's validation set as distributed): no labels needed
    for name in ("0.png", "1.png"):
        (tmp_path / "flat" / name).write_bytes(b"")
    assert not load(tmp_path, overrides=[f"eval.vae={tmp_path / 'vae'}", f"eval.reference={tmp_path / 'flat'}",
                                         *inception, f"eval.feature_extractor_weights={inception_weights}"]
                    ).warnings
    # Latents have no real images of their own to compare samples with.
    with pytest.raises(StudyError) as err:
        load_study(STUDIES / "dit_imagenet256.yaml", ["eval.reference=null"], check_data=False)
    assert str(err.value) == ("--set eval.reference=null: eval.reference: FID on latents needs a folder of the real "
                              "training images (e.g. the ImageNet train folder the latents were encoded from), or an "
                              ".npz of their FID statistics (ADM's reference batch, VIRTUAL_imagenet256_labeled.npz)")
    without = load_study(STUDIES / "dit_imagenet256.yaml", ["eval.reference=null", "eval.fid=false"], check_data=False)
    assert len(without.trials) == 12 and not [w for w in without.warnings if "eval.reference" in w]


def test_a_statistics_file_as_the_reference_is_checked_before_any_training(tmp_path):
    # eval.reference may be an .npz of FID statistics (ADM's reference batch: mu, sigma, images as arr_0); one FID
    # cannot use failed only at a trial's first evaluation, after training.
    import numpy as np

    mu, sigma, images = np.zeros(64), np.eye(64), np.zeros((2, 8, 8, 3), np.uint8)
    nan = sigma.copy()
    nan[3, 5] = float("nan")
    cases = {"short_mu": (dict(mu=mu[:63], sigma=sigma[:63, :63]), "statistics of 63-d features; the feature "
                                                                   "extractor's are 64-d"),
             "not_square": (dict(mu=mu, sigma=sigma[:, :63]), "mu (64,) and sigma (64, 63)"),
             "nan": (dict(mu=mu, sigma=nan), "sigma holds 1 value(s) that are not finite"),
             "no_mu": (dict(sigma=sigma, arr_0=images), "no 'mu' array")}
    for name, (arrays, message) in cases.items():
        np.savez(tmp_path / f"{name}.npz", **arrays)
    (tmp_path / "text.npz").write_text("mu, sigma\n")
    cases["text"] = (None, "not an .npz")
    cases["nowhere"] = (None, "does not exist")
    for name, (_, message) in cases.items():
        path = tmp_path / f"{name}.npz"
        with pytest.raises(StudyError) as err:
            load(tmp_path, overrides=[f"eval.reference={path}"])
        assert str(err.value).startswith(f"--set eval.reference={path}: eval.reference: {path}"), name
        assert message in str(err.value), (name, str(err.value))
        # Not read (FID off): a warning, as for a folder.
        study = load(tmp_path, overrides=[f"eval.reference={path}", "eval.fid=false"])
        assert len(study.warnings) == 1 and message in study.warnings[0] and "(not read" in study.warnings[0]

    np.savez(tmp_path / "digits.npz", mu=mu, sigma=sigma, arr_0=images)
    np.savez(tmp_path / "no_images.npz", mu=mu, sigma=sigma)  # KID and precision / recall are then not measured
    for name in ("digits", "no_images"):
        assert not load(tmp_path, overrides=[f"eval.reference={tmp_path / name}.npz"]).warnings
    # Latents need eval.reference: statistics of Inception's 2048-d features serve, as ADM's batch does.
    np.savez(tmp_path / "inception.npz", mu=np.zeros(2048), sigma=np.eye(2048, dtype=np.float32))
    study = load_study(STUDIES / "dit_imagenet256.yaml", [f"eval.reference={tmp_path / 'inception.npz'}"],
                       check_data=False)
    assert len(study.trials) == 12 and not [w for w in study.warnings if "eval.reference" in w]
    study = load_study(STUDIES / "dit_imagenet256.yaml", [f"eval.reference={tmp_path / 'digits.npz'}"],
                       check_data=False)
    assert [w for w in study.warnings if "eval.reference" in w and "the feature extractor's are 2048-d" in w]


def test_a_vae_that_cannot_decode_the_studys_latents_is_refused(tmp_path, encode_tiny_latents):
    # It failed at a trial's first grid or FID, after training, with a convolution's shape error.
    from diffusers import AutoencoderKL

    encode_tiny_latents(tmp_path / "latents", seed=0)  # 4×4×4 latents of 32-pixel images: a VAE that upsamples ×8
    save_tiny_vae(tmp_path / "vae")  # 4 channels, ×2
    latents = ["data.dataset=latents", f"data.path={tmp_path / 'latents'}", "eval.fid=false"]
    with pytest.raises(StudyError) as err:
        load(tmp_path, overrides=[*latents, f"eval.vae={tmp_path / 'vae'}"])
    assert str(err.value) == (f"--set eval.vae={tmp_path / 'vae'}: eval.vae: VAE folder {tmp_path / 'vae'}: it "
                              f"decodes 4-channel latents to images 2× their side, not the 4×4×4 latents of 32-pixel "
                              f"images the data holds")
    AutoencoderKL(block_out_channels=(8,) * 4, layers_per_block=1, latent_channels=4, norm_num_groups=8,
                  down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4
                  ).save_pretrained(tmp_path / "vae8")
    fits = load(tmp_path, overrides=[*latents, f"eval.vae={tmp_path / 'vae8'}"])
    assert len(fits.trials) == 4 and not [w for w in fits.warnings if "eval.vae" in w]


def test_a_swept_architecture_field_names_distinct_models(tmp_path):
    # The report groups measurements by model name: widths of one preset must not share one.
    study = load(tmp_path, overrides=["sweep.train.hidden_size=[96, 128]", "sweep.model=[DiT-P]", "sweep.patch=[2]"])
    assert [(t.model, t.model_config["hidden_size"]) for t in study.trials] == [
        ("DiT-P/2 hidden_size=96", 96), ("DiT-P/2 hidden_size=128", 128)]
    from scaling.ray_trial import train_config

    config = train_config(study.trials[1].to_dict())  # what the trial's workers train: the preset, overridden
    assert config.model == "DiT-P/2" and config.resolved_model_config() == study.trials[1].model_config


def test_the_diffusion_steps_bound_is_core_trains(tmp_path):
    # The study's schema keeps its own copy of the bound (it does not import core.train, torch's import).
    from core.train import MAX_DIFFUSION_STEPS

    assert {t.train["diffusion_steps"] for t in load(tmp_path, overrides=[
        f"train.diffusion_steps={MAX_DIFFUSION_STEPS}"]).trials} == {MAX_DIFFUSION_STEPS}
    with pytest.raises(StudyError, match=f"train.diffusion_steps: must be <= {MAX_DIFFUSION_STEPS}, got "):
        load(tmp_path, overrides=[f"train.diffusion_steps={MAX_DIFFUSION_STEPS + 1}"])


def test_values_that_nest_too_deep_or_expand_too_far_are_refused(tmp_path):
    # A RecursionError from PyYAML as a traceback; a --set alias bomb that printed 35 MB or ran out of memory.
    deep = "[" * 3000 + "]" * 3000
    with pytest.raises(StudyError, match=r"study\.yaml: not a YAML file: its values nest too deeply to read$"):
        load(tmp_path, BASE.replace("lr: 1.0e-3", f"lr: {deep}"))
    with pytest.raises(StudyError, match=r"^--set train\.lr=\[+\]+: train\.lr: the value nests too deeply to read$"):
        load(tmp_path, overrides=[f"train.lr={deep}"])
    levels = ["&l0 [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]"] + [f"&l{i} [{', '.join([f'*l{i - 1}'] * 10)}]" for i in range(1, 7)]
    bomb = f"train.betas=[{', '.join(levels)}]"
    with pytest.raises(StudyError) as err:
        load(tmp_path, overrides=[bomb])
    assert str(err.value) == f"--set {bomb}: train.betas: through its aliases the value expands to more than 100,000 values"


def test_a_patch_the_registry_lacks_trains_its_size_at_that_patch(tmp_path):
    # The registry names the small sizes at /1, /2 and /4: DiT-P at patch 8 on 8×8 digits (one token) is still a
    # DiT-P, and its workers must train it rather than refuse a name the registry lacks.
    (trial,) = load(tmp_path, overrides=["sweep.model=[DiT-P]", "sweep.patch=[8]"]).trials
    assert trial.model == "DiT-P/8" and trial.model_config["patch_size"] == 8
    from scaling.ray_trial import train_config

    config = train_config(trial.to_dict())  # TrainConfig checks its fields as it is built
    assert config.resolved_model_config() == trial.model_config


def test_a_fixed_architecture_field_names_the_models_it_changes(tmp_path):
    # One width for all is DiT-P's override (64 wide) and DiT-N's own width: a 96-wide DiT-P is not DiT-P.
    study = load(tmp_path, overrides=["train.hidden_size=96"])
    assert [t.model for t in study.trials] == ["DiT-P/2 hidden_size=96", "DiT-P/4 hidden_size=96", "DiT-N/2",
                                               "DiT-N/4"]
    assert [t.model for t in load(tmp_path, overrides=["train.depth=3", "train.mlp_ratio=2"]).trials][:1] == [
        "DiT-P/2 depth=3 mlp_ratio=2.0"]
    # A swept field joins the fixed ones in the name; the names of trials without overrides stay the presets'.
    study = load(tmp_path, overrides=["train.depth=3", "sweep.train.hidden_size=[64, 96]", "sweep.model=[DiT-P]",
                                      "sweep.patch=[2]"])
    assert [t.model for t in study.trials] == ["DiT-P/2 depth=3", "DiT-P/2 hidden_size=96 depth=3"]
    assert [t.model for t in load(tmp_path).trials] == ["DiT-P/2", "DiT-P/4", "DiT-N/2", "DiT-N/4"]


def test_an_architecture_field_at_its_presets_value_is_no_override(tmp_path):
    # DiT-P's depth is 2: train.depth 2 is DiT-P/2 itself, with its name and its trial id.
    plain = load(tmp_path, overrides=["sweep.model=[DiT-P]", "sweep.patch=[2]"]).trials
    same = load(tmp_path, overrides=["sweep.model=[DiT-P]", "sweep.patch=[2]", "train.depth=2",
                                     "train.mlp_ratio=4"]).trials
    assert [(t.model, t.trial_id) for t in same] == [(t.model, t.trial_id) for t in plain]
    assert plain[0].model == "DiT-P/2"
    # Swept over null and 2, the two grid points are that one trial: it runs once, and the study says so.
    study = load(tmp_path, overrides=["sweep.model=[DiT-P, DiT-N]", "sweep.patch=[2]", "sweep.train.depth=[null, 2]"])
    assert [(t.model, t.trial_id) for t in study.trials] == [
        ("DiT-P/2", plain[0].trial_id), ("DiT-N/2", study.trials[1].trial_id), ("DiT-N/2 depth=2",
                                                                                  study.trials[2].trial_id)]
    assert len({t.trial_id for t in study.trials}) == 3
    assert study.warnings == ["--set sweep.train.depth=[null, 2]: sweep.train.depth: null and 2 make the same trial "
                              f"of DiT-P/2 ({plain[0].trial_id}: depth 2 is its preset's), which runs once"]


@pytest.mark.parametrize("setting", ["data.path", "eval.reference", "eval.heldout"])
def test_an_output_in_a_folder_the_study_reads_images_from_is_refused(tmp_path, setting):
    # In an image folder the run made the output, a class folder of no images: every trial failed on the data, and
    # the study then refused itself. In a reference folder the study's sample grids would be FID's real images.
    from PIL import Image

    images = tmp_path / "images"
    (images / "a").mkdir(parents=True)
    for k in range(2):
        Image.new("RGB", (8, 8)).save(images / "a" / f"{k}.png")
    dataset = (["data.dataset=imagefolder", "data.image_size=8", "eval.fid=false", "train.batch_size=4"]
               if setting == "data.path" else [])
    for output, relation in ((images / "out", "in "), (images, ""), (tmp_path / "link" / "out", "in ")):
        (tmp_path / "link").unlink(missing_ok=True)
        (tmp_path / "link").symlink_to(images)  # the same folder through a link
        with pytest.raises(StudyError, match=re.escape(
                f"--set output={output}: output: {output} is {relation}{setting} {images}, which the study reads "
                "images from; give an output outside it")):
            load(tmp_path, overrides=[*dataset, f"{setting}={images}", f"output={output}"])
    assert load(tmp_path, overrides=[*dataset, f"{setting}={images}", f"output={tmp_path / 'out'}"]).trials


@pytest.mark.parametrize("case", BAD)
def test_bad_input(tmp_path, case):
    text, overrides, message = BAD[case]
    path = write(tmp_path, text)
    with pytest.raises(StudyError) as err:
        load_study(path, overrides)
    assert str(err.value) == message.format(f=path)


def test_missing_and_empty_datasets(tmp_path):
    text = edit("dataset: digits", "dataset: imagefolder\n  path: images\n  image_size: 32")
    path = write(tmp_path, text)
    with pytest.raises(StudyError) as err:
        load_study(path)
    assert str(err.value) == f"{path}:4: data.path: image folder {tmp_path / 'images'} does not exist"
    (tmp_path / "images").mkdir()
    with pytest.raises(StudyError) as err:
        load_study(path)
    assert str(err.value) == (f"{path}:4: data.path: image folder {tmp_path / 'images'} is empty: it needs one "
                              "sub-folder of images per class")


def test_the_digits_extractor_with_other_data_is_named_where_it_was_set(tmp_path):
    # Left at its default, the extractor was named at the file (no line of its own), not at the data that rules it out.
    text = edit("dataset: digits", "dataset: imagefolder\n  path: images\n  image_size: 32")
    from PIL import Image

    (tmp_path / "images" / "cats").mkdir(parents=True)
    Image.new("RGB", (32, 32)).save(tmp_path / "images" / "cats" / "0.png")
    path = write(tmp_path, text)
    with pytest.raises(StudyError) as err:
        load_study(path)
    assert str(err.value) == (f"{path}:3: data.dataset: imagefolder data needs eval.feature_extractor: "
                              "inception-v3-compat (its default, digits, only reads 8×8 digits)")
    with pytest.raises(StudyError) as err:
        load_study(path, ["eval.feature_extractor=digits"])
    assert str(err.value) == ("--set eval.feature_extractor=digits: eval.feature_extractor: the digits extractor only "
                              "reads 8×8 digits; use 'inception-v3-compat'")


def test_non_text_and_missing_files(tmp_path):
    binary = tmp_path / "weights.bin"
    binary.write_bytes(bytes(range(256)))
    with pytest.raises(StudyError, match=re.escape(f"{binary}: not a YAML file: it is not UTF-8 text")):
        load_study(binary)
    with pytest.raises(StudyError, match=re.escape(f"{tmp_path / 'nope.yaml'}: no such study file")):
        load_study(tmp_path / "nope.yaml")


@pytest.mark.parametrize("workers, gpus, message", [
    (1, 2, "a worker trains on one GPU; 2 would leave the others idle (more GPUs a trial: workers_per_trial)"),
    (2, 0.5, "a share of a GPU (0.5) suits one worker a trial: Ray may give two workers of a trial the same GPU, "
             "which NCCL refuses"),
])
def test_a_worker_trains_on_one_gpu_or_a_share_of_one_alone(tmp_path, workers, gpus, message):
    # Each worker trains on cuda:LOCAL_RANK: a second GPU of its own sat idle, and two workers given one GPU's halves
    # asked for cuda:1 where Ray let each see one GPU.
    with pytest.raises(StudyError) as err:
        load(tmp_path, overrides=[f"resources.workers_per_trial={workers}", f"resources.gpus_per_worker={gpus}"])
    assert str(err.value) == f"--set resources.gpus_per_worker={gpus}: resources.gpus_per_worker: {message}"
    shared = load(tmp_path, overrides=["resources.gpus_per_worker=0.5"])  # two trials on one GPU: fine
    assert shared.raw["resources"]["gpus_per_worker"] == 0.5 and len(shared.trials) == 4


def test_cluster_too_small(tmp_path):
    study = load(tmp_path, edit("workers_per_trial: 1", "workers_per_trial: 8\n  gpus_per_worker: 1"))
    with pytest.raises(StudyError) as err:
        check_cluster(study, {"CPU": 16.0, "GPU": 4.0})
    assert str(err.value) == (f"{study.path}:15: resources.gpus_per_worker: a trial needs 8 × 1 = 8 GPUs, "
                              "the cluster has 4")
    check_cluster(study, {"CPU": 16.0, "GPU": 8.0})
    study = load(tmp_path, overrides=["resources.cpus_per_worker=3"])
    with pytest.raises(StudyError) as err:
        check_cluster(study, {"CPU": 2.0})
    assert str(err.value) == ("--set resources.cpus_per_worker=3: resources.cpus_per_worker: a trial needs 1 × 3 = 3 "
                              "CPUs, the cluster has 2")


def test_a_trial_needing_exactly_the_clusters_cpus_fits_as_ray_counts_them(tmp_path):
    # 3 × 1.1 is 3.3000000000000003 in floating point, above the 3.3 CPUs Ray counts as holding three workers of 1.1.
    study = load(tmp_path, overrides=["resources.workers_per_trial=3", "resources.cpus_per_worker=1.1",
                                      "train.batch_size=75"])
    check_cluster(study, {"CPU": 3.3}, [{"CPU": 3.3}])
    wide = load(tmp_path, overrides=["resources.workers_per_trial=25", "resources.cpus_per_worker=2.2",
                                     "train.batch_size=75"])
    check_cluster(wide, {"CPU": 55.0}, [{"CPU": 55.0}])  # 55.00000000000001
    with pytest.raises(StudyError, match="a trial needs 3 × 1.1 = 3.3 CPUs, the cluster has 3.2$"):
        check_cluster(study, {"CPU": 3.2}, [{"CPU": 3.2}])


@pytest.mark.parametrize("share, per_gpu", [(0.3, 3), (0.4, 2), (0.75, 1), (0.1, 10), (0.5, 2), (0.3333, 3)])
def test_a_share_of_a_gpu_lies_within_one_gpu(tmp_path, share, per_gpu):
    # Ray places a share of a GPU within one GPU: 0.3 three times a GPU, its 0.1 left idle. The GPUs were pooled,
    # 8 GPUs / 0.3 = 26 workers a node: 104 trials on 4 nodes of 8 GPUs, of which 96 ran, 8 waiting for room.
    from scaling.study import worker_slots, workers_per_node

    study = load(tmp_path, overrides=[f"resources.gpus_per_worker={share}"])
    nodes = [{"CPU": 8.0}] + [{"CPU": 96.0, "GPU": 8.0}] * 4
    totals = {"CPU": 392.0, "GPU": 32.0}
    assert worker_slots(study, nodes) == 32 * per_gpu
    assert max_concurrent_trials(study, totals) == max_concurrent_trials(study, totals, nodes) == 32 * per_gpu
    assert workers_per_node(study, nodes, concurrent_trials=1000) == 8 * per_gpu
    check_cluster(study, totals, nodes)
    idle = [w for w in study.warnings if "resources.gpus_per_worker" in w]
    assert idle == ([] if per_gpu * share > 0.999 else [
        f"--set resources.gpus_per_worker={share}: resources.gpus_per_worker: {share} of a GPU leaves "
        f"{round(1 - per_gpu * share, 4):g} of each GPU idle (Ray places each share within one GPU, which holds "
        f"{per_gpu} of them): {dict([(3, '1/3 (0.3333)'), (2, '0.5'), (1, '1')])[per_gpu]} would use it all"])


def test_a_worker_that_fits_on_no_node_is_refused(tmp_path):
    # Enough CPUs in the cluster, but not on any one node: the trial's placement group waited for such a node for
    # ever (Ray Train retries it without end), its trial "started" at step 0 and the study never ended.
    study = load(tmp_path, overrides=["resources.cpus_per_worker=12"])
    eight = {"CPU": 8.0, "memory": 1e10}
    with pytest.raises(StudyError) as err:
        check_cluster(study, {"CPU": 16.0}, [eight, eight])
    assert str(err.value) == ("--set resources.cpus_per_worker=12: resources.cpus_per_worker: a worker needs 12 CPUs "
                              "on one node; the cluster's nodes have 8 CPUs")
    check_cluster(study, {"CPU": 20.0}, [eight, {"CPU": 12.0}])
    # GPUs on nodes with too few CPUs for one worker, and CPUs on nodes with no GPU.
    study = load(tmp_path, overrides=["resources.cpus_per_worker=8", "resources.gpus_per_worker=1"])
    gpu_node, cpu_node = {"CPU": 4.0, "GPU": 8.0}, {"CPU": 64.0}
    with pytest.raises(StudyError) as err:
        check_cluster(study, {"CPU": 68.0, "GPU": 8.0}, [gpu_node, cpu_node])
    assert str(err.value).endswith("resources.cpus_per_worker: a worker needs 8 CPUs and 1 GPUs on one node; the "
                                   "cluster's nodes have 4 CPUs and 8 GPUs, 64 CPUs and 0 GPUs")
    check_cluster(study, {"CPU": 72.0, "GPU": 8.0}, [gpu_node, cpu_node, {"CPU": 8.0, "GPU": 1.0}])


def test_trials_at_once_count_the_workers_each_node_holds_not_the_clusters_totals(tmp_path):
    # Each worker is placed whole on one node: the totals counted a 64-CPU head's CPUs towards GPU trials, and nine
    # trials started where one fits, eight of them waiting in Ray Train's retries (and counted as start-up).
    from scaling.autoscaler_limits import UNLIMITED
    from scaling.study import worker_slots

    study = load(tmp_path, overrides=["resources.cpus_per_worker=8", "resources.gpus_per_worker=1"])
    nodes = [{"CPU": 4.0, "GPU": 8.0}, {"CPU": 64.0}, {"CPU": 8.0, "GPU": 1.0}]
    totals = {"CPU": 76.0, "GPU": 9.0}
    assert max_concurrent_trials(study, totals) == 9 and max_concurrent_trials(study, totals, nodes) == 1
    cpu = load(tmp_path, overrides=["resources.cpus_per_worker=2"])
    assert max_concurrent_trials(cpu, {"CPU": 6.0}, [{"CPU": 3.0}, {"CPU": 3.0}]) == 2  # 3 by the totals
    two = load(tmp_path, overrides=["resources.cpus_per_worker=2", "resources.workers_per_trial=2"])
    assert max_concurrent_trials(two, {"CPU": 10.0}, [{"CPU": 5.0}, {"CPU": 5.0}]) == 2  # four workers, two trials
    # An autoscaler's node types, each as many times as it may add them.
    gpu_type = {"CPU": 32.0, "GPU": 8.0}
    assert worker_slots(study, [{"CPU": 64.0}, gpu_type], [1, 3]) == 12  # 4 per node (its CPUs), 3 nodes
    assert worker_slots(study, [{"CPU": 64.0}, gpu_type], [1, UNLIMITED]) == UNLIMITED
    assert worker_slots(study, [{"CPU": 64.0}, {"CPU": 8.0}], [1, UNLIMITED]) == 0  # none holds one, however many
    assert max_concurrent_trials(study, {"CPU": 1000.0, "GPU": 24.0}, [{"CPU": 64.0}, gpu_type], [1, 3]) == 12
    assert max_concurrent_trials(study, totals, [{"CPU": 64.0}]) == 1  # none up holds one: at least one


def test_a_trial_whose_workers_fit_one_by_one_but_not_together_is_refused(tmp_path):
    # Each worker fits on the GPU node, and the cluster has the CPUs and GPUs of four; the node holds two: the
    # placement group never formed, the trial waited at step 0 for ever.
    study = load(tmp_path, overrides=["resources.workers_per_trial=4", "resources.gpus_per_worker=1",
                                      "resources.cpus_per_worker=12"])
    nodes = [{"CPU": 64.0}, {"CPU": 32.0, "GPU": 8.0}]
    with pytest.raises(StudyError) as err:
        check_cluster(study, {"CPU": 96.0, "GPU": 8.0}, nodes)
    assert str(err.value) == ("--set resources.workers_per_trial=4: resources.workers_per_trial: a trial's 4 workers "
                              "need 12 CPUs and 1 GPUs each on one node; the cluster's nodes hold 2 such worker(s) at "
                              "once")
    check_cluster(study, {"CPU": 128.0, "GPU": 16.0}, nodes + [{"CPU": 32.0, "GPU": 8.0}])  # two such nodes: four
    # An autoscaler that may add two of them: the trial waits for the second, not for ever.
    check_cluster(study, {"CPU": 128.0, "GPU": 16.0}, nodes + [{"CPU": 32.0, "GPU": 8.0}], autoscaled=True,
                  counts=[1, 1, 1])
    with pytest.raises(StudyError, match="the cluster's nodes and the node types its autoscaler adds hold 2 such"):
        check_cluster(study, {"CPU": 96.0, "GPU": 8.0}, nodes, autoscaled=True, counts=[1, 1])


def test_dry_run_of_a_study_to_resume(tmp_path):
    out = tmp_path / "out"
    study = load(tmp_path, BASE + f"output: {out}\n")
    finished, started = study.trials[:2]

    def row(trial, step, trial_id=None):
        return dict(study="tiny", trial_id=trial_id or trial.trial_id, model=trial.model, patch=trial.patch,
                    params=trial.params, gflops=trial.gflops, batch_size=32, step=step, status="ok")

    rows = [row(finished, s) for s in finished.milestones] + [row(started, started.milestones[0])]
    rows.append(row(started, 10, trial_id="DiT-P-2-0123456789"))  # a trial of an earlier version of the file
    write_table(rows, out / "results.parquet", RESULTS_SCHEMA)
    plan = format_plan(study, estimate=False)
    last_cell = {line.split()[0]: line.split()[-1] for line in plan.splitlines() if line.startswith("DiT-")}
    assert last_cell[finished.trial_id] == "done"
    assert [cell for cell in last_cell.values() if cell == "done"] == ["done"]  # a partly measured trial is not
    assert f"1 of {len(study.trials)} trials already finished in {out}: a run skips them" in plan
    assert f"{out / 'results.parquet'} also holds 1 trial(s) that this study file no longer defines" in plan


def test_the_digits_extractor_takes_its_own_weights_file(tmp_path):
    # core.fid_extractor reads the digits classifier's weights with its safetensors loader, not torch.load: a copy
    # of the shipped file is the one valid value, and a torch.save file or another network's is named now.
    from safetensors.torch import save_file

    from core.digits_classifier import WEIGHTS_PATH

    copy = tmp_path / "digits.safetensors"
    copy.write_bytes(WEIGHTS_PATH.read_bytes())
    study = load(tmp_path, overrides=[f"eval.feature_extractor_weights={copy}"])
    assert not study.warnings and study.raw["eval"]["feature_extractor_weights"] == str(copy)
    torch.save(DiT(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=1, num_heads=2).state_dict(),
               tmp_path / "model.pt")
    save_file({"conv1.weight": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    for name, why in (("model.pt", "Error while deserializing header"), ("other.safetensors", "Missing key(s)")):
        with pytest.raises(StudyError) as err:
            load(tmp_path, overrides=[f"eval.feature_extractor_weights={tmp_path / name}"])
        message = str(err.value)
        assert message.startswith(f"--set eval.feature_extractor_weights={tmp_path / name}: "
                                  f"eval.feature_extractor_weights: {tmp_path / name} is not the digits classifier's "
                                  f"weights (a safetensors file of its state dict, as "
                                  f"core/assets/digits_classifier.safetensors): ") and why in message, message
        assert "\n" not in message


def test_a_relative_sqlite_store_is_made_absolute_against_the_working_directory(tmp_path, monkeypatch):
    # Kept relative, the driver's store was wherever it ran (`ray job submit`'s temporary copy, which Ray deletes),
    # and a replay from another directory made a second store with every run again.
    monkeypatch.chdir(tmp_path)
    for given, resolved in (("sqlite:///mlflow.db", f"sqlite:///{tmp_path}/mlflow.db"),
                            ("sqlite:///runs/m.db?timeout=30", f"sqlite:///{tmp_path}/runs/m.db?timeout=30"),
                            ("sqlite:////abs/m.db", "sqlite:////abs/m.db"),
                            # SQLAlchemy's name of the same driver, which MLflow takes: it was left relative
                            ("sqlite+pysqlite:///mlflow.db", f"sqlite+pysqlite:///{tmp_path}/mlflow.db"),
                            ("http://mlflow:5000", "http://mlflow:5000")):
        study = load(tmp_path, overrides=[f"tracking.mlflow_uri={given}"])
        assert study.raw["tracking"]["mlflow_uri"] == resolved
        assert f"mlflow_uri: {resolved}" in study.resolved_yaml()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///env.db")
    assert load(tmp_path).raw["tracking"]["mlflow_uri"] == f"sqlite:///{tmp_path}/env.db"
    from scaling.run import sqlite_store

    assert sqlite_store(f"sqlite+pysqlite:///{tmp_path}/m.db?timeout=30") == tmp_path / "m.db"


def test_a_store_of_no_file_or_in_memory_and_a_home_that_is_not_here_are_the_fields_errors(tmp_path, monkeypatch):
    # Each was a traceback (exit 1): pathlib's "relative path can't be expressed as a file URI" for sqlite:/// (before
    # launch) and for :memory: (after the study's files were written), "Could not determine home directory." for ~.
    monkeypatch.chdir(tmp_path)
    for uri, problem in (("sqlite:///", "names no file; give one, e.g. sqlite:////absolute/path/mlflow.db"),
                         ("sqlite://", "names no file; give one, e.g. sqlite:////absolute/path/mlflow.db"),
                         ("sqlite+pysqlite://", "names no file; give one, e.g. sqlite:////absolute/path/mlflow.db"),
                         ("sqlite:///:memory:", "an in-memory store is lost when the driver ends, and Ray's workers "
                                                "cannot reach it; give a file"),
                         # SQLite's URI filenames of memory, which it accepted
                         ("sqlite:///file::memory:?cache=shared", "an in-memory store is lost when the driver ends, "
                                                                  "and Ray's workers cannot reach it; give a file"),
                         ("sqlite:///file:runs?mode=memory&cache=shared", "an in-memory store is lost when the driver "
                                                                          "ends, and Ray's workers cannot reach it; "
                                                                          "give a file")):
        with pytest.raises(StudyError) as err:
            load(tmp_path, overrides=[f"tracking.mlflow_uri='{uri}'"])  # quoted: YAML reads a final ':' as a mapping
        assert str(err.value) == f"--set tracking.mlflow_uri='{uri}': tracking.mlflow_uri: {uri}: {problem}"
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        with pytest.raises(StudyError) as err:
            load(tmp_path)
        assert str(err.value).endswith(f": tracking.mlflow_uri: {uri} (MLFLOW_TRACKING_URI): {problem}")
        monkeypatch.delenv("MLFLOW_TRACKING_URI")
    for key in ("output", "data.path", "tracking.mlflow_uri"):
        value = "sqlite:///~nobody-here/m.db" if key == "tracking.mlflow_uri" else "~nobody-here/x"
        with pytest.raises(StudyError) as err:
            load(tmp_path, overrides=[f"{key}={value}"])
        assert str(err.value) == (f"--set {key}={value}: {key}: ~nobody-here/{'m.db' if 'uri' in key else 'x'}: "
                                  "~nobody-here has no home folder on this machine")


@pytest.mark.parametrize("text, value", [("0", 0), ("-0", 0), ("+7", 7), ("0x1F", 31), ("0b101", 5), ("1_000", 1000),
                                         ("010.5", 10.5), ("010e3", 10000.0), ("3e-4", 3e-4), ("1.0e+14", 1e14),
                                         (".5", 0.5), ("'010'", "010"), ("2024-01-01", datetime.date(2024, 1, 1))])
def test_the_study_loader_reads_numbers_as_yaml_does_but_octal_and_base_60(text, value):
    from scaling.study import parse_value

    assert parse_value(text) == value and type(parse_value(text)) is type(value)
