"""`python -m scaling.run STUDY.yaml`: train every point of a study's grid on Ray, track it, report it.

Exit status: 0 when every trial finished (diverged trials are results too), 1 when trials failed,
2 for a bad study file or bad arguments (nothing is launched or written then), 130 when stopped by
Ctrl-C and 143 by SIGTERM (the same command resumes the study).
"""
import argparse
import contextlib
import logging
import math
import os
import shlex
import shutil
import signal
import socket
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import NamedTuple

import scaling.no_telemetry  # noqa: F401 - first: before MLflow and Ray are imported
from core.folder_lock import lock_file
from core.folder_swap import fsync_dir, fsync_file
from scaling.continuation import continue_recorded_runs
# Outside Tune's loop (else: below).
from scaling.sigterm import Terminated, interruption, ray_exit_as_terminated, sigterm_interrupts
from scaling.study import (StudyError, cached_inception_weights, check_cluster, eval_files_read, launch_order, load_study,
                           max_concurrent_trials, node_holds, sqlite_parts, trials_that_fit, worker_request,
                           workers_per_node)
from scaling.trial_storage import checkpoints_held, ray_storage, train_run_name

EXIT_OK, EXIT_TRIALS_FAILED, EXIT_BAD_INPUT = 0, 1, 2
EXIT_INTERRUPTED = {signal.SIGINT: 130, signal.SIGTERM: 143}  # 128 + the signal, as a shell reports it
MIN_FREE_BYTES = 200 * 2 ** 20  # MLflow, Parquet, logs and reports on top of the checkpoints


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m scaling.run", description=__doc__.splitlines()[0])
    parser.add_argument("study", help="the study file (YAML)")
    parser.add_argument("--dry-run", action="store_true", help="print the grid and the estimated cost; launch nothing")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a field of the study file, its value YAML, e.g. --set train.lr=3e-4 "
                             "(repeatable); a whole section, --set 'train={lr: 3e-4}', replaces the file's, its "
                             "other fields taking their defaults")
    parser.add_argument("--address", default=None,
                        help="Ray cluster to run on (default: RAY_ADDRESS, else a local Ray of the study's own, even "
                             "where `ray start` runs one, as 'local' gives it; 'auto': the one `ray start` runs "
                             "here; HOST:PORT: a cluster's GCS, not Ray Client's ray://)")
    report = parser.add_mutually_exclusive_group()
    report.add_argument("--no-report", action="store_true", help="do not build the report at the end")
    report.add_argument("--report-dir", default=None, help="where the report goes (default: reports/<study>)")
    return parser.parse_args(argv)


def main(argv=None):
    """Run a study; returns the exit status."""
    try:
        args = parse_args(argv)
    except SystemExit as e:  # argparse: --help is 0, a usage error 2
        return int(e.code or 0)
    # A Ctrl-C or SIGTERM anywhere from here (the study file's checks, a dry run, Ray's start, the trials' set-up, the
    # report) is one line and 130 or 143, not a traceback; inside Tune's loop the trials are stopped first (run_study).
    try:
        with sigterm_interrupts():
            return _main(args)
    except (KeyboardInterrupt, ImportError) as e:
        interrupt = interruption(e)
        if interrupt is None:
            raise
        # A dry run launches nothing: there is nothing to resume.
        print("interrupted" + ("" if args.dry_run else "; run the same command again to resume the study"),
              file=sys.stderr)
        return EXIT_INTERRUPTED[signal.SIGTERM if isinstance(interrupt, Terminated) else signal.SIGINT]


def _main(args):
    """main's part after the arguments parse: check the study, then plan it (--dry-run) or run it."""
    try:
        study = load_study(args.study, args.overrides, check_data=not args.dry_run)
        if not args.dry_run:  # at once: not after the checks below (minutes on a large reference folder)
            check_output_free(study)
    except StudyError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    for warning in study.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    try:
        records = check_results(study)
    except StudyError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    for line in continue_recorded_runs(study, results=records):  # steps added: trials go on from their records
        print(line)
    # Ray's own variable where the flag is not given (an empty variable counts as unset, as Ray counts it); "local"
    # is Ray's word for a Ray of the driver's own, which is what no address gives.
    address = args.address if args.address is not None else (os.environ.get("RAY_ADDRESS") or None)
    named = "--address" if args.address is not None else "RAY_ADDRESS"
    if address == "local":
        address = None
    if args.dry_run:
        from scaling.dry_run import format_plan, local_capacity_warnings

        # What the run would refuse here, said without refusing: the plan may be for another machine.
        for check in (lambda s: check_output(s, records), lambda s: check_measured_data(s, records),
                      lambda s: check_checkpoint_processes(s, records),
                      lambda s: check_fid_basis(s, records), lambda s: passed_milestones(s, records),
                      lambda s: args.no_report or check_report_dir(s, args.report_dir),
                      lambda s: [] if address else local_capacity_warnings(s)):
            try:
                said = check(study)
            except StudyError as e:
                said = [e]
            for warning in said if isinstance(said, list) else ():  # the checks that return warnings
                print(f"warning: {warning}", file=sys.stderr)
        print(format_plan(study))
        return EXIT_OK
    try:
        check_output(study, records)
        check_measured_data(study, records)
        check_checkpoint_processes(study, records)
        report_dir = None if args.no_report else check_report_dir(study, args.report_dir)
        check_reachable(address, named)
        check_tracking_server(study)
        # check_fid_basis last: it may list a large reference folder.
        for warning in passed_milestones(study, records) + check_fid_basis(study, records):
            print(f"warning: {warning}", file=sys.stderr)
    except StudyError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return run_study(study, address, build_report=not args.no_report, report_dir=report_dir, named=named)


def check_results(study):
    """The records already in the output (a study to resume) must read, before anything starts: results.parquet,
    loss_curves.parquet and the SQLite MLflow store, which the driver would otherwise fail on after Ray's start.
    Returns results.parquet's rows (load_results), None when there is none."""
    from scaling.results import CURVES_FILE, RESULTS_FILE, load_curves, load_results

    def unreadable(reason):
        return StudyError(f"{study.locate('output')}: output: {reason}; mend it, or move it away to start the study afresh")

    results, curves = study.output / RESULTS_FILE, study.output / CURVES_FILE
    records = None
    try:
        present = results.exists()  # a folder on the way that cannot be entered raises (Python 3.11)
    except OSError as e:
        raise unreadable(f"{study.output}: {e.strerror}") from None
    if present:
        if not results.is_file():
            raise unreadable(f"{results} is not a file")
        try:
            records = load_results(results, strict=True)  # the recorder rewrites it
        except (ValueError, OSError) as e:
            raise unreadable(e) from None
    if curves.exists():
        try:
            load_curves(curves, strict=True)  # as results.parquet: the recorder rewrites it
        except (ValueError, OSError) as e:
            raise unreadable(e) from None
    store = sqlite_store(study.raw["tracking"]["mlflow_uri"])

    def store_problem(reason):  # the store's own field, not the output's (it may lie elsewhere)
        where = study.locate("tracking.mlflow_uri") if study.given("tracking.mlflow_uri") else study.locate("output")
        field = "tracking.mlflow_uri" if study.given("tracking.mlflow_uri") else "output"
        return StudyError(f"{where}: {field}: {store}: {reason}; mend it, or move it away to start the study afresh")

    try:
        present = store is not None and store.exists()
    except OSError as e:  # a name too long, a folder on the way that cannot be entered
        raise store_problem(e.strerror) from None
    if present:
        import sqlite3

        try:
            with contextlib.closing(sqlite3.connect(f"{store.as_uri()}?mode=ro", uri=True)) as db:
                db.execute("PRAGMA schema_version").fetchone()  # reads the header: fails on anything else
        except sqlite3.Error as e:
            raise store_problem(f"not an SQLite database ({e})") from None
    return records


