"""Python's cyclic garbage collector paused through a Ray worker's start-up, then resumed.

A trial's worker imports Ray Train, torch, DeepSpeed and core before its first step: about 400,000 objects that live
as long as the process. The collector meanwhile runs a full collection each time the long-lived objects grow by a
quarter, each one scanning all of them: 6 full collections, 0.36 s of those imports' 2.2 s in a fresh process on the
2-core box (benchmarks/README.md, "Orchestration overhead"). Paused, the imports take 1.7 s.

The trial's worker knows where its start-up ends (scaling.ray_trial, once core.train is imported): there
`resume_collector()` freezes what exists (`gc.freeze()`: the collector never scans it again) and resumes the
collector. The little cyclic garbage start-up left (some 9,000 objects, a few MB) is frozen with the rest and kept
for the process's life, on purpose: collecting it would cost 0.25 s of the trial's start. Every other worker (the
Tune trial's actor, which runs the trial's Train controller beside the start-up; the study's actors) gets its
collector back STARTUP_S after it started, when it may be mid-work: one full collection first, then the freeze. A
child forked while paused resumes at once.
"""
import gc
import os
import threading

STARTUP_S = 30.0  # the longest a worker's collector stays paused

_lock = threading.Lock()
_timer = None  # while paused for start-up: the timer that resumes the collector at the latest


def pause_collector_for_startup(seconds=STARTUP_S):
    """Pause a running collector now, until `resume_collector()` or, at the latest, `seconds` from now (which also
    ends a pause of the program's own within those seconds)."""
    global _timer
    with _lock:
        if _timer is not None or not gc.isenabled():  # paused already, or by the program itself: not ours to resume
            return
        gc.disable()
        _timer = threading.Timer(seconds, resume_collector, kwargs={"collect_first": True})
        _timer.daemon = True  # never keeps a worker alive
        _timer.start()


def resume_collector(collect_first=False):
    """Resume the collector paused for start-up, once, freezing what exists now; collect_first: a full collection
    before the freeze (a worker that may be mid-work has garbage that must not be kept)."""
    global _timer
    with _lock:
        if _timer is None:
            return
        _timer.cancel()  # a no-op where the timer itself is resuming
        _timer = None
        if collect_first:
            gc.collect()
        gc.freeze()
        gc.enable()


def _resume_in_forked_child():
    """A child forked while paused has no timer thread: its collector resumes at once."""
    global _lock, _timer
    _lock = threading.Lock()  # the parent's may have been held by another thread at the fork
    if _timer is not None:
        _timer = None
        gc.enable()


os.register_at_fork(after_in_child=_resume_in_forked_child)
