"""`--dry-run`: the grid as a table (parameters, Gflops, steps, training compute, estimated time); launches nothing."""
import functools
import heapq
import json
import time

import torch

from core.cpus import usable_cpus
from core.flops import training_compute
from core.precision import autocast_dtype_for, use_precision
from scaling.results import RESULTS_FILE, load_results, recorded_trials
from scaling.study import launch_order, trials_that_fit
from scaling.trial_storage import checkpoint_step

PROBE_BATCHES = (128, 8)  # the micro-batch probed, halved from the first towards the second to fit the budget
# Forward Gflop per probe step worth spending on an estimate: a bigger model is extrapolated instead.
PROBE_BUDGET_GFLOP = {"cpu": 10.0, "cuda": 20_000.0}
# Timed probe steps: at least this many and this long in all. The fastest counts, so a process that shares the
# machine must slow every one of them to skew it (two steps of a small model took 30 ms: one busy moment).
PROBE_MIN_STEPS, PROBE_MIN_SECONDS = 3, 0.5
# A training image costs 3 forward passes' work (forward + backward), 4 with activation checkpointing (each block's
# forward again in the backward); a sampling step, a decode or a feature extraction is forward work alone.
TRAINING_PASSES = {False: 3, True: 4}
# Multiply-adds of torch-fidelity's FID Inception network on one 299×299 image (the architecture's figure). The digits
# classifier's are left out: under a thousandth of any DiT preset's sampling of one image.
INCEPTION_GMAC = 5.71


#################################################################################
#                             The throughput probe                              #
#################################################################################

def probe_images_per_s(model_config, batch, device="cpu", precision="fp32", threads=None, grad_checkpointing=False):
    """Training images/s of one device: 1 warm-up, then the fastest of the forward+backward+AdamW steps on random
    data that fill PROBE_MIN_SECONDS (PROBE_MIN_STEPS at least); on `threads` CPU threads (None: torch's), with
    activation checkpointing where the trial trains with it (each block's forward again in the backward).

    Cached per (model config, micro-batch, device, precision, threads, checkpointing) for the life of the process.
    """
    threads = threads or torch.get_num_threads()
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _probe(json.dumps(model_config, sort_keys=True), batch, str(device), precision, threads,
                      grad_checkpointing)
    finally:
        torch.set_num_threads(before)


@functools.lru_cache(maxsize=None)
def _probe(config_json, batch, device, precision, threads, grad_checkpointing):
    from core.models import DiT

    cfg, device = json.loads(config_json), torch.device(device)
    with device:  # initialised where it runs: a paper-size model's init is slow on a CPU
        model = DiT(**cfg).train()
    model.gradient_checkpointing = grad_checkpointing
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    size, channels = cfg["input_size"], cfg["in_channels"]
    x = torch.randn(batch, channels, size, size, device=device)
    t = torch.randint(0, 1000, (batch,), device=device)
    y = torch.randint(0, cfg["num_classes"], (batch,), device=device)
    use_precision(precision)  # TF32 or not, as the trial's processes set it
    dtype = autocast_dtype_for(precision)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)

    def step():
        with autocast:
            loss = model(x, t, y).float().square().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    step()  # allocations and kernel selection
    seconds = []
    while len(seconds) < PROBE_MIN_STEPS or sum(seconds) < PROBE_MIN_SECONDS:
        _sync(device)
        start = time.perf_counter()
        step()
        _sync(device)
        seconds.append(time.perf_counter() - start)
    return batch / min(seconds)  # other processes on a shared machine only slow steps down


