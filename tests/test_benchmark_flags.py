"""The benchmark scripts refuse bad flags as usage errors (exit 2, the flag named), before any work starts."""
import importlib
import os
import subprocess
import sys

import pytest

CASES = [
    ("train_step", ["--batch", "0"], "argument --batch: 0 must be at least 1"),
    ("train_step", ["--model", "DiT-Q/2"], "unknown model 'DiT-Q/2'"),
    ("train_throughput", ["--models", "DiT-T/2", "DiT-Q/2"], "unknown model 'DiT-Q/2'"),
    ("train_throughput", ["--processes", "0"], "argument --processes: 0 must be at least 1"),
    # core.train logs at max_steps too: a last window of 5 steps, noisier, which "the best window" favoured.
    ("train_throughput", ["--steps", "25"], "--steps must be a multiple of 10, at least 20"),
    ("gpu_study", ["--steps", "65"], "--steps must be a multiple of 10, at least 20"),
    ("linear_library", ["--rounds", "-1"], "argument --rounds: -1 must be at least 1"),
    ("eager_forms", ["--threads", "0"], "argument --threads: 0 must be at least 1"),
    ("gelu", ["--batch", "two"], "argument --batch: 'two' is not a whole number"),
    ("evaluate", ["--num-samples", "1.5"], "argument --num-samples: '1.5' is not a whole number"),
    ("host_memory", ["--model", "DiT-T"], "unknown model 'DiT-T'"),
    ("train_options", ["--steps", "1"], "--steps must be even and at least 2"),
    ("train_options", ["--steps", "25"], "--steps must be even and at least 2"),  # its last window: one step
    ("packing", ["--nodes", "1", "--cpus-per-node", "1"], "--nodes × --cpus-per-node must be at least 2: a trial's 2 "
                                                         "workers of 1 CPU, on one node or spread over several"),
    ("trial_overhead", ["--trials", "0"], "argument --trials: 0 must be at least 1"),
    ("trial_overhead", ["--study", "/nonexistent/study.yaml"], "--study: "),
    ("trial_overhead", ["--study", "studies/gflops_sweep.yaml", "--trials", "2"],
     "--trials and --steps shape the tiny study: --study runs its own grid"),  # were ignored
    ("gpu_train", ["--micro-batch", "0"], "argument --micro-batch: 0 must be at least 1"),
    ("gpu_study", ["--images", "0"], "argument --images: 0 must be at least 1"),
    ("gpu_study", ["--models", "DiT-XL/3"], "unknown model 'DiT-XL/3'"),
]


def usage_error(module, argv, monkeypatch, capsys):
    """The stderr of benchmarks.<module>'s main on argv, which must exit 2."""
    main = importlib.import_module(f"benchmarks.{module}").main
    monkeypatch.setattr(sys, "argv", [f"benchmarks.{module}", *argv])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize("module,argv,message", CASES, ids=[f"{m}{' '.join(a)}" for m, a, _ in CASES])
def test_bad_flag_is_a_usage_error(module, argv, message, monkeypatch, capsys):
    assert message in usage_error(module, argv, monkeypatch, capsys)


def test_the_packing_benchmark_counts_trials_at_once_as_the_study_packs_them():
    # It asked each trial's two workers to share one node (Ray Train's PACK is soft: they may span nodes), and counted
    # capacity with its own arithmetic, not the project's.
    from benchmarks.packing import trials_at_once

    assert [trials_at_once(3, 2, 7), trials_at_once(3, 1, 7), trials_at_once(2, 3, 7), trials_at_once(1, 1, 7)] == [
        3, 1, 3, 0]  # 3 one-CPU nodes: two workers on two of them


def test_report_build_refuses_bad_input(tmp_path, capsys):
    from benchmarks.report_build import main

    for argv, message in ((["--n-boot", "1"], "give 0 (no intervals) or a count from 2"),
                          ([str(tmp_path / "missing.parquet")], "missing.parquet: no such file")):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err


def test_gpu_site_checks_its_flags_before_downloading(tmp_path, monkeypatch, capsys):
    def no_download(*args, **kwargs):
        raise AssertionError(f"started {args[0][:4]} before the flags were checked")

    monkeypatch.setattr(subprocess, "run", no_download)
    (tmp_path / "a_folder").mkdir()
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    for argv, message in ((["--python", "python3"], "--python 'python3': give the machine's version as MAJOR.MINOR"),
                          (["--have", str(tmp_path / "none.txt")], "none.txt: No such file or directory"),
                          (["--out", str(tmp_path / "a_folder")], "a_folder: a folder"),
                          (["--out", str(blocker / "site.tar.xz")], "cannot make its folder")):
        assert message in usage_error("gpu_site", argv, monkeypatch, capsys)


def test_cpu_benchmarks_refuse_a_visible_gpu_or_hide_it(monkeypatch, capsys):
    # core.train trains on a GPU where one is visible: train_throughput divided a GPU's rate by the CPU's peak, and
    # train_options' "fp32, ZeRO-0" rows and peak RSS were a GPU run's.
    import torch

    import benchmarks.train_options as train_options

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert "a CPU benchmark, and core.train would train on the GPU here: run it with CUDA_VISIBLE_DEVICES=" in \
        usage_error("train_throughput", [], monkeypatch, capsys)
    seen = []
    monkeypatch.setattr(subprocess, "run", lambda *args, **kwargs: seen.append(kwargs["env"]) or
                        subprocess.CompletedProcess(args, 1, "", "stopped here"))
    assert train_options.measure("DiT-P/2", 8, 2, {}) == (None, None, "failed: stopped here")
    assert seen[0]["CUDA_VISIBLE_DEVICES"] == "" and seen[0]["PATH"] == os.environ["PATH"]


def test_trial_overhead_reads_the_runs_of_the_output_it_ran(tmp_path):
    # Its study's store was read from the study file as written, whose output is another run's: `make run`'s figures,
    # or a crash where it had none. And in a shared store it took any study run of the experiment.
    from mlflow.tracking import MlflowClient

    from benchmarks.trial_overhead import study_runs
    from scaling.tracking import OUTPUT_TAG

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("overhead")
    for output in ("elsewhere", "ours", "later"):
        parent = client.create_run(experiment, tags={OUTPUT_TAG: str(tmp_path / output)}).info.run_id
        for started in (20.0, 10.0):
            client.create_run(experiment, tags={"mlflow.parentRunId": parent, "dit_scaling.started_at": str(started),
                                                "output": output})
    parent, children = study_runs(uri, "overhead", tmp_path / "ours")
    assert parent.data.tags[OUTPUT_TAG] == str(tmp_path / "ours")
    assert [(c.data.tags["output"], c.data.tags["dit_scaling.started_at"]) for c in children] == [
        ("ours", "10.0"), ("ours", "20.0")]


def test_the_machine_line_names_the_cpus_a_benchmark_may_use_and_the_libraries(monkeypatch):
    # It printed os.cpu_count() as "cores": a container's share of a larger machine read as the machine's.
    from importlib import metadata

    from benchmarks.machine import describe

    line = describe()
    assert f"deepspeed {metadata.version('deepspeed')}, ray {metadata.version('ray')}" in line
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0}, raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    assert ", 1 CPUs of the machine's 64, torch " in describe()
