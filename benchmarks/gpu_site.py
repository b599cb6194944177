"""Packs what a lent GPU machine lacks to run the orchestrator into one archive: `.whl/site.tar.xz`.

    python -m benchmarks.gpu_site [--python 3.12] [--have benchmarks/lent_gpu_packages.txt]

The project's lent H100/H200 machines (benchmarks/README.md) run Python 3.12 with torch, pandas, pyarrow and
scikit-learn but without Ray, DeepSpeed, MLflow, diffusers or torch-fidelity, and reach no package index; what a
call carries is limited to 64 MiB. This downloads the project's dependencies as wheels for that Python, keeps those
the machine does not have (--have, by default benchmarks/lent_gpu_packages.txt), installs them into one
folder and drops what the orchestrator never loads (Ray's Java jar and RLlib / Serve / LLM libraries, MLflow's web
UI, source maps): 58 MB as xz. There: `mkdir -p /tmp/site && tar -xJf .whl/site.tar.xz -C /tmp/site` and
`PYTHONPATH=/tmp/site:.`. DeepSpeed is published as source only; its wheel is built here (pure Python, no ops).
"""
import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from importlib.metadata import version
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# The project's dependencies the machine lacks, each at the version installed in the environment running this script
# (the project's .venv), so that the machine runs what CI tests; their own dependencies as pip resolves them.
PACKAGES = ["ray[default,tune,train,data]", "mlflow", "diffusers", "torch_fidelity", "hjson", "pydantic"]
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64"]
# Never loaded by scaling.run or core.train; together most of the archive's size.
PRUNE = ["ray/jars", "ray/rllib", "ray/serve", "ray/llm", "mlflow/server/js", "bin"]


def pinned(requirement):
    """A requirement at the version installed here, e.g. "ray[default]" -> "ray[default]==2.60.0"."""
    return f"{requirement}=={version(requirement.split('[')[0])}"


def normalized(name):
    return re.sub(r"[-_.]+", "-", name).lower()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--python", default="3.12", help="the machine's Python version")
    parser.add_argument("--have", default=str(REPO / "benchmarks" / "lent_gpu_packages.txt"),
                        help="the package names the machine already has (one per line or comma-separated, # comments)")
    parser.add_argument("--out", default=str(REPO / ".whl" / "site.tar.xz"))
    args = parser.parse_args()
    # Checked before the download, which takes minutes.
    if not re.fullmatch(r"3\.\d+", args.python):
        parser.error(f"--python {args.python!r}: give the machine's version as MAJOR.MINOR, e.g. 3.12")
    try:
        lines = [line for line in Path(args.have).read_text().splitlines() if not line.startswith("#")]
    except (OSError, UnicodeDecodeError) as e:
        parser.error(f"--have {args.have}: {e.strerror if isinstance(e, OSError) else 'not a text file'}")
    out = Path(args.out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        parser.error(f"--out {args.out}: cannot make its folder ({e.strerror})")
    if out.is_dir() or not os.access(out.parent, os.W_OK):
        parser.error(f"--out {args.out}: " + ("a folder" if out.is_dir() else f"{out.parent} is not writable"))
    have = {normalized(n) for n in re.split(r"[\s,]+", " ".join(lines)) if n}
    with tempfile.TemporaryDirectory() as tmp:
        wheels, site = Path(tmp) / "wheels", Path(tmp) / "site"
        platforms = [f"--platform={p}" for p in PLATFORMS]
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--only-binary=:all:", "--implementation=cp",
                        f"--python-version={args.python}", *platforms, "-d", str(wheels), *map(pinned, PACKAGES)],
                       check=True)
        subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(wheels), pinned("deepspeed")],
                       check=True)
        missing = sorted(w for w in wheels.glob("*.whl")
                         if normalized(w.name.split("-")[0]) not in have
                         and not normalized(w.name).startswith(("nvidia-", "cuda-")))
        # Installed for the machine's Python, whichever runs this: pip allows that into a --target folder.
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                        "--only-binary=:all:", "--implementation=cp", f"--python-version={args.python}", *platforms,
                        "--target", str(site), *map(str, missing)], check=True)
        for rel in PRUNE:
            shutil.rmtree(site / rel, ignore_errors=True)
        for source_map in site.rglob("*.map"):
            source_map.unlink()
        partial = out.with_name(out.name + ".partial")  # an interrupted pack leaves no archive that looks whole
        subprocess.run(["tar", "-cJf", str(partial), "-C", str(site), "."], check=True)
        os.replace(partial, out)
    print(f"{out}: {out.stat().st_size / 2 ** 20:.1f} MiB, {len(missing)} packages: "
          + ", ".join(w.name.split("-")[0] for w in missing))


if __name__ == "__main__":
    main()