def check_measured_data(study, results=None):
    """The rows of the study's trials (results: its results.parquet, loaded) must have been measured on the encode of
    the latents that data.path holds now: a folder encoded again in place keeps its path, which is what ids hash."""
    from scaling.results import RESULTS_FILE, measured_on_other_data

    other = measured_on_other_data(study, results)
    if other:
        t = next(t for t in study.trials if t.trial_id in other)
        raise StudyError(f"{study.locate('data.path')}: data.path: {t.data['path']} was encoded again since trial(s) "
                         f"{', '.join(sorted(other))} were measured on it (encode {other[t.trial_id]}, now "
                         f"{t.data_encode}): their rows in {study.output / RESULTS_FILE} are not this encode's; give "
                         f"the study another output to measure it afresh")


def check_fid_basis(study, results=None):
    """The FIDs in the rows of the study's trials (results: its results.parquet, loaded) must have been measured
    against what FID measures against now, while a trial of the study still measures new ones: a reference or held-out
    folder, the extractor's weights or the VAE that decodes latents, rewritten in place keeps its path, which is what
    ids hash. Rows before 2026-12-05 name no basis, and before 2026-12-07 no VAE. Returns warnings: what this machine
    cannot read now is not compared."""
    import json

    from scaling.results import recorded_trials

    if results is None or "fid_basis" not in results or not results.fid_basis.notna().any():
        return []
    unfinished = {t.trial_id for t in study.trials} - recorded_trials(study, results)[0]
    ours = {t.trial_id: t for t in study.trials if t.eval["fid"]}
    if not unfinished & set(ours):  # a run that only builds the report measures no FID to mix with theirs
        return []
    from core.evaluate import fid_basis_now  # torch, Ray: only for a study with measured FIDs
    from scaling.ray_trial import eval_config

    now, changed, warnings = {}, {}, []  # what FID reads -> the basis now (None: unreadable); trial id -> [changed]
    for trial_id, basis in zip(results.trial_id, results.fid_basis):
        t = ours.get(trial_id)
        if t is None or not isinstance(basis, str) or trial_id in changed:  # null: NaN or None, as pandas has it
            continue
        try:
            recorded = json.loads(basis)
        except ValueError:
            recorded = None
        if not isinstance(recorded, dict):  # not written by the recorder: nothing to compare
            continue
        reads = {k: t.eval[k] for k in ("reference", "heldout", "fid_samples", "feature_extractor",
                                        "feature_extractor_weights", "vae")}
        key = json.dumps([t.data, t.model_config["input_size"], reads], sort_keys=True)
        if key not in now:
            try:
                now[key] = json.loads(fid_basis_now(eval_config(t.to_dict(), study.output / "fid_cache"),
                                                    t.data["dataset"], t.data.get("path"), t.data.get("image_size"),
                                                    t.model_config["input_size"], t.eval["vae"]))
            except (OSError, ValueError) as e:
                now[key] = None
                warnings.append(f"{study.path}: eval: what FID is measured against cannot be read here ({e}); the "
                                f"FIDs in {study.output / 'results.parquet'} were not checked against it")
        # What the row recorded: a row from before the decoder was recorded (2026-12-07) is compared without it.
        if now[key] is not None and recorded != {k: now[key].get(k) for k in recorded}:
            changed[trial_id] = [k for k in ("reference", "heldout", "weights", "decoder")
                                 if k in recorded and recorded[k] != now[key].get(k)]
    if changed:
        trial_id = next(iter(changed))
        t, what = ours[trial_id], changed[trial_id] or ["extractor"]
        setting = {"reference": "reference", "heldout": "heldout", "weights": "feature_extractor_weights",
                   "extractor": "feature_extractor", "decoder": "vae"}[what[0]]
        files = "; ".join(_fid_files(t, part) for part in what)
        raise StudyError(f"{study.locate('eval.' + setting)}: eval.{setting}: what FID is measured against changed "
                         f"since trial(s) {', '.join(sorted(changed))} measured theirs ({files}), so their FIDs and "
                         f"those of the trials still to measure would not be comparable; put the earlier files back, "
                         f"or give the study another output to measure it afresh")
    return warnings


def _fid_files(t, part):
    """What a part of a fid_basis (core.evaluate.fid_basis) is, in a trial's words, and how it changed."""
    ev, data = t.eval, t.data
    if part == "reference":
        where = (f"eval.reference at {ev['reference']}" if ev["reference"] else f"the training images in {data['path']}"
                 if data["dataset"] == "imagefolder" else "the digits' training split")
        return f"{where}: other images, names, sizes or modification times"
    if part == "heldout":
        where = f"eval.heldout at {ev['heldout']}" if ev["heldout"] else "the digits' held-out split"
        return f"{where}: other images, names, sizes or modification times"
    if part == "weights":
        where = (f"eval.feature_extractor_weights at {ev['feature_extractor_weights']}"
                 if ev["feature_extractor_weights"] else f"the default weights of {ev['feature_extractor']}")
        return f"{where}: other contents"
    if part == "decoder":
        return f"eval.vae at {ev['vae']}, which decodes the samples: other files or contents"
    return f"eval.feature_extractor {ev['feature_extractor']}: another extractor"


def mlflow_ui_command(uri):
    """The command that shows a SQLite store in the MLflow UI, naming the mlflow beside this Python (.venv/bin)."""
    mlflow = Path(sys.executable).parent / "mlflow"
    if not mlflow.exists():
        mlflow = Path("mlflow")  # whichever the shell finds
    elif mlflow.is_relative_to(Path.cwd()):
        mlflow = mlflow.relative_to(Path.cwd())  # .venv/bin/mlflow, as the README has it
    return f"{shlex.quote(str(mlflow))} ui --backend-store-uri {shlex.quote(uri)}"


def sqlite_store(uri):
    """The file of an MLflow `sqlite:///` URI (its query left out: `?timeout=30`), else None."""
    parts = sqlite_parts(uri)
    return Path(parts[0]) if parts is not None else None


