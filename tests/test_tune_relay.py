"""Train reports reach Tune, the last one too, however slow the driver (scaling.tune_relay)."""
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_every_report_reaches_a_slow_driver_and_the_trial_ends(tmp_path):
    # With Ray's TuneReportCallback this run hangs after two results (`... ours` → `... ray`).
    proc = subprocess.run([sys.executable, str(REPO / "tests" / "tune_relay_worker.py"), str(tmp_path), "5", "ours"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert [line.get("i") for line in lines[:-1]] == [0, 1, 2] and lines[-1] == {"finished": True}
    assert lines[0]["checkpoint_path"] is None and lines[1]["checkpoint_path"] is None
    assert Path(lines[2]["checkpoint_path"], "weights.txt").read_text() == "w"  # persisted by Train, path relayed
