"""The benchmark scripts refuse bad flags as usage errors (exit 2, the flag named), before any work starts."""
import importlib
import subprocess
import sys

import pytest

CASES = [
    ("train_step", ["--batch", "0"], "argument --batch: 0 must be at least 1"),
    ("train_step", ["--model", "DiT-Q/2"], "unknown model 'DiT-Q/2'"),
    ("train_throughput", ["--models", "DiT-T/2", "DiT-Q/2"], "unknown model 'DiT-Q/2'"),
    ("train_throughput", ["--processes", "0"], "argument --processes: 0 must be at least 1"),
    ("linear_library", ["--rounds", "-1"], "argument --rounds: -1 must be at least 1"),
    ("eager_forms", ["--threads", "0"], "argument --threads: 0 must be at least 1"),
    ("gelu", ["--batch", "two"], "argument --batch: 'two' is not a whole number"),
    ("evaluate", ["--num-samples", "1.5"], "argument --num-samples: '1.5' is not a whole number"),
    ("host_memory", ["--model", "DiT-T"], "unknown model 'DiT-T'"),
    ("train_options", ["--steps", "1"], "--steps must be even and at least 2"),
    ("train_options", ["--steps", "25"], "--steps must be even and at least 2"),  # its last window: one step
    ("packing", ["--cpus-per-node", "1"], "--cpus-per-node must be at least 2"),
    ("trial_overhead", ["--trials", "0"], "argument --trials: 0 must be at least 1"),
    ("trial_overhead", ["--study", "/nonexistent/study.yaml"], "--study: "),
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
