"""The collector paused for a worker's start-up: resumed by the worker, or by the timer at the latest."""
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

PRELUDE = """
import gc, os, time, weakref
from scaling import startup_gc
from scaling.startup_gc import pause_collector_for_startup, resume_collector

class Cycle:
    pass

def frozen(obj):
    # tracked by the collector, yet in none of its three generations: in the permanent one
    return gc.is_tracked(obj) and not any(o is obj for g in range(3) for o in gc.get_objects(g))
"""


def run_python(code):
    """Run code in a fresh interpreter (the collector's state is process-wide) and return its stdout's last line."""
    done = subprocess.run([sys.executable, "-c", PRELUDE + textwrap.dedent(code)], cwd=REPO, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().splitlines()[-1]


def test_the_worker_resumes_the_collector_freezing_what_start_up_built_and_left():
    out = run_python("""
        pause_collector_for_startup(30)
        paused = not gc.isenabled()
        built = [[] for _ in range(3)]  # start-up's objects, made while paused
        left = Cycle()  # and its cyclic garbage
        left.me, gone = left, weakref.ref(left)
        del left
        resume_collector()
        later = [[]]
        gc.collect()
        print(paused, gc.isenabled(), frozen(built), frozen(later), gone() is not None, startup_gc._timer is None)
    """)
    assert out == "True True True False True True"  # the garbage frozen too, kept: collecting it costs the start-up


def test_the_timer_resumes_the_collector_at_the_latest_collecting_first():
    out = run_python("""
        pause_collector_for_startup(0.3)
        timer = startup_gc._timer
        built = [[]]
        left = Cycle()
        left.me, gone = left, weakref.ref(left)
        del left
        timer.join(30)
        print(gc.isenabled(), frozen(built), gone() is None)
    """)
    assert out == "True True True"  # a worker that may be mid-work: its garbage collected, not kept


def test_a_pause_of_the_programs_own_after_the_resume_stays():
    out = run_python("""
        pause_collector_for_startup(0.3)
        timer = startup_gc._timer
        resume_collector()
        gc.disable()
        timer.join(30)  # cancelled by the resume; had it fired, it would have found nothing to resume
        time.sleep(0.5)
        resume_collector()
        print(gc.isenabled())
    """)
    assert out == "False"


def test_a_collector_the_program_paused_before_is_left_to_it():
    out = run_python("""
        gc.disable()
        pause_collector_for_startup(0.1)
        time.sleep(0.5)
        resume_collector()
        print(gc.isenabled(), startup_gc._timer is None, gc.get_freeze_count())
    """)
    assert out == "False True 0"


def test_a_child_forked_while_paused_resumes_at_once():
    out = run_python("""
        pause_collector_for_startup(30)
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: no timer thread of its own
            os.write(write, str(gc.isenabled()).encode())
            os._exit(0)
        os.waitpid(pid, 0)
        print(os.read(read, 16).decode(), gc.isenabled())
    """)
    assert out == "True False"
