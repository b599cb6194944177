"""scaling.held_logs: which log reports a trial holds back, and when it reports them."""
import pytest

from scaling.held_logs import MIN_GAP_S, HeldLogs, report_gap_s


class Clock:
    """A clock the test moves by hand."""

    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_the_first_log_is_due_at_once_and_later_ones_a_gap_after_the_last_report():
    clock = Clock()
    held = HeldLogs(1.0, clock)
    assert held.add({"step": 10})  # the first: it carries the trial's start-up time
    assert held.take() == [{"step": 10}] and held.logs == []
    for step in (20, 30, 40):
        clock.now += 0.25
        assert not held.add({"step": step})
    clock.now += 0.25  # 1.0 s after the last report
    assert held.add({"step": 50})
    assert [m["step"] for m in held.take()] == [20, 30, 40, 50]  # oldest first, all of them
    clock.now += 0.5
    assert not held.add({"step": 60})
    # A checkpoint's report takes them early; the gap then counts from that report.
    assert [m["step"] for m in held.take()] == [60]
    clock.now += 0.75
    assert not held.add({"step": 70})
    clock.now += 0.25
    assert held.add({"step": 80})


@pytest.mark.parametrize("interval, gap", [(None, 4.0), ("0.1", MIN_GAP_S), ("0.5", 1.0), ("1.0", 2.0)])
def test_the_gap_is_twice_ray_trains_health_check_interval_and_at_least_a_second(monkeypatch, interval, gap):
    if interval is None:
        monkeypatch.delenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", raising=False)
    else:
        monkeypatch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", interval)
    assert report_gap_s() == gap
