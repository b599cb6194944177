"""Train reports reach Tune one at a time, the last one too, however slow the driver (scaling.tune_relay)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

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
        assert ray.get(pending, timeout=30) is False  # not reported to Tune: the controller stops there
        assert ray.get(boxes.send.remote("k", {"i": 1}), timeout=30) is False
        # Delivered: True.
        delivered = boxes.send.remote("j", {"i": 0})
        assert ray.get(boxes.receive.remote("j"), timeout=30) == {"i": 0}
        ray.get(boxes.mark_reported.remote("j"))
        assert ray.get(delivered, timeout=30) is True
        ray.get(boxes.close.remote("j"))
        assert ray.get(boxes.receive.remote("j"), timeout=30) is None
        ray.get(boxes.discard.remote("j"))
        # The controller's callback raises on a report no trial function took: returning, the controller would
        # register the next report's checkpoint, maybe past a milestone whose row was never written.
        from scaling.tune_relay import TrialFunctionStopped, TuneRelay

        named = RelayMailboxes.options(name="relay-test").remote()
        relay = TuneRelay("relay-test")
        ray.get(named.discard.remote(relay._key))
        with pytest.raises(TrialFunctionStopped, match="report 7 and those after it are not registered"):
            relay.after_report(None, [{"step": 7}], None)
        ray.get(boxes.close.remote("k"), timeout=30)  # fit() returns after its function stopped receiving
        assert ray.get(boxes.open_boxes.remote()) == 0
    finally:
        ray.shutdown()


def test_a_trial_resumed_from_a_milestone_the_driver_has_does_not_evaluate_it_again(tmp_path):
    # Ray Train registers a checkpoint before its report goes to the driver. A trial resumed from a milestone
    # checkpoint whose row the driver does not have evaluates that milestone again; one whose row it has (from an
    # earlier run of the study, or written in this one: its worker group restarted from it, or its Tune actor's node
    # lost) does not: for a paper study that is an FID-50K, an hour of a GPU, for a row the recorder would not keep.
    from types import SimpleNamespace

    import ray

    from scaling.ray_trial import KIND_MILESTONE, RayReporting
    from scaling.study import load_study
    from scaling.tune_relay import RelayMailboxes
    from test_recorder import STUDY, milestone, recorder

    class Reporting(RayReporting):  # what it would evaluate and report, outside a Train session
        def __init__(self, *args):
            super().__init__(*args)
            self.evaluated, self.reported = [], []

        def evaluate_milestone(self, state):
            self.evaluated.append(state.step)
            return {"fid": 12.5}

        def report(self, metrics, checkpoint=None):
            self.reported.append({**metrics, "held": self.held.take()})

    (tmp_path / "tiny.yaml").write_text(STUDY.format(out=tmp_path / "out"))
    study = load_study(tmp_path / "tiny.yaml", check_data=False)
    t = study.trials[0]
    tune_trial = SimpleNamespace(config={"trial": {"trial_id": t.trial_id}})

    earlier = recorder(study)  # an earlier run of the study wrote the row of milestone 10
    earlier.on_trial_start(0, [], tune_trial)
    earlier.on_trial_result(0, [], tune_trial, milestone(10))
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        driver = recorder(study)
        driver.tell_relay(RelayMailboxes.options(name="relay-test").remote())
        driver.on_trial_start(0, [], tune_trial)
        driver.on_trial_result(0, [], tune_trial, milestone(20))  # this run writes milestone 20's
        assert ray.get([driver.relay.has_milestone_row.remote(t.trial_id, s) for s in (10, 20, 30)]) == [
            True, True, False]

        run = {"output": str(tmp_path / "out"), "relay_mailboxes": "relay-test"}
        trial = {**t.to_dict(), "milestones": [10, 20, 30]}
        for step, evaluated in ((10, []), (20, []), (30, [30])):
            reporting = Reporting(trial, run)
            reporting.on_resume(SimpleNamespace(step=step, rank=0, world_size=1), {"train_loss": 0.5},
                                [{"step": 5, "train_loss": 0.7}])
            assert reporting.evaluated == evaluated
            assert [r["kind"] for r in reporting.reported] == [KIND_MILESTONE] * len(evaluated)
            # The checkpoint's logs are handed on again: with the milestone's report, or with the next one.
            history = [{"step": 5, "train_loss": 0.7}]
            assert [r["held"] for r in reporting.reported] + [reporting.held.logs] == (
                [history, []] if evaluated else [history])
        # Nor does a trial trained again from step 0 (its checkpoints gone) at the milestones it passes.
        reporting = Reporting(trial, run)
        assert [reporting.on_milestone(SimpleNamespace(step=s, rank=0, world_size=1), {}) for s in (10, 20, 30)] == [
            {}, {}, {"fid": 12.5}]
        assert reporting.evaluated == [30]
    finally:
        ray.shutdown()
