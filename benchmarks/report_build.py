"""Time to build a study's report, its fits in one process against one worker process per CPU.

    python -m benchmarks.report_build [RESULTS] [--n-boot 1000] [--rounds 1]

RESULTS is a results.parquet or a study output folder (default: the default study's,
outputs/gflops_sweep). Each build writes a report into a temporary folder; the fitted laws of the
two builds must be identical (the resamples are drawn before they are spread over the workers).
"""
import argparse
import json
import tempfile
import time
from pathlib import Path

from benchmarks.flags import positive_int
from benchmarks.machine import describe
from core.cpus import usable_cpus
from scaling.fits import N_BOOT
from scaling.report import build_report, n_boot_count
from scaling.results import load_results


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="?", default="outputs/gflops_sweep")
    parser.add_argument("--n-boot", type=n_boot_count, default=N_BOOT)
    parser.add_argument("--rounds", type=positive_int, default=1, help="builds per setting; the fastest is shown")
    args = parser.parse_args(argv)
    try:
        df = load_results(args.results)
    except (ValueError, OSError) as e:  # FileNotFoundError: no such file
        parser.error(str(e))
    cpus = usable_cpus()
    print(f"machine: {describe()}")
    print(f"{args.results}: {len(df)} rows, {df.trial_id.nunique()} trials; {args.n_boot} resamples per fit")
    fits, seconds = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for processes in sorted({1, cpus}):  # one CPU: one setting, nothing to compare it with
            for r in range(args.rounds):
                out = Path(tmp) / f"report-{processes}-{r}"
                started = time.perf_counter()
                build_report(df, out, args.n_boot, processes=processes)
                seconds[processes] = min(seconds.get(processes, float("inf")), time.perf_counter() - started)
                fits[processes] = json.loads((out / "fits.json").read_text())
            print(f"  {processes} process(es): {seconds[processes]:.1f} s")
    if cpus == 1:
        print("one CPU here: no parallel build to compare with")
        return 0
    same = fits[1] == fits[cpus]
    print(f"speed-up {seconds[1] / seconds[cpus]:.2f}× on {cpus} CPUs; fitted laws identical: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
