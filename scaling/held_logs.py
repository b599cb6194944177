"""A trial's log reports held back so that each report to Ray finds the one before it taken.

Every `ray.train.report` waits for the reports before it: Ray Train takes one report per worker at each of its
controller's health checks (a one-slot queue; RAY_TRAIN_HEALTH_CHECK_INTERVAL_S, 1 s in a study), and
scaling.tune_relay passes it on only once the driver has recorded it. A trial logging every few steps of a small
model reported faster than that and waited out each hand-over: DiT-P/4 on digits logging every 10 steps trained
1000 steps in 122 s of study time, against 39 s with its logs held (benchmarks/README.md). Held logs ride on the
trial's next report (a checkpoint's, a milestone's, the end's, or the next log's once a report is due), so the
driver still gets every logged step, in order and before any checkpoint after it; scaling.recorder unpacks them.
"""
import os
import time

HELD_LOGS_KEY = "held_logs"  # the report field holding the earlier log reports, oldest first
MIN_GAP_S = 1.0  # the progress view prints every 10 s; MLflow gets every point either way


def report_gap_s():
    """Seconds between a trial's log reports: twice Ray Train's health-check interval (a report waits up to one for
    the controller to take it, and about as long again for the driver to record it), and at least a second."""
    interval = float(os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", 2.0))  # 2.0: Ray Train's default
    return max(MIN_GAP_S, 2 * interval)


class HeldLogs:
    """The log reports of one worker since its last report to Ray."""

    def __init__(self, gap_s, clock=time.monotonic):
        self.gap_s, self.clock = gap_s, clock
        self.logs = []
        self.last_report_at = None  # none yet: the first log is reported at once (it carries the start-up time)

    def add(self, metrics):
        """Hold one log report; whether a report to Ray is due now (this worker's clock)."""
        self.logs.append(metrics)
        return self.last_report_at is None or self.clock() - self.last_report_at >= self.gap_s

    def take(self):
        """The held reports, oldest first, for a report made now; none are held afterwards."""
        logs, self.logs = self.logs, []
        self.last_report_at = self.clock()
        return logs
