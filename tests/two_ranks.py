"""Two gloo processes running one function each (tests/, on pytest's path): what each said."""
import multiprocessing


def on_two_ranks(target, *args, store):
    """Run target(rank, *args, store, queue) in two spawned processes; {rank: what it put on the queue}. The target
    joins a gloo group of 2 on the FileStore at store and puts (rank, value) once."""
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=target, args=(rank, *args, str(store), out)) for rank in range(2)]
    for p in procs:
        p.start()
    said = dict(out.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    assert [p.exitcode for p in procs] == [0, 0]
    return said
