"""core.folder_swap: a finished folder takes an earlier one's place without a moment where there is none."""
import os
import sys
import threading

import pytest

from core import folder_swap
from core.folder_swap import exchange, swap_in_folder


def folder(path, **files):
    path.mkdir()
    for name, text in files.items():
        (path / name).write_text(text)
    return path


def contents(path):
    return {p.name: p.read_text() for p in path.iterdir()}


linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="renameat2 is Linux's")


@linux_only
def test_exchange_swaps_two_folders_names_in_one_step(tmp_path):
    a, b = folder(tmp_path / "a", x="from a"), folder(tmp_path / "b", y="from b")
    assert exchange(a, b) is True
    assert contents(a) == {"y": "from b"} and contents(b) == {"x": "from a"}


@linux_only
def test_exchange_with_a_missing_path_raises_naming_it_and_changes_nothing(tmp_path):
    a = folder(tmp_path / "a", x="from a")
    with pytest.raises(FileNotFoundError, match="No such file or directory: '.*/a' -> '.*/gone'"):
        exchange(a, tmp_path / "gone")
    assert contents(a) == {"x": "from a"} and sorted(p.name for p in tmp_path.iterdir()) == ["a"]


@pytest.mark.parametrize("one_step", [True, False], ids=["renameat2", "two-renames"])
def test_swap_in_folder_onto_nothing_an_empty_folder_or_an_earlier_one(tmp_path, monkeypatch, one_step):
    if not one_step:  # as on a system without renameat2
        monkeypatch.setattr(folder_swap, "_renameat2", None)
    elif not sys.platform.startswith("linux"):
        pytest.skip("renameat2 is Linux's")
    out, old = tmp_path / "out", tmp_path / ".out.old"

    swap_in_folder(folder(tmp_path / ".new1", meta="1"), out, old)  # nothing there
    assert contents(out) == {"meta": "1"} and not old.exists()

    (out / "meta").unlink()
    swap_in_folder(folder(tmp_path / ".new2", meta="2"), out, old)  # an empty folder there
    assert contents(out) == {"meta": "2"} and contents(old) == {}
    old.rmdir()

    swap_in_folder(folder(tmp_path / ".new3", meta="3", more="3"), out, old)  # an earlier folder there
    assert contents(out) == {"meta": "3", "more": "3"} and contents(old) == {"meta": "2"}
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out.old", "out"]


@linux_only
def test_an_earlier_folder_removed_by_another_process_between_the_exchange_and_its_rename(tmp_path, monkeypatch):
    import shutil

    out, old = folder(tmp_path / "out", meta="1"), tmp_path / ".out.old"
    new = folder(tmp_path / ".new", meta="2")

    def exchange_then_lose_it(a, b):  # as a second encode's clean-up meets the earlier folder under new's name
        done = exchange(a, b)
        shutil.rmtree(a)
        return done
    monkeypatch.setattr(folder_swap, "exchange", exchange_then_lose_it)
    swap_in_folder(new, out, old)
    assert contents(out) == {"meta": "2"} and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@linux_only
