"""Where a report goes, and what it may replace there: a new or empty folder or an earlier report, whole.

Apart from scaling.report (and its plotting and fitting imports), so that scaling.run checks the folder
before a study's hours of training at no cost.
"""
import json
import os
import re
import shutil
import tempfile
import uuid
from pathlib import Path

from core.folder_swap import swap_in_folder


def default_report_dir(study):
    """Where a study's report goes when no folder is given: reports/<study name as a folder name>."""
    return Path("reports") / _safe_name(study)


def _safe_name(name):
    """A study name as a folder name."""
    return re.sub(r"[^A-Za-z0-9._+-]+", "_", name).strip("._") or "study"


REPORT_FILE = re.compile(r"(index\.html|report\.md|fits\.json|fig\d+_\w+\.(png|svg))")  # all a report writes


class ReportDestinationError(ValueError):
    """A report folder that would replace something other than an earlier report."""


def check_report_destination(path):
    """The folder a report may be written to at path, resolved; else ReportDestinationError naming path.

    A report replaces its folder whole, so the folder must be new, empty, or an earlier report: a folder
    holding only a report's files (index.html, report.md, fits.json, figN_*.png/svg), with its index.html and
    a fits.json that reads as a report's. Writes nothing.
    """
    try:
        return _destination(path)
    except OSError as e:  # e.g. a parent that may not be looked into
        raise ReportDestinationError(f"{path}: cannot look at the folder ({e.strerror or e})") from None


def _destination(path):
    """check_report_destination's checks, in order: a name, not a file, a report or nothing, writable."""
    target = Path(os.path.abspath(Path(path).expanduser()))  # "." and ".." have no name of their own
    if target.is_symlink():
        target = target.resolve()  # the folder the link names is replaced; the link stays
    if not target.name:
        raise ReportDestinationError(f"{path}: not a folder a report can replace; give a folder to create")
    if target.is_dir():
        _check_earlier_report(path, target)
        if not os.access(target, os.W_OK | os.X_OK):  # its files are deleted once the new report is in
            raise ReportDestinationError(f"{path}: cannot be replaced: no permission to delete its files")
    elif target.exists():
        raise ReportDestinationError(f"{path}: is a file, not a folder; give a new folder for the report")
    _check_writable(path, _nearest_existing(path, target.parent))
    return target


def _check_earlier_report(path, folder):
    """Refuse a folder that is neither empty nor an earlier report: replacing it would delete its contents."""
    try:
        entries = sorted(os.listdir(folder))
    except OSError as e:
        raise ReportDestinationError(f"{path}: cannot read the folder ({e.strerror})") from None
    if not entries:
        return
    foreign = [e for e in entries if not (REPORT_FILE.fullmatch(e) and (folder / e).is_file()
                                          and not (folder / e).is_symlink())]
    if foreign:
        shown = ", ".join(foreign[:6]) + (f" and {len(foreign) - 6} more" if len(foreign) > 6 else "")
        raise ReportDestinationError(
            f"{path}: holds files that are not a report's ({shown}); a report replaces its whole folder, so it goes "
            f"only to a new or empty folder or over an earlier report: give another folder")
    if not {"index.html", "fits.json"} <= set(entries):
        raise ReportDestinationError(f"{path}: holds a report's files but not its index.html and fits.json, so not "
                                     f"a report that this command wrote; give another folder or empty this one")
    fits = _fits_of(folder)
    if not (fits is not None and {"study", "fits"} <= set(fits)):
        raise ReportDestinationError(f"{path}: its fits.json is not a report's, so the folder is not a report this "
                                     f"command wrote; give another folder or empty this one")


def report_source(path):
    """The results file (an absolute path) that the report in the folder at path was built from, as its fits.json
    records it (its "results"); None where the folder holds no such report, or one that does not say: one built from
    rows with no file (the paper's), or by an earlier version, which recorded none."""
    fits = _fits_of(Path(path).expanduser())
    source = fits.get("results") if fits is not None else None
    return Path(source) if isinstance(source, str) and source else None


def _fits_of(folder):
    """The JSON object of a report folder's fits.json, None where there is none that reads as one."""
    try:
        fits = json.loads((folder / "fits.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return fits if isinstance(fits, dict) else None


def check_report_source(path, results, flag):
    """Refuse a default report folder (path) that holds the report of other results than results (a results file):
    a study whose `output` was changed (`--set output=...`) keeps its name, and so its default folder, and would
    replace the other output's report there unasked. flag: the option that gives another folder (--report-dir,
    --out). A report that does not say what it was built from (report_source) is replaced as before."""
    earlier = report_source(path)
    if earlier is None or os.path.realpath(earlier) == os.path.realpath(results):
        return
    raise ReportDestinationError(
        f"{path}: holds the report of {_results_named(earlier)}; this one is of {_results_named(results)}: give "
        f"{flag} DIR for it, or delete {path} to replace that report")


def _results_named(results):
    """A results file as a message names it: the study output folder holding it, else the file."""
    results = Path(os.path.abspath(results))
    return f"the output {results.parent}" if results.name == "results.parquet" else str(results)


def _nearest_existing(path, folder):
    """The folder itself or its nearest existing parent, which must be a folder (the others get created)."""
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir():
        raise ReportDestinationError(f"{path}: {folder} is a file, not a folder")
    return folder


def _check_writable(path, folder):
    """Do what writing the report starts with, creating a folder in folder, and undo it."""
    try:
        os.rmdir(tempfile.mkdtemp(dir=folder, prefix=".report-check-"))
    except OSError as e:
        raise ReportDestinationError(f"{path}: cannot create a folder in {folder} ({e.strerror})") from None


def swap_in_report(tmp, out):
    """Replace out (checked again: still new or a report) with the finished folder, never half-written."""
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; a report is meant to be read
    target = check_report_destination(out)  # a study runs for hours: the folder may have changed since
    old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")  # a new name: no leftover is in the way
    swap_in_folder(tmp, target, old)  # in one step on Linux: never a moment without a report there
    shutil.rmtree(old, ignore_errors=True)
