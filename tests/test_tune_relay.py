"""Train reports reach Tune one at a time, the last one too, however slow the driver (scaling.tune_relay)."""
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_a_slow_driver_gets_every_report_and_no_checkpoint_runs_ahead_of_it(tmp_path):
    # With Ray's TuneReportCallback (`... ray` for `... ours`) the controller registers checkpoints
    # while the driver is still on earlier reports, and the run hangs before the last one arrives.
    proc = subprocess.run([sys.executable, str(REPO / "tests" / "tune_relay_worker.py"), str(tmp_path), "4", "ours"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    results, end = lines[:-1], lines[-1]
    assert [r["i"] for r in results] == [0, 1, 2, 3] and end == {"finished": True}
    # While the driver works on report i, no later checkpoint exists for a re-run to resume from.
    assert [r["registered"] for r in results] == [0, 1, 2, 3]
    for r in results:  # persisted by Train, its path relayed
        assert Path(r["checkpoint_path"], "weights.txt").read_text() == str(r["i"])


def test_a_discarded_mailbox_releases_its_sender_and_takes_no_more_reports():
    # A trial function that stops receiving (it failed, or Tune stopped it) discards its mailbox: the
    # controller's send waiting on it returns, and a later send neither blocks nor re-creates the box.
    import ray

    from scaling.tune_relay import RelayMailboxes

    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        boxes = RelayMailboxes.remote()
        pending = boxes.send.remote("k", {"i": 0})
        assert ray.get(boxes.receive.remote("k"), timeout=30) == {"i": 0}
        assert ray.wait([pending], timeout=1)[1] == [pending]  # waits for the report to reach Tune
        ray.get(boxes.discard.remote("k"))
        assert ray.get(pending, timeout=30) is None
        assert ray.get(boxes.send.remote("k", {"i": 1}), timeout=30) is None
        ray.get(boxes.close.remote("k"), timeout=30)  # fit() returns after its function stopped receiving
        assert ray.get(boxes.open_boxes.remote()) == 0
    finally:
        ray.shutdown()