@pytest.mark.parametrize("one_step", [True, False], ids=["renameat2", "two-renames"])
def test_a_reader_never_finds_the_destination_missing_while_folders_are_swapped_in(tmp_path, monkeypatch, one_step):
    out = folder(tmp_path / "out", meta="0")
    between = []  # two renames: whether out is there after each rename (the gap the reader would find)
    if not one_step:
        monkeypatch.setattr(folder_swap, "_renameat2", None)
        rename = os.rename

        def noting_rename(a, b):
            rename(a, b)
            between.append((out / "meta").exists())
        monkeypatch.setattr(folder_swap.os, "rename", noting_rename)
    stop, misses, looks = threading.Event(), [], [0]

    def reader():
        while not stop.is_set():
            looks[0] += 1
            if not (out / "meta").exists():
                misses.append(looks[0])

    # The reader shares the GIL with the swaps: switching threads often lets it look between two syscalls.
    switch_interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    watcher = threading.Thread(target=reader)
    watcher.start()
    try:
        for k in range(1, 301):
            old = tmp_path / f".out.old-{k}"
            swap_in_folder(folder(tmp_path / f".new-{k}", meta=str(k)), out, old)
            (old / "meta").unlink()
            old.rmdir()
    finally:
        stop.set()
        watcher.join()
        sys.setswitchinterval(switch_interval)
    assert contents(out) == {"meta": str(k)} and sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    # One step: the reader never found it missing. Two renames leave it missing between them in every swap (the
    # reader, sharing the GIL, found that gap 1,486 and 2,362 times in ~30,000 looks in two runs here, and once, under
    # a full test suite, not at all: the gap is checked where the renames make it).
    if one_step:
        assert misses == []
    else:
        assert between == [False, True] * 300


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads which file an fd is from /proc")
def test_every_file_is_on_disk_before_the_swap_and_the_swap_after_it(tmp_path, monkeypatch):
    # A machine's crash may keep a rename and lose the data of the files renamed with it (the kernel writes them
    # in its own order): a checkpoint, a report or an encode would then be complete in name and empty in content.
    import os

    events, real_fsync, real_swap = [], os.fsync, folder_swap._swap

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def swap(*args):
        events.append(("swap",))
        real_swap(*args)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(folder_swap, "_swap", swap)
    new = folder(tmp_path / ".new", meta="1")
    folder(new / "engine", weights="w")
    out = tmp_path / "out"
    swap_in_folder(new, out, tmp_path / ".old")
    swapped = events.index(("swap",))
    before = {path for _, path in events[:swapped]}
    assert {str(new / "meta"), str(new / "engine" / "weights"), str(new / "engine"), str(new)} <= before
    assert ("fsync", str(tmp_path)) in events[swapped + 1:]  # the rename itself
    assert (out / "meta").read_text() == "1" and (out / "engine" / "weights").read_text() == "w"


def test_a_file_system_without_fsync_still_swaps_and_a_failed_write_stops_it(tmp_path, monkeypatch):
    import errno
    import os

    def fsync_answering(code):
        def fsync(fd):
            raise OSError(code, os.strerror(code))
        return fsync

    out = tmp_path / "out"
    monkeypatch.setattr(os, "fsync", fsync_answering(errno.EINVAL))  # some FUSE file systems: no fsync at all
    swap_in_folder(folder(tmp_path / ".new1", meta="1"), out, tmp_path / ".old1")
    assert contents(out) == {"meta": "1"}
    monkeypatch.setattr(os, "fsync", fsync_answering(errno.EIO))  # the data did not reach the disk
    with pytest.raises(OSError, match="Input/output error"):
        swap_in_folder(folder(tmp_path / ".new2", meta="2"), out, tmp_path / ".old2")
    assert contents(out) == {"meta": "1"} and contents(tmp_path / ".new2") == {"meta": "2"}  # the earlier one stays


def synced_paths(monkeypatch):
    """The paths os.fsync is called on from now on."""
    real_fsync, synced = os.fsync, []

    def fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)
    monkeypatch.setattr(os, "fsync", fsync)
    return synced


def test_a_scratch_folder_is_swapped_in_without_a_disk_write(tmp_path, monkeypatch):
    # A Ray worker's local checkpoint is scratch (Ray's copy is the one resumed from): syncing it cost seconds a
    # checkpoint at DiT-XL/2's size, for nothing.
    synced = synced_paths(monkeypatch)
    swap_in_folder(folder(tmp_path / ".new", meta="1"), tmp_path / "out", tmp_path / ".old", durable=False)
    assert contents(tmp_path / "out") == {"meta": "1"} and synced == []


def test_what_was_copied_is_put_on_disk_and_only_that(tmp_path, monkeypatch):
    # Ray copies a worker's checkpoint into storage with pyarrow and syncs nothing: the copy a re-run resumes from.
    source = folder(tmp_path / "local", **{"rng-rank1.pt": "r"})
    folder(source / "deepspeed", **{"zero_pp_rank_1_optim_states.pt": "z"})
    copy = folder(tmp_path / "storage", **{"rng-rank0.pt": "another rank's"})  # other workers copy into it too
    folder(copy / "deepspeed", **{"zero_pp_rank_1_optim_states.pt": "z"})
    (copy / "rng-rank1.pt").write_text("r")
    synced = synced_paths(monkeypatch)
    folder_swap.fsync_copied(source, copy)
    assert sorted(synced) == sorted([str(copy / "rng-rank1.pt"), str(copy / "deepspeed" / "zero_pp_rank_1_optim_states.pt"),
                                     str(copy / "deepspeed"), str(copy), str(tmp_path)])