def moved_store(uri, ran_in, output):
    """The file in output of a SQLite store the study kept in the folder it ran in (ran_in), when output is that
    folder moved or copied elsewhere; else None. The driver's study.yaml names the store by the folder it ran in,
    whose store a replay of a copy would otherwise fill (and a replay of a moved folder make anew)."""
    store = sqlite_store(uri)
    ran_in = Path(ran_in).resolve()
    if store is None or ran_in == output or not store.resolve().is_relative_to(ran_in):
        return None
    return output / store.resolve().relative_to(ran_in)


def earlier_run(output):
    """(store, folder) of the study's previous run in output, as its study.yaml names them: the MLflow store it logged
    to (the same file in output where it was a SQLite store in its folder, which has moved since) and the folder it
    ran in; None where there is no such file."""
    import yaml

    try:
        earlier = yaml.safe_load((output / "study.yaml").read_text())
        uri, ran_in = earlier["tracking"]["mlflow_uri"], earlier["output"]
    except (OSError, ValueError, yaml.YAMLError, TypeError, KeyError):  # none, or not one this project wrote
        return None
    if not (isinstance(uri, str) and isinstance(ran_in, str)):
        return None
    moved = moved_store(uri, ran_in, output.resolve())
    return (f"sqlite:///{moved}" if moved is not None else uri), ran_in


def output_moved(output, ran_in, uri):
    """Whether the study's output was moved (or copied, with the SQLite store it keeps in it) from ran_in, the folder
    it last ran in, and its MLflow runs go with it. A copy that logs to a store outside it (a server) leaves them to
    the original, which still is where it ran."""
    if ran_in is None or Path(ran_in).absolute() == output.absolute():
        return False
    store = sqlite_store(uri)
    if store is not None and store.resolve().is_relative_to(output.resolve()):
        return True
    try:
        os.stat(ran_in)
    except (FileNotFoundError, NotADirectoryError):
        return True
    except OSError:  # a folder on the way that cannot be entered: it may be there
        pass
    return False


def same_store(a, b):
    """Whether two MLflow tracking URIs name one store (SQLite files compared by their resolved paths)."""
    file_a, file_b = sqlite_store(a), sqlite_store(b)
    if file_a is not None and file_b is not None:
        return file_a.resolve() == file_b.resolve()
    return a.rstrip("/") == b.rstrip("/")


def sqlite_open_problem(uri):
    """Why SQLite cannot open or create the store of a `sqlite:///` URI (MLflow would retry it for minutes), or None;
    a store made by the check is removed again."""
    import sqlite3

    from core.writable import write_problem

    store = sqlite_store(uri)
    if store is None:
        return None
    try:
        if not store.parent.is_dir():  # a study's output, say, made at its start: its folders must be makeable
            return write_problem(store.parent)
        made = not store.exists()
        sqlite3.connect(f"{store.as_uri()}?mode=rwc", uri=True).close()  # opens the file, reads nothing
    except OSError as e:  # a folder on the way that cannot be entered
        return e.strerror
    except sqlite3.Error as e:
        return str(e)
    if made:
        store.unlink(missing_ok=True)
    return None


def check_report_dir(study, given):
    """The folder the report will replace: new, empty or an earlier report (never the study's own output, say; the
    default folder not another output's report), checked before launch rather than after the study's hours of
    training; returns it."""
    from scaling.report_folder import check_report_destination, check_report_source, default_report_dir

    if given == "":  # an unset variable, say: not the default folder
        raise StudyError(f"--report-dir is empty; give a folder, or leave the flag out for "
                         f"{default_report_dir(study.name)}")
    path = Path(given) if given is not None else default_report_dir(study.name)
    flag = "--report-dir" if given is not None else "the report folder"
    try:
        target = check_report_destination(path)
        if given is None:  # the same study of another output (--set output=...) has the same default folder
            check_report_source(path, study.output / "results.parquet", "--report-dir")
    except ValueError as e:
        raise StudyError(f"{flag} {e}") from None
    # New or empty now, it would hold the output once the study writes it, and the report would then refuse it.
    report, out = Path(os.path.realpath(target)), Path(os.path.realpath(study.output))
    if report == out or report in out.parents:
        raise StudyError(f"{flag} {path}: {'is' if report == out else 'holds'} the study's output folder "
                         f"{study.output}; a report replaces its folder whole: give another")
    return path


def check_output(study, results=None):
    """The output folder must be writable and have room for the checkpoints of the trials still to train, before
    launch. results: the study's results.parquet, loaded (None: none yet)."""
    out = study.output
    try:
        existing = next(p for p in [out, *out.parents] if p.exists())
        dangling = next((p for p in [out, *out.parents] if p.is_symlink() and not p.exists()), None)
    except OSError as e:  # a folder on the way that cannot be entered
        raise StudyError(f"{study.locate('output')}: output: {out} is not writable ({e.strerror}: {e.filename})") from None
    if dangling is not None:  # mkdir would meet the link where the folder goes
        raise StudyError(f"{study.locate('output')}: output: {dangling} is a link to {os.readlink(dangling)}, which does not "
                         f"exist")
    if not existing.is_dir():
        raise StudyError(f"{study.locate('output')}: output: {out} is not a folder ({existing} is a file)")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise StudyError(f"{study.locate('output')}: output: {out} is not writable ({existing} does not allow writing)")
    from scaling.results import recorded_trials

    finished = recorded_trials(study, results)[0] if results is not None else set()
    # A trial to resume holds some of its checkpoints already: room for the rest, and for the one it writes next.
    needed = MIN_FREE_BYTES + sum(
        checkpoint_bytes(t) * max(checkpoints_on_disk(t) - checkpoints_held(out, t.trial_id), 1)
        for t in study.trials if t.trial_id not in finished)
    free = shutil.disk_usage(existing).free
    if free < needed:
        raise StudyError(f"{study.locate('output')}: output: {out} has {free / 2**30:.2f} GiB free; the study's checkpoints "
                         f"need about {needed / 2**30:.2f} GiB")


def check_checkpoint_processes(study, results=None):
    """Refuse a study whose unfinished trials' checkpoints were written by another number of processes under ZeRO 1-3
    (the optimizer's states are in that many shards): each such trial would start its workers, load its data, fail
    on its checkpoint, and again for each of Train's retries. ZeRO-0 resumes on any number. results: as check_output's."""
    from scaling.results import recorded_trials
    from scaling.trial_storage import latest_trainer_state

    finished = recorded_trials(study, results)[0] if results is not None else set()
    workers = study.raw["resources"]["workers_per_trial"]
    for t in study.trials:
        state = None if t.trial_id in finished else latest_trainer_state(study.output, t.trial_id)
        if state and state.get("zero_stage", 0) > 0 and state.get("world_size") not in (None, workers):
            raise StudyError(
                f"{study.locate('resources.workers_per_trial')}: resources.workers_per_trial: trial {t.trial_id}'s "
                f"checkpoint at step {state['step']} was written by {state['world_size']} processes with ZeRO-"
                f"{state['zero_stage']}, whose optimizer states do not resume on {workers}: set workers_per_trial to "
                f"{state['world_size']} until it finishes, or delete "
                f"{ray_storage(study.output) / train_run_name(t.trial_id)} to train it again from step 0")


