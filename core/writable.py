"""Whether a path can be made and written, checked before the work that would write there."""
import os


def write_problem(path):
    """Why path (a folder, with any missing parents) could not be made and written in, or None.

    The nearest of path and its parents that exists must be a folder this user may write in. Python 3.11's
    exists() raises in a folder this user cannot enter: that is a problem named too, not a traceback.
    """
    try:
        existing = next((p for p in (path, *path.parents) if p.exists()), None)
    except OSError as e:
        return f"cannot be reached ({e.strerror}: {e.filename})"
    if existing is None:  # nothing on the way exists (a relative path's "."): made from the current folder
        return None
    if not existing.is_dir():
        return f"{existing} is not a folder"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{existing} is not writable"
    return None
