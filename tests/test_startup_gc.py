"""The collector paused for a worker's start-up: resumed by the worker, or by the timer at the latest."""
import subprocess
import sys
import textwrap


def run_python(code):
    """Run code in a fresh interpreter (the collector's state is process-wide) and return its stdout's last line."""
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().splitlines()[-1]


def test_the_timer_resumes_the_collector_and_freezes_what_start_up_built():
    out = run_python("""
        import gc, time
        from scaling.startup_gc import pause_collector_for_startup
        pause_collector_for_startup(0.5)
        paused = not gc.isenabled() and gc.get_freeze_count() == 0
        import json, decimal  # start-up's imports, made while paused
        deadline = time.time() + 30
        while not gc.isenabled() and time.time() < deadline:
            time.sleep(0.05)
        print(paused, gc.isenabled(), gc.get_freeze_count() > 1000, gc.get_count()[0] < 700)
    """)
    assert out == "True True True True"


def test_resuming_early_beats_the_timer_and_happens_once():
    out = run_python("""
        import gc, time
        from scaling.startup_gc import pause_collector_for_startup, resume_collector
        pause_collector_for_startup(0.5)
        resume_collector()
        resumed = gc.isenabled() and gc.get_freeze_count() > 1000
        gc.disable()  # the timer must not resume a collector the program itself paused since
        time.sleep(1.0)
        print(resumed, gc.isenabled())
    """)
    assert out == "True False"
