"""scaling.progress: what a person watching a study sees, a silent trial included."""
import io
from types import SimpleNamespace

from scaling.progress import QUIET_S, Progress


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def trial(trial_id):
    return SimpleNamespace(trial_id=trial_id, gflops=1.0, train={"max_steps": 1600, "batch_size": 64})


def test_a_running_trial_silent_for_long_says_for_how_long():
    clock = Clock()
    progress = Progress([trial("a"), trial("b"), trial("c")], stream=io.StringIO(), clock=clock)
    progress.started("a")
    progress.started("b")
    clock.now += 30
    progress.update("a", 400, 0.125, 2595.0)
    clock.now += QUIET_S - 30  # b: QUIET_S since it started; a: since its report, 30 s less
    lines = progress.render().splitlines()
    assert lines[0] == "[0:02:00] trials: 0 done, 2 running, 1 pending | ETA 0:22:00"  # 4400 steps at 400 in 2 min
    assert lines[1] == "    a                            step     400/1600    loss 0.1250, 2595 img/s"
    assert lines[2] == "    b                            step       0/1600    starting | no report for 0:02:00"
    clock.now += 3600  # evaluating at length, or waiting for a node that never comes
    assert progress.render().splitlines()[1].endswith("loss 0.1250, 2595 img/s | no report for 1:01:30")
    progress.update("b", 100, 0.2, 100.0)
    assert progress.render().splitlines()[2] == "    b                            step     100/1600    loss 0.2000, 100 img/s"


def test_progress_prints_at_most_every_interval():
    clock, out = Clock(), io.StringIO()
    progress = Progress([trial("a")], every=10.0, stream=out, clock=clock)
    progress.maybe_print()
    clock.now += 5
    progress.maybe_print()
    assert out.getvalue().count("trials:") == 1
    clock.now += 5
    progress.maybe_print()
    progress.finished("a", "ok")  # a trial's end prints at once
    assert out.getvalue().count("trials:") == 3 and out.getvalue().splitlines()[-1].startswith("[0:00:10] trials: 1 done")


def test_a_resumed_trials_eta_counts_this_runs_progress_only():
    # Its first report's step counted as progress made in this run: a trial resumed at step 1500 of 1600 that trained
    # 10 more steps in a minute showed 0:00:04 left (and the pending one not at all) where 2:49:00 remained.
    clock = Clock()
    progress = Progress([trial("a"), trial("b")], stream=io.StringIO(), clock=clock)
    progress.started("a")
    clock.now += 30
    progress.resumed("a", 1500)
    progress.update("a", 1500, 0.125, 100.0)
    assert progress.eta_seconds() is None  # nothing trained in this run yet
    clock.now += 30
    progress.update("a", 1510, 0.125, 100.0)
    assert progress.render().splitlines()[0] == "[0:01:00] trials: 0 done, 1 running, 1 pending | ETA 2:49:00"  # 1690 steps at 10 a minute


def test_a_diverged_trial_is_counted_as_diverged_not_failed():
    # A divergence is a result (the exit status and the re-run count it so): the header said "1 failed".
    clock, out = Clock(), io.StringIO()
    progress = Progress([trial("a"), trial("b"), trial("c")], stream=out, clock=clock)
    progress.finished("a", "diverged")
    progress.finished("b", "failed")
    progress.finished("c", "ok")
    assert progress.render().splitlines()[0] == "[0:00:00] trials: 1 done, 0 running, 0 pending, 1 diverged, 1 failed"
