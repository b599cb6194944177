"""Python's cyclic garbage collector paused through a Ray worker's start-up, then resumed with start-up's objects frozen.

A trial's worker imports Ray Train, torch, DeepSpeed and core before its first step: about 400,000 objects that live
as long as the process. The collector meanwhile runs a full collection each time the long-lived objects grow by a
quarter, each one scanning all of them: 6 full collections, 0.36 s of those imports' 2.2 s in a fresh process on the
2-core box (benchmarks/README.md, "Trial start-up"). Paused, the imports take 1.7 s. Resumed, the collector runs as
before, but `gc.freeze()` first moves what start-up built out of its scans for good (Python's documented use of it),
with the little cyclic garbage start-up left (some 9,000 objects, a few MB): collecting it would cost 0.25 s.

A worker resumes it where its start-up is known to end (scaling.ray_trial, before training), every other worker
(Ray Train's controller, the study's actors) after STARTUP_S at the latest.
"""
import gc
import threading

STARTUP_S = 30.0  # the longest a worker's collector stays paused

_lock = threading.Lock()
_paused = False  # by pause_collector_for_startup, and not resumed since


def pause_collector_for_startup(seconds=STARTUP_S):
    """Pause the collector now; resume it (`resume_collector`) after `seconds` unless something resumes it first."""
    global _paused
    with _lock:
        gc.disable()
        _paused = True
    timer = threading.Timer(seconds, resume_collector)
    timer.daemon = True  # never keeps a worker alive
    timer.start()


def resume_collector():
    """Freeze what exists now (the collector never scans it again) and resume the collector paused for start-up; the
    first call only (a collector the program pauses later, for its own reasons, stays paused)."""
    global _paused
    with _lock:
        if _paused:
            gc.freeze()
            gc.enable()
            _paused = False
