"""SIGTERM unwound as Ctrl-C is, so that a batch scheduler's stop runs the same clean-up and exits 143."""
import contextlib
import signal
import threading


class Terminated(KeyboardInterrupt):
    """SIGTERM received within sigterm_interrupts(): unwinds as Ctrl-C does."""


def _raise_terminated(signum, frame):
    raise Terminated()


def interruption(error):
    """The Ctrl-C or SIGTERM behind error, or None: error itself, or what caused it (one arriving while a C extension
    initialises, matplotlib's renderer at its first figure say, surfaces as "ImportError: initialization failed")."""
    while error is not None:
        if isinstance(error, KeyboardInterrupt):
            return error
        error = error.__cause__ or error.__context__
    return None


@contextlib.contextmanager
def sigterm_interrupts():
    """SIGTERM raises Terminated within the block (finally blocks run); Python's default ends the process at once,
    and ray.init's handler exits with status 15, which a shell or a batch scheduler does not read as terminated."""
    if threading.current_thread() is not threading.main_thread():  # signals reach only the main thread
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def ray_exit_as_terminated():
    """ray.init's SIGTERM handler, set as it starts (seconds before it returns), exits with status 15: within the
    block that exit is Terminated, which the driver unwinds and reports as a stop (143)."""
    try:
        yield
    except SystemExit as e:
        if e.code != signal.SIGTERM:
            raise
        raise Terminated() from None
