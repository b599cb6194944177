"""Putting a finished folder where an earlier one is, so that the destination is never missing."""
import contextlib
import ctypes
import errno
import os

_AT_FDCWD = -100  # <fcntl.h>: paths relative to the working directory
_RENAME_EXCHANGE = 2  # <linux/fs.h>
# An old kernel, or a filesystem without it (NFS, older ZFS; overlayfs answers EXDEV for some folders): two renames.
_UNSUPPORTED = {errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EXDEV}


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


def swap_in_folder(new, out, old):
    """Move the folder new to out; the folder at out, if any, moves to old (a name beside it that nothing has, for
    the caller to remove). Where Linux exchanges the two names in one step, out is never missing; elsewhere it is
    missing between two renames."""
    if not os.path.lexists(out):
        os.rename(new, out)
    elif exchange(new, out):
        with contextlib.suppress(FileNotFoundError):  # an encode starting meanwhile may have removed it already
            os.rename(new, old)  # now the earlier folder, under a name that says so
    else:
        os.rename(out, old)
        os.rename(new, out)
