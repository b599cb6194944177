"""The mode a plain open() gives a new file, for files that libraries create private (mkstemp, safetensors)."""
import os


def new_file_mode():
    """0o666 less the process's umask, which is left as it was."""
    return 0o666 & ~_umask()


def _umask():
    """The process's umask, read from Linux's /proc where it says it (os.umask reads it only by setting it, for the
    whole process: another thread's file made in that instant would be private)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError, IndexError):
        umask = os.umask(0o077)  # the most private one for that instant
        os.umask(umask)
        return umask


def give_new_file_mode(path):
    """chmod path to new_file_mode(): readable by whom the user's umask lets read what they write."""
    os.chmod(path, new_file_mode())