def passed_milestones(study, results=None):
    """Warnings for the unfinished trials whose latest checkpoint is past a milestone without an ok row (rows removed
    by hand): such a trial fails as soon as it resumes from it (scaling.ray_trial.MilestonePassed). A warning, not a
    refusal: Ray may resume from an earlier one, its latest registered (a driver killed while it wrote a milestone's
    row, with later checkpoints saved but not yet reported, or a persist cut short). results: as check_output's."""
    from scaling.results import recorded_trials
    from scaling.trial_storage import checkpoint_step, passed_milestones_message

    finished = recorded_trials(study, results)[0] if results is not None else set()
    warnings = []
    for t in study.trials:
        if t.trial_id in finished:
            continue
        step = checkpoint_step(study.output, t.trial_id)
        rows = results[results.trial_id == t.trial_id] if results is not None else None
        ok = set() if rows is None else set(rows[rows.status == "ok"].step)
        passed = [m for m in t.milestones if m < step and m not in ok]
        if passed:
            message = passed_milestones_message(t.to_dict(), passed, step, ray_storage(study.output))
            warnings.append(f"{message}; it fails if it resumes from that checkpoint (Ray's latest registered one)")
    return warnings


def checkpoints_on_disk(trial):
    """The most checkpoints a trial holds at once: those it keeps and the one being written, or as many as it writes
    (at each milestone and every ckpt_every steps), if fewer."""
    every, last = trial.train["ckpt_every"], trial.milestones[-1]
    written = last // every + sum(1 for m in trial.milestones if m % every)
    return min(trial.train["keep_checkpoints"] + 1, written)


def checkpoint_bytes(trial):
    """Rough size of one checkpoint: fp32 weights, AdamW's two moments, the EMA (bf16 adds a copy)."""
    per_param = 16 + (2 if trial.train["precision"] == "bf16" else 0)
    return trial.params * per_param


def check_reachable(address, named="--address"):
    """Fail fast on a cluster address nothing listens on (ray.init would wait for minutes); named: where it came
    from (--address, or RAY_ADDRESS)."""
    if address == "":  # an unset variable, say: not a local Ray where a cluster was meant
        raise StudyError(f"{named} is empty; give the head node's HOST:PORT or auto, or leave the flag out for a local "
                         "Ray of the study's own")
    if address is None or address in ("auto", "local"):
        return
    if address.lower().startswith(("http://", "https://")):
        raise StudyError(f"{named} {address}: an HTTP address (the dashboard's, which `ray job submit` takes); give the "
                         "head node's HOST:PORT (its GCS, 6379 unless its `ray start --head --port` says otherwise)")
    if "://" in address:  # ray.init connects to any SCHEME://... through Ray Client
        raise StudyError(f"{named} {address}: Ray Client ({address.split('://', 1)[0]}://) is not supported: under it "
                         "Tune runs on the cluster, and the driver's recorder (Parquet, MLflow) would see none of the "
                         "trials; give the head node's GCS address HOST:PORT (6379 unless its `ray start --head "
                         "--port` says otherwise), or submit the driver with `ray job submit`")
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():  # as ray.init, which takes no default port
        raise StudyError(f"{named} {address}: expected HOST:PORT (the head node's, 6379 unless its `ray start "
                         f"--head --port` says otherwise) or auto")
    if not 0 < int(port) < 65536:
        raise StudyError(f"{named} {address}: port {port} is out of range (1-65535)")
    try:
        with socket.create_connection((host, int(port)), timeout=5) as sock:
            other = answers_but_not_grpc(sock)
    except (OSError, ValueError) as e:
        raise StudyError(f"{named} {address}: cannot reach a Ray cluster there ({e})") from e
    if other:  # ray.init would wait for it for minutes
        raise StudyError(f"{named} {address}: a server answers there that is not a Ray cluster's GCS (the dashboard's "
                         "port, 8265?); give the head node's HOST:PORT of `ray start --head --port` (6379 by default)")


def answers_but_not_grpc(sock):
    """Whether the server on sock answers the start of an HTTP/2 connection with anything but HTTP/2's settings, as
    Ray's GCS (gRPC) answers it: an HTTP/1 server (the dashboard) says "HTTP/1.0 400". One that says nothing within
    the socket's timeout, or closes (TLS, say), is not judged."""
    preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])  # and an empty SETTINGS frame
    reply = b""
    try:
        sock.sendall(preface)
        while len(reply) < 4:  # a frame's length (3 bytes), then its type
            more = sock.recv(4 - len(reply))
            if not more:
                break
            reply += more
    except OSError:
        return False
    return len(reply) == 4 and reply[3] != 4  # 4: SETTINGS


def tracking_named_by(study):
    """What named the study's MLflow store: its file's (or --set's) tracking.mlflow_uri, MLFLOW_TRACKING_URI, or
    neither (the output's own SQLite store)."""
    if study.given("tracking.mlflow_uri"):
        return f"{study.locate('tracking.mlflow_uri')}: tracking.mlflow_uri"
    return "MLFLOW_TRACKING_URI" if os.environ.get("MLFLOW_TRACKING_URI") else "the output's own store"


def check_tracking_server(study):
    """An MLflow server named by the study or MLFLOW_TRACKING_URI must answer before launch: the
    study's runs are created up front, and a server that goes away later only delays logging. The
    study's experiment must not be a deleted one (MLflow refuses runs in it)."""
    uri = study.raw["tracking"]["mlflow_uri"]  # the study's, else MLFLOW_TRACKING_URI's, else SQLite
    where = tracking_named_by(study)
    from scaling.tracking import (DATABASE_SCHEMES, shown_uri, store_scheme, unreachable_database, unreachable_server,
                                  unsupported_store)

    problem = unsupported_store(uri)
    if problem:
        raise StudyError(f"{where}: {problem}")
    scheme = store_scheme(uri)
    if scheme in DATABASE_SCHEMES and scheme != "sqlite":
        problem = unreachable_database(uri)
        if problem:
            raise StudyError(f"{where}: {problem}")
    elif uri.startswith(("http://", "https://")):
        problem = unreachable_server(uri)  # as MLflow's client reaches it: its credentials and TLS settings
        if problem:
            raise StudyError(f"{where}: no MLflow tracking server answers at {shown_uri(uri)} ({problem})")
    else:
        problem = sqlite_open_problem(uri)
        if problem:
            raise StudyError(f"{where}: MLflow cannot use the store {shown_uri(uri)} ({problem})")
    check_experiment(study, uri)


