"""An exclusive lock on a folder (or on a file made for it), held by whoever writes there now and released when its
process dies."""
import fcntl
import os


def lock_folder(folder):
    """A descriptor holding an exclusive lock on folder, or None when another holder has one.

    flock on the folder itself writes nothing there, and goes with the descriptor or its process, however
    that ends (no stale lock after a kill). It belongs to an open file, not to a process: a second open in
    the same process conflicts too. Raises OSError where the storage cannot lock a folder (some NFS mounts).
    """
    return _locked(os.open(folder, os.O_RDONLY))


def lock_file(path, create=True):
    """A descriptor holding an exclusive lock on the file at path (made where create and missing), or None when
    another holder has one, or when there is no file and create is False (no holder ever made it).

    A file opened for writing, not a folder: NFS runs flock as a POSIX lock, which needs a file open for writing (a
    folder opened read-only fails there, on every NFS mount). Locally it is lock_folder's flock: per open file,
    released with its descriptor or process. Raises OSError where the storage cannot lock at all (Lustre's noflock).
    """
    try:
        fd = os.open(path, os.O_RDWR | (os.O_CREAT if create else 0), 0o666)
    except FileNotFoundError:
        if create:
            raise
        return None
    return _locked(fd)


def _locked(fd):
    """fd holding an exclusive flock, or None (fd closed) when another holder has one; OSError where none can be."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    except OSError:
        os.close(fd)
        raise
    return fd
