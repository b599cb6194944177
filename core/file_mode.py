"""The mode a plain open() gives a new file, for files that libraries create private (mkstemp, safetensors)."""
import os


def new_file_mode():
    """0o666 less the process's umask, which is left as it was."""
    umask = os.umask(0o077)  # reading it means setting it: the most private one for that instant
    os.umask(umask)
    return 0o666 & ~umask


def give_new_file_mode(path):
    """chmod path to new_file_mode(): readable by whom the user's umask lets read what they write."""
    os.chmod(path, new_file_mode())
