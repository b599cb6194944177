"""An exclusive lock on a folder (or on a file made for it), held by whoever writes there now and released when its
process dies."""
import fcntl
import os
import warnings


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
    A holder may remove the file before it lets go (remove_lock_file): a lock then taken on the removed file is let go
    and the path opened again.
    """
    while True:
        try:
            fd = os.open(path, os.O_RDWR | (os.O_CREAT if create else 0), 0o666)  # the umask's mode, as open() gives
        except FileNotFoundError:
            if create:
                raise
            return None
        fd = _locked(fd)
        if fd is None or _still_at(fd, path):
            return fd
        os.close(fd)  # opened before its holder removed it, locked after: a new opener would lock another file


def remove_lock_file(fd, path):
    """Remove the file at path, whose lock fd holds, then let go of it: no lock file is left behind, and an opener
    that had it open before locks it after, finds it removed and opens the path again (lock_file). A file that cannot
    be removed (gone, a stale NFS handle) is left with a warning: the work it guarded is done."""
    try:
        os.unlink(path)
    except OSError as err:
        warnings.warn(f"the lock file {path} could not be removed ({err.strerror}); it is free, and may be deleted")
    finally:
        os.close(fd)


def _still_at(fd, path):
    """Whether the file open at fd is the one at path now."""
    try:
        now = os.stat(path)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (held.st_dev, held.st_ino) == (now.st_dev, now.st_ino)


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
