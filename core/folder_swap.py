"""Putting a finished folder where an earlier one is, so that the destination is never missing."""
import contextlib
import ctypes
import errno
import os

_AT_FDCWD = -100  # <fcntl.h>: paths relative to the working directory
_RENAME_EXCHANGE = 2  # <linux/fs.h>
# An old kernel, or a filesystem without it (NFS, older ZFS; overlayfs answers EXDEV for some folders): two renames.
_UNSUPPORTED = {errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EXDEV}
_NO_FSYNC = {errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP}  # a file system that has no fsync (some FUSE ones)


def _load_renameat2():
    """glibc's renameat2 (2.28+), or None. The os module has no binding for it, hence ctypes."""
    try:
        function = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # not Linux, or another C library
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


_renameat2 = _load_renameat2()


def exchange(a, b):
    """Swap the names of two existing paths in one step; False (and nothing done) where the system cannot."""
    if _renameat2 is None:
        return False
    if _renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in _UNSUPPORTED:
        return False
    raise OSError(err, os.strerror(err), os.fspath(a), None, os.fspath(b))


def fsync_dir(folder):
    """Make the names in folder (a rename into it, a file created) durable; a no-op where folders cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_tree(folder):
    """Put every file under folder, and the folder's own entries, on disk: a rename that outlives a crash of the
    machine must not bring in files whose contents did not (the kernel may write the rename first)."""
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            if not os.path.islink(path):
                fsync_file(path)
        fsync_dir(root)


def fsync_copied(source, copy):
    """Put on disk what was copied from the folder source into the folder copy: each of source's files there, the
    folders holding them, and copy's name in its parent (where other writers copy into the same folder, their files
    are theirs to sync)."""
    for root, _, files in os.walk(source):
        there = os.path.join(copy, os.path.relpath(root, source))
        for name in files:
            if not os.path.islink(os.path.join(root, name)):
                fsync_file(os.path.join(there, name))
        fsync_dir(there)
    fsync_dir(os.path.dirname(os.path.abspath(copy)))


def fsync_file(path):
    """fsync one file by its path; a file system without fsync passes, a failed write (EIO) raises."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as err:
        if err.errno not in _NO_FSYNC:  # a write that failed (EIO) is the caller's to hear of
            raise
    finally:
        os.close(fd)


def swap_in_folder(new, out, old, durable=True):
    """Move the finished folder new to out, durably (durable=False: a scratch folder's, not worth a disk write); the
    folder at out, if any, moves to old (a name beside it that nothing has, for the caller to remove). Where Linux
    exchanges the two names in one step, out is never missing; elsewhere it is missing between two renames."""
    if durable:
        fsync_tree(new)
    _swap(new, out, old)
    if durable:
        fsync_dir(os.path.dirname(os.path.abspath(out)))


def _swap(new, out, old):
    if not os.path.lexists(out):
        os.rename(new, out)
    elif exchange(new, out):
        with contextlib.suppress(FileNotFoundError):  # an encode starting meanwhile may have removed it already
            os.rename(new, old)  # now the earlier folder, under a name that says so
    else:
        os.rename(out, old)
        os.rename(new, out)
