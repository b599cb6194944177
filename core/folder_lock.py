"""An exclusive lock on a folder, held by whoever writes there now and released when its process dies."""
import fcntl
import os


def lock_folder(folder):
    """A descriptor holding an exclusive lock on folder, or None when another holder has one.

    flock on the folder itself writes nothing there, and goes with the descriptor or its process, however
    that ends (no stale lock after a kill). It belongs to an open file, not to a process: a second open in
    the same process conflicts too. Raises OSError where the storage cannot lock a folder (some NFS mounts).
    """
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    except OSError:
        os.close(fd)
        raise
    return fd