def _sync(device):
    """Wait for the GPU, so that the clock measures its work rather than its queue."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


#################################################################################
#                                  Estimates                                    #
#################################################################################

def estimate_seconds(study, extrapolated=None, results=None):
    """{trial_id: seconds or a reason string} of the trials a run launches (results: the output's results.parquet,
    loaded, whose finished trials are left out and whose measured milestones are not evaluated again): training plus
    FID's and the grids' sampling, decoding and feature extraction, from probes on this machine.

    Models too big to probe here are extrapolated from the Gflop/s achieved by the largest probed one (their ids
    are added to the set `extrapolated`, where given).
    A trial with N workers is assumed to run N times one worker's rate: one GPU (a share of one: that share of its
    rate), or on a CPU as many threads as the worker has CPUs (Ray sets a worker's OMP_NUM_THREADS to its CPUs; at
    most this machine's), so trials side by side are probed as they run.
    """
    done = recorded_trials(study, results)[0] if results is not None else set()
    trials = [t for t in study.trials if t.trial_id not in done]
    ok = results[results.status == "ok"] if results is not None else None
    measured = set() if ok is None else set(zip(ok.trial_id, ok.step.astype(int)))
    res = study.raw["resources"]
    wants_gpu = res["gpus_per_worker"] > 0
    if wants_gpu and not torch.cuda.is_available():
        return {t.trial_id: "n/a (needs GPU)" for t in trials}
    device = torch.device("cuda" if wants_gpu else "cpu")
    # A worker given a share of a GPU or a CPU shares it with another trial's: that share of its rate.
    parallel = res["workers_per_trial"] * min(1.0, res["gpus_per_worker"] if wants_gpu else res["cpus_per_worker"])
    threads = None if wants_gpu else min(max(1, int(res["cpus_per_worker"])), usable_cpus())

    rates = {}  # trial_id -> images/s of one device
    for trial in trials:
        batch = _probe_batch(trial, res["workers_per_trial"], device)
        if batch:
            try:
                rates[trial.trial_id] = probe_images_per_s(trial.model_config, batch, device,
                                                           trial.train["precision"], threads,
                                                           trial.train["grad_checkpointing"])
            except torch.OutOfMemoryError:
                pass
    if not rates:
        return {t.trial_id: "n/a (too big to probe here)" for t in trials}
    largest = max((t for t in trials if t.trial_id in rates), key=lambda t: t.gflops)
    gflop_per_s = rates[largest.trial_id] * largest.gflops
    if extrapolated is not None:
        extrapolated.update(t.trial_id for t in trials if t.trial_id not in rates)
    return {t.trial_id: _trial_seconds(t, rates.get(t.trial_id, gflop_per_s / t.gflops), parallel,
                                       checkpoint_step(study.output, t.trial_id),
                                       {step for trial_id, step in measured if trial_id == t.trial_id})
            for t in trials}


def _probe_batch(trial, workers, device):
    """The trial's micro-batch, halved until a probe step fits the budget; None when even the smallest does not."""
    batch = min(trial.train["batch_size"] // (trial.train["grad_accum"] * workers), PROBE_BATCHES[0])
    while batch > PROBE_BATCHES[1] and trial.gflops * batch > PROBE_BUDGET_GFLOP[device.type]:
        batch //= 2
    return batch if trial.gflops * batch <= PROBE_BUDGET_GFLOP[device.type] else None


def local_resources():
    """The CPUs and GPUs of the Ray that `scaling.run` starts on this machine without a cluster."""
    from scaling.ray_env import local_cpus

    return {"CPU": local_cpus(), "GPU": torch.cuda.device_count() if torch.cuda.is_available() else 0}


def local_slots(study):
    """Trials at a time on this machine, as `scaling.run` without a cluster would run them: those its Ray holds (at
    least one), no more where resources.max_concurrent_trials asks for more (the others would wait for room)."""
    here = local_resources()
    fit = max(1, trials_that_fit(study, here, [here]))  # one node: each worker whole on it
    asked = study.raw["resources"]["max_concurrent_trials"]
    return min(asked, fit) if asked else fit


def local_capacity_warnings(study):
    """Why a run of the study without --address would be refused on this machine (its trials' resources), as
    warnings: a dry run may plan a study for another machine."""
    from scaling.study import StudyError, check_cluster

    here = local_resources()
    try:
        check_cluster(study, here, [here])
    except StudyError as e:
        return [f"{e} (on this machine, where a run without --address starts its own Ray)"]
    return []


def wall_seconds(seconds, slots):
    """The wall time of trials of these durations, in launch order, each taking the first free of `slots` slots."""
    free_at = [0.0] * slots
    for s in seconds:
        heapq.heappush(free_at, heapq.heappop(free_at) + s)
    return max(free_at)


@functools.lru_cache(maxsize=None)
def vae_decode_gmac(vae_path, latent_shape):
    """Multiply-adds (G) of the VAE at vae_path decoding one latent of latent_shape, counted by torch's flop counter on
    a model built from its config on the meta device (no weights read); None where its config does not read here."""
    from diffusers import AutoencoderKL
    from torch.utils.flop_counter import FlopCounterMode

    # --dry-run reads a study without loading its weights (it warns of a missing or foreign VAE): any config that is
    # not an AutoencoderKL's decoding such latents is not counted, whatever goes wrong with it.
    try:
        config = AutoencoderKL.load_config(vae_path, local_files_only=True)
        if (config.get("_class_name", AutoencoderKL.__name__) != AutoencoderKL.__name__
                or config.get("latent_channels") != latent_shape[0]):
            return None
        with torch.device("meta"):
            vae = AutoencoderKL.from_config(config)
            z = torch.zeros(1, *latent_shape)
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            vae.decode(z)
    except Exception:
        return None
    return counter.get_total_flops() / 2e9  # the counter's flops: 2 a multiply-add


def _trial_seconds(trial, images_per_s, workers=1, start=0, measured=()):
    """Training from step start (a checkpoint it resumes from) to max_steps, and at every milestone from it on
    without a row (measured: those with one) the sampling of FID's images and the grid's, their decoding by the VAE
    (a latent study) and FID's feature extraction, those two at the multiply-adds per second the trial's training
    achieves. images_per_s: one worker's training rate; `workers` of them share training, sampling and decoding, and
    the first alone extracts (core.evaluate)."""
    rate = images_per_s * workers
    seconds = (trial.milestones[-1] - min(start, trial.milestones[-1])) * trial.train["batch_size"] / rate
    ev = trial.eval
    per_milestone = milestone_samples(trial)
    copies = 1 if ev["cfg_scale"] == 1.0 else 2  # guidance runs the null label alongside
    # scaling.ray_trial: a milestone checkpoint resumed from is evaluated again where its row is missing (a driver
    # killed between the two), and a trial trained again from step 0 skips the milestones it has rows of.
    ahead = sum(m >= start and m not in measured for m in trial.milestones)
    sample_images = ahead * per_milestone * ev["sampling_steps"] * copies
    passes = TRAINING_PASSES[bool(trial.train["grad_checkpointing"])]
    decoded = ahead * per_milestone * (trial_decode_gmac(trial) or 0.0)
    extracted = ahead * (ev["fid_samples"] * INCEPTION_GMAC if ev["fid"] and ev["feature_extractor"] ==
                         "inception-v3-compat" else 0.0)
    gmac_per_s = images_per_s * trial.gflops * passes  # one worker's forward work a second
    return seconds + sample_images / (passes * rate) + decoded / (gmac_per_s * workers) + extracted / gmac_per_s


def milestone_samples(trial):
    """Images a milestone samples (and a latent study's VAE decodes): FID's and, apart from them, the grid's."""
    from core.evaluate import EvalConfig  # here, not at the top: it imports torch-fidelity (0.8 s), for a constant

    ev = trial.eval
    grid = ev["grid_images_per_class"] * min(EvalConfig.grid_classes, trial.model_config["num_classes"])
    return (ev["fid_samples"] if ev["fid"] else 0) + grid


def trial_decode_gmac(trial):
    """Multiply-adds (G) of the trial's VAE decoding one sample: 0 where nothing decodes (pixels, or neither FID nor a
    grid), None where its VAE's config does not read here (vae_decode_gmac)."""
    if not trial.eval["vae"] or not milestone_samples(trial):
        return 0.0
    return vae_decode_gmac(trial.eval["vae"], latent_shape(trial))


def latent_shape(trial):
    """(C, H, W) of the trial's samples before the VAE decodes them."""
    cfg = trial.model_config
    return cfg["in_channels"], cfg["input_size"], cfg["input_size"]


#################################################################################
#                                 Formatting                                    #
#################################################################################

def human_count(n):
    """675129632 -> '675.1M'."""
    for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= scale:
            return f"{n / scale:.1f}{suffix}"
    return str(n)


def human_steps(n):
    """50000 -> '50K', 20813 -> '20.8K', 1500 -> '1500' (exact below 10K unless round)."""
    for scale, suffix in ((1_000_000, "M"), (1000, "K")):
        if n >= scale and (n % scale == 0 or n >= 10 * scale):
            return f"{round(n / scale, 1):g}{suffix}"
    return str(n)


def format_gflops(g):
    """Two decimals, as in the paper's Table 4; three significant digits for the tiny presets."""
    return f"{g:.2f}" if g >= 0.1 else f"{g:.3g}"


def format_milestones(milestones):
    """(50000, ..., 400000) -> '50K,100K,...,400K'."""
    steps = [human_steps(s) for s in milestones]
    return ",".join(steps if len(steps) <= 4 else steps[:2] + ["..."] + steps[-1:])


def human_duration(seconds):
    """3725 -> '1h02m'."""
    if isinstance(seconds, str):
        return seconds
    if seconds < 60:
        return f"{seconds:.0f}s" if seconds >= 1 else f"{seconds:.1f}s"
    minutes = seconds / 60
    if minutes < 60:
        return f"{int(minutes)}m{int(seconds % 60):02d}s"
    hours = minutes / 60
    if hours < 48:
        return f"{int(hours)}h{int(minutes % 60):02d}m"
    return f"{hours / 24:.1f}d"


def _table(rows):
    """Left-aligned fixed-width columns separated by two spaces; the first row is the header."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return lines


def format_plan(study, estimate=True):
    """The dry-run report: one row per trial, then the totals (the caller prints study.warnings).

    For a study whose output already holds results (a run to resume), finished trials are marked
    and the estimate covers the others, which a run launches.
    """
    results = load_results(study.output) if (study.output / RESULTS_FILE).exists() else None
    done, foreign = recorded_trials(study, results)
    todo = [t for t in study.trials if t.trial_id not in done]
    swept = list(dict.fromkeys(key for trial in study.trials for key in trial.swept))
    extrapolated = set()
    times = estimate_seconds(study, extrapolated, results) if estimate and todo else {}
    header = ["trial id", "model", "patch", "params", "Gflops", *swept, "steps", "train compute (Gflop)",
              "est. time"]
    rows = [header]
    for trial in study.trials:
        compute = training_compute(trial.gflops, trial.train["batch_size"], trial.milestones[-1])
        rows.append([trial.trial_id, trial.model, str(trial.patch), human_count(trial.params),
                     format_gflops(trial.gflops), *(f"{trial.swept.get(key, '')}" for key in swept),
                     format_milestones(trial.milestones), f"{compute:.2e}",
                     "done" if trial.trial_id in done else
                     ("~" if trial.trial_id in extrapolated else "") + human_duration(times.get(trial.trial_id, "-"))])
    total_compute = sum(training_compute(t.gflops, t.train["batch_size"], t.milestones[-1]) for t in study.trials)
    if not todo:
        total_time = "none left"
    elif not estimate:
        total_time = "not estimated"
    else:
        reasons = [times[t.trial_id] for t in todo if isinstance(times[t.trial_id], str)]  # e.g. "n/a (needs GPU)"
        here = local_slots(study)
        slots = min(here, len(todo))
        at_once = "one trial at a time" if slots == 1 else f"{slots} trials at a time"
        asked = study.raw["resources"]["max_concurrent_trials"]
        if asked and asked > here and len(todo) > here:  # the others would wait for room
            at_once += f" (resources.max_concurrent_trials asks for {asked}; this machine holds {here})"
        total_time = reasons[0] if reasons else (
            f"{human_duration(wall_seconds([times[t.trial_id] for t in launch_order(todo)], slots))} ({at_once} on this "
            "machine, a trial of N workers at N times one worker's rate probed here; training, and FID's and the "
            "grids' sampling, VAE decoding and feature extraction, not Ray's start-up nor the real images' features, "
            "extracted once a study)")
    lines = [f"study {study.name} ({study.path}): {len(study.trials)} trials -> {study.output}", ""]
    lines += _table(rows)
    lines += ["", f"total: {len(study.trials)} trials, training compute {total_compute:.2e} Gflop, "
                  f"estimated time {total_time}",
              "training compute: Gflops × global batch × steps × 3 (forward and backward), a multiply-add counted "
              "once, as in the paper"]
    if extrapolated & {t.trial_id for t in todo}:
        lines.append("~: too big to probe here; extrapolated from the Gflop/s of the largest model probed")
    estimated = [t for t in todo if not isinstance(times.get(t.trial_id, ""), str)]  # not "n/a (...)"
    if any(trial_decode_gmac(t) is None for t in estimated):  # a VAE nothing decodes with is not read: no note
        lines.append("eval.vae: no AutoencoderKL config that decodes the study's latents reads here; the estimate "
                     "leaves its decoding out")
    if done and todo:
        lines.append(f"{len(done)} of {len(study.trials)} trials already finished in {study.output}: a run skips "
                     f"them and resumes the others from their last checkpoints; the estimate is for the "
                     f"{len(todo)} left, from their checkpoints.")
    elif done:
        lines.append(f"All {len(done)} trials already finished in {study.output}: a run only builds the report.")
    if foreign:
        lines.append(f"{study.output / RESULTS_FILE} also holds {len(foreign)} trial(s) that this study file no "
                     f"longer defines; they stay there and in the report.")
    return "\n".join(lines)