def check_experiment(study, uri):
    """The study's experiment at uri must not be a deleted one: the driver would fail on it after Ray's start."""
    from scaling.tracking import deleted_experiment, store_scheme

    store = sqlite_store(uri)
    if (store is not None and not store.exists()) or store_scheme(uri) in ("", "file"):
        return  # a store the driver makes: no experiment yet (opening a file store would make its folders)
    experiment = study.raw["tracking"]["experiment"]
    try:
        problem = deleted_experiment(uri, experiment)
    except Exception:  # the store answered the checks above; any other trouble shows when the driver opens it
        return
    if problem:
        where = (f"{study.locate('tracking.experiment')}: tracking.experiment" if study.given("tracking.experiment")
                 else f"{study.path}: tracking.experiment (the study's name)")
        raise StudyError(f"{where}: {problem}")


@sigterm_interrupts()  # the whole run, Ray's shutdown at its end too: SIGTERM unwinds it (143)
def run_study(study, address, build_report=True, report_dir=None, named="--address"):
    """Launch the unfinished trials on Ray, record everything, build the report (named: where address came from)."""
    began = time.time()  # the study's wall time, and its efficiency, count Ray's start too
    import ray

    from scaling.ray_env import local_ray_options, study_runtime_env
    from scaling.results import recorded_trials, remove_unfinished_writes

    logging.basicConfig(level=logging.WARNING)
    # Parquet and MLflow are the records; Tune's own CSV/JSON/TensorBoard files would be a third copy.
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    # Without those files Tune's end-of-run analysis warns, per trial, that it found none: noise.
    logging.getLogger("ray.tune.analysis.experiment_analysis").setLevel(logging.ERROR)
    # A stopped study resumes by running the same command (the driver says so), not by Tuner.restore.
    logging.getLogger("ray.tune.tune").addFilter(
        lambda record: "Tuner.restore(" not in record.getMessage())
    # The lock is taken before Ray starts: a second run of a running study exits at once, without a local Ray of its
    # own. Its descriptor is not inherited (Python opens descriptors close-on-exec), so Ray's processes never hold it.
    out = study.output
    made = [p for p in (out, *out.parents) if not p.exists()]  # the folders this run makes, deepest first
    out.mkdir(parents=True, exist_ok=True)
    new_lock = not (out / OUTPUT_LOCK).exists()  # made by this run: it goes with the run if nothing starts
    lock = lock_output(out)
    if lock is None:
        print(f"error: {output_in_use(study)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        remove_unfinished_writes(out)  # before any write of this run's: none is under way
        finished = recorded_trials(study)[0] >= {t.trial_id for t in study.trials}
        if not address and finished:
            # Every trial finished: the run only catches MLflow up and builds the report, with no local Ray to start.
            # (A cluster named is still reached: an address that answers none is refused, finished study or not.)
            with sigterm_interrupts():
                return _run_trials(study, build_report, report_dir, began, capacity=None)
        try:
            runtime_env = study_runtime_env()
            with ray_exit_as_terminated(), sigterm_handler_kept():
                if address:
                    try:
                        ray.init(address=address, log_to_driver=False, runtime_env=runtime_env)
                    except ConnectionError as e:  # "auto" with no `ray start` here, or a cluster gone since the check
                        raise StudyError(f"{named} {address}: {e}") from None
                else:
                    ray.init(runtime_env=runtime_env, **local_ray_options())
                with sigterm_interrupts():
                    # Nothing to train (a finished study, its cluster reached only to check that it answers): what the
                    # trials would need of the cluster, and of its storage, is not asked of it.
                    capacity = None if finished else check_capacity(study, local=not address)
                    if address and not finished:  # a local Ray is one node
                        check_shared_storage(study)
        except BaseException as e:  # nothing was written yet: the folders made for it go (a Ctrl-C, Ray's failure)
            if new_lock:  # its lock file too (a driver that opened it meanwhile found it held, and exits)
                (out / OUTPUT_LOCK).unlink(missing_ok=True)
            for folder in made:
                with contextlib.suppress(OSError):  # empty unless another process wrote there meanwhile
                    folder.rmdir()
            if not isinstance(e, StudyError):
                raise
            print(f"error: {e}", file=sys.stderr)
            ray.shutdown()
            return EXIT_BAD_INPUT
        with sigterm_interrupts():
            return _run_trials(study, build_report, report_dir, began, capacity)
    finally:
        # Ray first where an error left it up (a second Ctrl-C, a driver's error): its trials' workers may still save
        # checkpoints, and a driver started once the lock is free would meet them. Then the lock goes with the
        # descriptor (and with the process, however it ends).
        try:
            if ray.is_initialized():
                ray.shutdown()
        finally:
            os.close(lock)


@contextlib.contextmanager
def sigterm_handler_kept():
    """The SIGTERM handler before the block put back after it: ray.init sets its own (sys.exit(15), for its atexit
    shutdown), which outlived it, so that a SIGTERM as the driver shut Ray down at the study's end exited 15, not 143
    (run_study's sigterm_interrupts unwinds it instead, its finally shutting Ray down)."""
    if threading.current_thread() is not threading.main_thread():  # signals reach only the main thread
        yield
        return
    previous = signal.getsignal(signal.SIGTERM)
    try:
        yield
    finally:
        if previous is not None:  # None: a handler set outside Python, which cannot be put back
            signal.signal(signal.SIGTERM, previous)


class Capacity(NamedTuple):
    """What a study's trials are packed into (max_concurrent_trials, workers_per_node)."""
    resources: dict  # the cluster's, or the most its autoscaler lets them grow to
    nodes: list  # the resources of each node up, and of each node type the autoscaler may add
    counts: list  # how many of each of nodes there may be (UNLIMITED: no limit)
    unsaid_nodes: bool = False  # an autoscaler may add nodes it does not describe


def shown_study(study):
    """The resolved study as the MLflow artifact every reader of the store sees: a password in a URI (the tracking
    store's, from MLFLOW_TRACKING_URI) shown as *** (<output>/study.yaml keeps it: the replay logs with it)."""
    from scaling.tracking import shown_uri

    return shown_uri(study.resolved_yaml())


def check_capacity(study, local=False):
    """Check the study's resources against the cluster, or against what its autoscaler may grow it to where one runs
    (check_cluster; a local Ray never autoscales); the Capacity its trials are packed into."""
    import ray

    from scaling.autoscaler_limits import autoscaler_limits, grown

    now = ray.cluster_resources()
    nodes = [n["Resources"] for n in ray.nodes() if n["Alive"]]
    limits = None if local else autoscaler_limits()
    if limits is None:
        check_cluster(study, now, nodes)
        say_more_than_fit(study, now, nodes, local)
        if not local:
            say_held_elsewhere(study, now, nodes)
        return Capacity(now, nodes, [1] * len(nodes))
    if limits.known:
        capacity = grown(now, limits)
        # A node up of a type counted twice: errs towards holding more. Limits without counts: one node each.
        counts = [1] * len(nodes) + list(limits.node_counts or [1] * len(limits.node_types))
        check_cluster(study, capacity, nodes + limits.node_types, autoscaled=True, counts=counts)
        return Capacity(capacity, nodes + limits.node_types, counts)
    # An autoscaler that says it runs, not what it may add: a trial the nodes up cannot hold may be held by one it adds,
    # so the check warns rather than refuses; trials are packed into what is up (more trials at once than the cluster
    # ever holds would each start processes that wait).
    unpublished = "the cluster autoscales, and its autoscaler does not publish what it may add"
    try:
        check_cluster(study, now, nodes)
    except StudyError as e:
        print(f"warning: {e}; {unpublished}: the study goes on, its trials waiting for nodes that hold them (for ever "
              f"if none is added)", file=sys.stderr)
    if not study.raw["resources"]["max_concurrent_trials"]:
        print(f"note: {unpublished}: {unsaid_concurrency(study, now, nodes)}", file=sys.stderr)
    return Capacity(now, nodes, [1] * len(nodes), unsaid_nodes=True)


def say_more_than_fit(study, now, nodes, local):
    """A warning where resources.max_concurrent_trials asks for more trials at once than a cluster without an
    autoscaler (or the study's own Ray) holds: the others wait in Ray's placement, each with its Tune actor and Train
    controller, their wait counted in their start-up. The value stands: nodes may still join by hand."""
    asked = study.raw["resources"]["max_concurrent_trials"]
    fit = trials_that_fit(study, now, nodes)
    if not asked or asked <= fit:
        return
    print(f"warning: {study.locate('resources.max_concurrent_trials')}: resources.max_concurrent_trials: {asked} "
          f"trials at once, and {'this machine' if local else 'the cluster'} holds {fit} of them (each worker whole "
          f"on one node): the other {asked - fit} wait for room, their wait counted in their start-up", file=sys.stderr)


def unsaid_concurrency(study, now, nodes):
    """How many trials run at once where an autoscaler does not say what it may add (what the nodes up hold, at least
    one: each trial waiting beyond those would start a Tune actor and a Train controller on the head for nothing), and
    the setting for more, for the note."""
    res = study.raw["resources"]
    setting = "set resources.max_concurrent_trials to the trials the cluster holds at its largest"
    held = trials_that_fit(study, now, nodes)
    if not held:
        return (f"the nodes up hold none of the study's trials, so 1 runs at once, its wait asking the autoscaler "
                f"for a node; for more at once, {setting} (the trials a node it adds holds, times the nodes it may "
                f"add)")
    worker, workers = worker_request(res), res["workers_per_trial"]
    best = max(nodes, key=lambda node: node_holds(node, worker))  # held: some node holds a worker
    per_node = node_holds(best, worker)
    kind = " and ".join(f"{best.get(r, 0.0):g} {r}s" for r in worker)
    example = (f"e.g. {per_node // workers} for each node like one up of {kind}" if per_node % workers == 0
               else f"e.g. the workers its nodes hold ÷ {workers}, a node like one up of {kind} holding {per_node}")
    return f"{held} trial(s) at once, what the nodes up hold; for more, {setting} ({example})"


def say_held_elsewhere(study, now, nodes):
    """A note where other work on a shared cluster holds resources the study's trials would take: trials are packed
    into the cluster's resources (those others free later go to the study), and the trials beyond what is free now
    wait for them, their wait counted in their start-up."""
    import ray

    if study.raw["resources"]["max_concurrent_trials"]:
        return
    free = ray.available_resources()
    at_once, fit_now = max_concurrent_trials(study, now, nodes), max_concurrent_trials(study, free)
    if fit_now >= at_once:
        return
    held = ", ".join(f"{now.get(r, 0) - free.get(r, 0):g} of its {now[r]:g} {r}s" for r in ("GPU", "CPU")
                     if now.get(r) and free.get(r, 0) < now[r])
    print(f"note: other work on the cluster holds {held} now: {at_once} trial(s) at once, of which {fit_now} fit in "
          f"what is free; the others wait for it (resources.max_concurrent_trials sets fewer)", file=sys.stderr)


def check_shared_storage(study):
    """StudyError when a node of the cluster does not see the output, data.path or an eval file the trials read,
    where the driver sees them (scaling.shared_storage); a warning when a node did not answer in time."""
    from scaling.shared_storage import CHECK_TIMEOUT_S, output_marker, unseen_paths

    ev = study.raw["eval"]
    read = {"data.path": study.raw["data"]["path"],
            **{f"eval.{k}": ev[k] for k, used in eval_files_read(ev).items() if used},
            "Inception-v3's weights in torch-fidelity's cache": cached_inception_weights(ev)}
    marker = output_marker(study.output)
    names = {str(marker): f"output ({study.output})", **{str(p): f"{k} ({p})" for k, p in read.items() if p}}
    try:
        unseen = unseen_paths(list(names))
    finally:
        marker.unlink(missing_ok=True)
    if unseen is None:
        print(f"warning: a node of the cluster did not answer within {CHECK_TIMEOUT_S} s: whether every node sees "
              f"the study's output and data is not known", file=sys.stderr)
    elif unseen:
        node, missing = next(iter(unseen.items()))
        more = f" (and {len(unseen) - 1} more node(s))" if len(unseen) > 1 else ""
        raise StudyError(f"{study.path}: node {node}{more} does not see {', '.join(names[p] for p in missing)}: every "
                         f"node of a multi-node study must see the study's files at the same path (shared storage), "
                         f"as Ray keeps the trials' checkpoints under {study.output / 'ray'}")


OUTPUT_LOCK = ".scaling-run.lock"  # the file in a study's output its running driver holds a lock on


def output_in_use(study):
    """The StudyError for an output whose lock another process holds (a running driver of the study, a replay)."""
    return StudyError(f"{study.locate('output')}: output: {study.output} is in use by another scaling.run of this "
                      f"study (its driver still runs) or a scaling.replay_mlflow of it; wait for it to end or stop it "
                      f"first")


def check_output_free(study):
    """Refuse an output whose lock another process holds, at once: a second driver of a running study would otherwise
    go through every check before launch (a reference folder's hashes, checkpoints read) and warn of what the first is
    doing meanwhile. A probe, let go at once: run_study takes the lock for good (lock_output)."""
    path = study.output / OUTPUT_LOCK
    try:
        probe = lock_file(path, create=False)  # None: held, or no file (no driver ever ran there)
        held = probe is None and path.is_file()
    except OSError:  # no folder that can be entered, storage that cannot lock: check_output and run_study say so
        return
    if probe is not None:
        os.close(probe)
    if held:
        raise output_in_use(study)


def lock_output(out):
    """An exclusive lock on the output folder (a descriptor to close), or None when another driver holds it.

    Two drivers on one output would train the same trials twice and overwrite each other's Parquet rows. The lock is a
    file's, which NFS can lock (a multi-node study's output is shared storage), not the folder's, which it cannot.
    """
    try:
        return lock_file(out / OUTPUT_LOCK)
    except OSError as e:  # storage that cannot lock (Lustre mounted noflock): run unguarded
        print(f"warning: cannot lock {out} ({e.strerror}); do not start a second run of this study beside this one",
              file=sys.stderr)
        return os.open(out, os.O_RDONLY)  # closed as a lock would be


def _run_trials(study, build_report, report_dir, began, capacity):
    """run_study's part under the output lock: MLflow runs, the Tune sweep, Parquet, the report (capacity: the
    trials' Capacity on the Ray started; None where every trial is finished and no Ray is)."""
    import ray
    from ray import tune

    from scaling.placement_group_watch import PlacementGroupWatch
    from scaling.progress import Progress
    from scaling.ray_env import start_study_actor, start_train_autoscaling_coordinator
    from scaling.ray_trial import trial_function
    from scaling.recorder import Recorder
    from scaling.results import CURVES_FILE, RESULTS_FILE, recorded_trials
    from scaling.tracking import StudyTracker, default_tracking_uri, move_artifact_locations, shown_uri
    from scaling.tune_relay import RelayMailboxes

    out = study.output
    uri = study.raw["tracking"]["mlflow_uri"] or default_tracking_uri(out)
    earlier, ran_in = earlier_run(out) or (None, None)
    new_store = earlier is not None and not same_store(earlier, uri)
    moved_from = ran_in if not new_store and output_moved(out, ran_in, uri) else None
    if moved_from is not None and sqlite_store(uri) is not None:
        # Its artifacts are in the output where it is now: MLflow would write new ones into the folder it left.
        import sqlite3

        try:
            move_artifact_locations(sqlite_store(uri), moved_from, out)
        except sqlite3.Error as e:
            print(f"warning: {sqlite_store(uri)}: its runs' artifacts stay located in {moved_from} ({e})",
                  file=sys.stderr)
    # An output with no record of a run (a new one, or one deleted to start the study afresh): runs that a store
    # outside it holds for its path are another study's, whose curve would hide this one's first points, and whose
    # milestones would get a second value each.
    fresh = not any((out / name).exists() for name in ("study.yaml", RESULTS_FILE, CURVES_FILE))
    tracker = StudyTracker(uri, study.raw["tracking"]["experiment"] or study.name, study.name, out,
                           moved_from=moved_from, find=not fresh)
    try:
        # A copy of an output whose runs stay the original's (a store outside it): a study run of its own, which its
        # finished trials are brought to as to a new store.
        copied = ran_in is not None and moved_from is None and Path(ran_in).absolute() != out.absolute()
        if not new_store:
            _write_atomic(out / "study.yaml", study.resolved_yaml())  # at once: a replay finds the runs by its folder
        tracker.log_text(tracker.parent_run_id, shown_study(study), "study.yaml")

        done, foreign = recorded_trials(study)
        if foreign:
            # A trial's id hashes everything that determines its result: an edited study file makes new
            # trials. The old ones' measurements are kept (never deleted), and the report shows them too.
            print(f"warning: {out / 'results.parquet'} also holds {len(foreign)} trial(s) that {study.path} no longer "
                  f"defines (it was edited since they ran); they stay there and in the report. Give the study another "
                  f"`output` to keep the two apart.", file=sys.stderr)
        todo = launch_order(t for t in study.trials if t.trial_id not in done)
        progress = Progress(study.trials, skipped=done)
        print(f"study {study.name}: {len(study.trials)} trials, {len(done)} already finished; output {out}")
        print(f"MLflow: {shown_uri(uri)}" + (f"   ({mlflow_ui_command(uri)})" if sqlite_store(uri) else ""))
        recorder = Recorder(study, tracker, progress)
        recorder.open_runs(t.trial_id for t in todo)  # now, while MLflow answers (checked before launch)
        if new_store:
            # The finished trials would be missing from it for good (a re-run skips them), and the report would not say.
            print(f"warning: {out} was tracked in MLflow at {shown_uri(earlier)} when it last ran; this run logs "
                  f"to {shown_uri(uri)} (named by {tracking_named_by(study)}). The finished trials' measurements are "
                  f"logged there from Parquet; the runs at {shown_uri(earlier)} stay as they are.", file=sys.stderr)
        # The runs a killed driver left open; finished trials' in a new store or study run.
        recorder.catch_up_runs(done, new_store or copied)
        if new_store:
            # Only now: a driver stopped before it has caught up (MLflow calls for every trial) finds the earlier store
            # named there again, and does it again.
            _write_atomic(out / "study.yaml", study.resolved_yaml())
    except BaseException as e:
        # A Ctrl-C, SIGTERM or MLflow's error while the runs are made or caught up (an MLflow call or more per trial):
        # the study's run, marked RUNNING as the tracker opened it, says it stopped.
        tracker.finish(tracker.parent_run_id, "FAILED" if interruption(e) is None else "KILLED")
        warn_unlogged(tracker, out)  # queued where the server is away: the study's next run ends it (a replay
        # ends it once every trial has ended; the trials left unfinished keep their runs open till then)
        raise
    try:
        if todo:
            res = study.raw["resources"]
            tuner_concurrency = min(len(todo), max_concurrent_trials(study, *capacity[:3]))
            # One relay mailbox actor and one placement-group watch for the whole study, where a fresh process
            # of each would start with every trial; named, so that the trials find them.
            services = f"{study.name}-{uuid.uuid4().hex[:8]}"
            run = {"output": str(out), "storage": str(ray_storage(out)), "fid_cache": str(out / "fid_cache"),
                   # Nodes an autoscaler adds unsaid may hold more of them than any up: as many as run at once.
                   "workers_per_node": workers_per_node(study, [] if capacity.unsaid_nodes else capacity.nodes,
                                                        tuner_concurrency),
                   "inception_weights": cached_inception_weights(study.raw["eval"]),
                   "resources": res, "keep_checkpoints": study.raw["train"]["keep_checkpoints"],
                   "relay_mailboxes": f"relay-{services}", "placement_group_watch": f"pg-watch-{services}"}
            start_train_autoscaling_coordinator()  # while the study's own actors start
            # Held until the sweep ends: an actor goes once no handle to it is left.
            study_actors = [start_study_actor(RelayMailboxes, run["relay_mailboxes"]),
                            start_study_actor(PlacementGroupWatch, run["placement_group_watch"])]
            recorder.tell_relay(study_actors[0])  # rows in Parquet and those to come: none is evaluated again
            tuner = tune.Tuner(
                # The Tune trial only waits on its TorchTrainer: it needs no CPU of its own (Tune wants
                # some non-empty request, so a token of memory stands in).
                tune.with_resources(trial_function, {"CPU": 0, "memory": 2 ** 20}),
                param_space={"trial": tune.grid_search([t.to_dict() for t in todo]), "run": run},
                # Reused Tune actors: a freed slot takes the next trial at once instead of after a fresh
                # process's start (12 s vs 0.2 s in benchmarks.packing); each trial still gets its own
                # Train controller and workers, so nothing of a trial's training outlives it.
                tune_config=tune.TuneConfig(max_concurrent_trials=tuner_concurrency, reuse_actors=True,
                                            trial_name_creator=lambda tr: tr.config["trial"]["trial_id"],
                                            trial_dirname_creator=lambda tr: tr.config["trial"]["trial_id"]),
                run_config=tune.RunConfig(name=f"sweep-{time.strftime('%Y%m%d-%H%M%S')}",
                                          storage_path=str(ray_storage(out)),
                                          # A lost node can take the trial's own actor and its Train controller
                                          # with it (Train cannot restart those): Tune then reruns the trial,
                                          # whose trainer resumes from its last checkpoint in storage.
                                          failure_config=tune.FailureConfig(max_failures=res["max_failures"]),
                                          callbacks=[recorder], verbose=0),
            )
            recorder.open_slots(tuner_concurrency)  # the trials' start-up is counted from here
            with sigterm_stops_the_study() as stopped_by:
                tuner.fit()
            for actor in study_actors:
                ray.kill(actor)
            slots = tuner_concurrency
    except BaseException as e:
        # A second Ctrl-C (Tune lets it through), a Ctrl-C or SIGTERM before Tune's loop, or the driver's own error:
        # the runs say the study stopped, rather than RUNNING for good.
        unfinished = [t.trial_id for t in todo if t.trial_id not in recorder.ended]
        end_runs(recorder, tracker, unfinished, "FAILED" if interruption(e) is None else "KILLED", retry=False)
        raise
    recorder.write()
    wall = time.time() - began
    print(progress.render())
    unfinished = [t.trial_id for t in todo if t.trial_id not in recorder.ended]
    if unfinished:
        # Tune returns early only when stopped (Ctrl-C, SIGTERM): what was measured is in Parquet, the
        # trials' checkpoints are in Ray's storage, and the same command resumes them. No report:
        # it would show a study that is not finished.
        end_runs(recorder, tracker, unfinished, "KILLED")
        print(f"interrupted after {wall:.0f} s: {len(unfinished)} of {len(study.trials)} trials unfinished; what "
              f"they measured is in {out / 'results.parquet'}. Run the same command again to resume them.",
              file=sys.stderr)
        ray.shutdown()
        return EXIT_INTERRUPTED[stopped_by[0] if stopped_by else signal.SIGINT]
    overhead = recorder.overhead_summary()
    if overhead:
        print(overhead)
    if todo:
        # Share of the trial slots' time spent training and evaluating (the rest: start-up, teardown, waiting).
        efficiency = recorder.busy_seconds(t.trial_id for t in todo) / (slots * wall)
        print(f"study efficiency: {efficiency:.0%} of {slots} trial slot(s) × {wall:.0f} s spent training or "
              "evaluating")
        # One step per driver run of the study (a resumed one's own figures, not a value over the first's).
        session = tracker.next_step(tracker.parent_run_id, "wall_time_s")  # None: the store did not say
        if session is not None:  # a guess would log this run's point as an earlier run's
            tracker.log_metrics(tracker.parent_run_id, {"wall_time_s": wall, "efficiency": efficiency}, session)
    tracker.flush(force=True)  # the server may be back: try now, whatever the retry interval
    failed = recorder.failed_count()
    tracker.finish(tracker.parent_run_id, "FAILED" if failed else "FINISHED")
    print(f"finished in {wall:.0f} s; results: {out / 'results.parquet'}")
    warn_unlogged(tracker, out)
    reported = not build_report or not (out / "results.parquet").exists() or report_after_study(out, report_dir)
    ray.shutdown()
    return EXIT_TRIALS_FAILED if failed or not reported else EXIT_OK


def report_after_study(out, report_dir):
    """Build the study's report into report_dir; False, with the error and how to build it later, where it cannot
    be (the study then exits 1: the report asked for is missing, though every result is in Parquet)."""
    from scaling.report import build_report as make_report

    try:
        path = make_report(out / "results.parquet", report_dir, processes=None)
    # ValueError: the folder changed during the study, or rows the report cannot place; OSError: a full disk; any
    # other: the report's own error, which leaves the study's results as they are.
    except Exception as e:
        if interruption(e) is not None:  # a Ctrl-C or SIGTERM as a C extension initialised (an ImportError): a stop
            raise
        said = str(e) if isinstance(e, (ValueError, OSError)) else f"{type(e).__name__}: {e}"
        print(f"error: no report: {said}; the results are in {out / 'results.parquet'}: build it with "
              f"python -m scaling.report {out} --out DIR", file=sys.stderr)
        return False
    print(f"report: {Path(path) / 'index.html'}")
    return True


def end_runs(recorder, tracker, unfinished, status, retry=True):
    """A study that stopped before its trials ended: the runs of those that started end KILLED, the study's with
    status (KILLED, or FAILED for the driver's own error). retry: try a server that is away once more now, whatever
    the retry interval (not after a second Ctrl-C, which should not wait on its timeouts)."""
    if not retry and tracker.pending:  # the server is away: queue these too rather than wait on it again
        tracker.retry_at = math.inf
    recorder.interrupted(unfinished)
    tracker.finish(tracker.parent_run_id, status)
    if retry:
        tracker.flush(force=True)
    warn_unlogged(tracker, recorder.study.output)


def warn_unlogged(tracker, out):
    """Say what did not reach MLflow, and how to log it from Parquet."""
    lost = [f"{len(tracker.pending)} calls not logged (MLflow did not answer)"] if tracker.pending else []
    lost += [f"{tracker.refused} calls refused by MLflow or failed for good (the warnings above name them; the "
             "replay logs measurements again, not sample grids)"] if tracker.refused else []
    if lost:
        print(f"warning: {'; '.join(lost)}. Log the study's measurements again from Parquet with: "
              f"python -m scaling.replay_mlflow {out}", file=sys.stderr)


@contextlib.contextmanager
def sigterm_stops_the_study():
    """SIGTERM (a batch scheduler's, `ray job stop`'s) stops the study as Ctrl-C does: Tune handles
    SIGINT by ending its trials and returning; it leaves SIGTERM to kill the driver at once.

    Yields the list of forwarded signals (empty when none came). Tune's SIGINT handler stays installed after a
    fit() that no signal ended; the block puts back the one before it, so that Ctrl-C during the report still
    interrupts the driver (exit 130) rather than reaching a Tune that no longer runs.
    """
    received = []
    if threading.current_thread() is not threading.main_thread():  # signals reach only the main thread
        yield received
        return
    previous_int = signal.getsignal(signal.SIGINT)

    def forward(signum, frame):
        received.append(signum)
        if signal.getsignal(signal.SIGINT) is previous_int:  # outside Tune's loop (its set-up, or after it)
            raise Terminated()
        os.kill(os.getpid(), signal.SIGINT)  # handled by Tune's handler, installed while it runs

    previous = signal.signal(signal.SIGTERM, forward)
    try:
        yield received
    finally:
        signal.signal(signal.SIGTERM, previous)
        signal.signal(signal.SIGINT, previous_int)


def _write_atomic(path, text):
    """path's text replaced whole, on disk before and after the rename (a replay finds the study's runs by it)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    fsync_file(tmp)
    os.replace(tmp, path)
    fsync_dir(path.parent)


if __name__ == "__main__":
    sys.exit(main())
