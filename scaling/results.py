"""The results tables: their Parquet schemas, atomic writing, and validated loading.

One row of results.parquet is one trial at one evaluation step. The orchestrator writes it; the
report and notebooks read it back with `load_results` and need nothing else. `recorded_trials`
says what a study's output already holds.
"""
import json
import os
import secrets
from importlib import resources
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from core.folder_swap import fsync_dir


RESULTS_FILE = "results.parquet"
CURVES_FILE = "loss_curves.parquet"
STATUSES = ("ok", "diverged", "failed")

RESULTS_SCHEMA = pa.schema([
    pa.field("study", pa.string()),  # study name from the YAML; names the report folder
    pa.field("trial_id", pa.string()),  # hash of everything that determines the trial's result (scaling.study);
    # a trial given more steps, or whose latents moved, keeps the id its first run had (scaling.continuation)
    pa.field("model", pa.string()),  # model name, e.g. "DiT-S/2"
    pa.field("size", pa.string()),  # model size, e.g. "S", "B", "L", "XL"
    pa.field("patch", pa.int32()),  # patch size p (tokens = (input / p)^2)
    pa.field("params", pa.int64()),  # parameter count, the frozen positional embedding included
    pa.field("gflops", pa.float64()),  # forward Gflops per image, paper convention (multiply-add = 1 flop)
    pa.field("batch_size", pa.int32()),  # global batch size (images per optimizer step)
    pa.field("step", pa.int64()),  # training step of this measurement
    pa.field("max_step", pa.int64()),  # the trial's final step
    pa.field("train_compute", pa.float64()),  # training compute so far in Gflops: gflops * batch_size * step * 3
    pa.field("train_loss", pa.float64()),  # training loss (diffusion objective), averaged over the last log window
    pa.field("val_loss", pa.float64()),  # loss on fixed images at fixed timesteps and noise (digits: held out)
    pa.field("val_mse", pa.float64()),  # the noise-prediction MSE term of val_loss alone
    pa.field("val_loss_ema", pa.float64()),  # val_loss of the EMA weights, those the samples come from
    pa.field("fid", pa.float64()),  # FID of generated samples against real images
    pa.field("fid_floor", pa.float64()),  # FID of held-out real images vs the reference (up to fid_samples of them)
    pa.field("kid", pa.float64()),  # kernel inception distance
    pa.field("precision", pa.float64()),  # improved precision (fidelity) of the samples
    pa.field("recall", pa.float64()),  # improved recall (coverage) of the samples
    pa.field("inception_score", pa.float64()),  # Inception Score of the samples
    pa.field("fid_samples", pa.int32()),  # number of generated images behind fid (FID is biased by the count)
    pa.field("feature_extractor", pa.string()),  # network FID's features come from, e.g. "inception-v3-compat"
    pa.field("fid_basis", pa.string()),  # what fid and fid_floor were measured against, JSON (core.evaluate.fid_basis):
    # digests of the reference and held-out images and of the extractor's weights; null in rows before 2026-12-05
    pa.field("sampler", pa.string()),  # sampler and its step count, e.g. "ddpm-250"
    pa.field("cfg_scale", pa.float64()),  # classifier-free guidance scale (1.0 = no guidance)
    pa.field("lr", pa.float64()),  # learning rate at this step
    pa.field("dataset", pa.string()),  # training dataset name
    pa.field("wall_time_s", pa.float64()),  # training wall time up to this step, evaluation excluded
    pa.field("eval_time_s", pa.float64()),  # wall time of this evaluation (sampling + FID; without FID, the grid's)
    pa.field("images_per_s", pa.float64()),  # training throughput, images per second over all workers
    pa.field("achieved_tflops", pa.float64()),  # training model TFLOP/s over all workers (3 passes of 2 flops a MAC)
    pa.field("mfu", pa.float64()),  # achieved_tflops / (train.peak_tflops × workers); null without peak_tflops
    pa.field("sample_images_per_s", pa.float64()),  # this evaluation's sampling speed, images per second
    pa.field("startup_s", pa.float64()),  # orchestration: the trial got its slot -> its first training step, in the
                                          # driver's run that measured this row (null when it trained no step)
    pa.field("teardown_s", pa.float64()),  # orchestration: the trial's last report -> its slot free again (null until
                                           # the trial ended in the driver's run that measured this row; null when it
                                           # failed)
    pa.field("status", pa.string()),  # "ok", "diverged" (loss went non-finite) or "failed" (crashed)
    pa.field("error", pa.string()),  # what went wrong when status is not "ok"
    pa.field("mlflow_run_id", pa.string()),  # the trial's MLflow child run
    pa.field("timestamp", pa.timestamp("us", tz="UTC")),  # when the row was recorded
    pa.field("config_json", pa.string()),  # the trial's full resolved configuration, JSON
])

LOSS_CURVES_SCHEMA = pa.schema([
    pa.field("study", pa.string()),  # study name
    pa.field("trial_id", pa.string()),  # trial id, as in results.parquet
    pa.field("model", pa.string()),  # model name, e.g. "DiT-S/2"
    pa.field("step", pa.int64()),  # training step
    pa.field("train_loss", pa.float64()),  # training loss over the log window ending at step
    pa.field("lr", pa.float64()),  # learning rate at step
    pa.field("images_per_s", pa.float64()),  # training throughput over the log window
    pa.field("achieved_tflops", pa.float64()),  # training model TFLOP/s over the log window
    pa.field("mfu", pa.float64()),  # achieved_tflops / (train.peak_tflops × workers); null without peak_tflops
])

# The columns the design document promises; a file without one of them is not a results table.
REQUIRED_COLUMNS = (
    "study", "trial_id", "model", "patch", "params", "gflops", "batch_size", "step", "train_compute",
    "train_loss", "val_loss", "fid", "fid_samples", "feature_extractor", "wall_time_s", "images_per_s",
    "status", "mlflow_run_id",
)


def to_table(rows_or_df, schema):
    """A pyarrow Table with exactly schema's columns; absent columns are null, unknown ones an error.

    rows_or_df: a list of dicts, a pandas DataFrame or a pyarrow Table.
    """
    table = rows_or_df
    if not isinstance(table, (pd.DataFrame, pa.Table)):
        table = pd.DataFrame(list(table))
    if isinstance(table, pd.DataFrame):
        table = pa.table({c: _arrow_column(table[c]) for c in table.columns})
    unknown = sorted(set(table.column_names) - set(schema.names), key=str)
    if unknown:
        raise ValueError(f"columns not in the schema: {', '.join(map(str, unknown))}")
    arrays = []
    for field in schema:
        if field.name not in table.column_names:
            arrays.append(pa.nulls(len(table), field.type))
            continue
        # Inferred, then cast safely: a float that is not a whole number must not become an int silently.
        array = table[field.name]
        try:
            arrays.append(array.cast(field.type, safe=True))
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
            raise ValueError(f"column {field.name!r} does not fit {field.type}: {e}") from None
    return pa.Table.from_arrays(arrays, schema=schema)


def _arrow_column(series):
    """A pandas column as Arrow with NaN and None as null; tz-aware times go through naive UTC because
    pyarrow's own conversion of them relies on a pandas API deprecated in pandas 3."""
    if isinstance(series.dtype, pd.DatetimeTZDtype):
        series = series.dt.tz_convert("UTC").dt.tz_localize(None)
    return pa.array(series.to_numpy() if series.dtype.kind == "M" else series, from_pandas=True)


def write_table(rows_or_df, path, schema):
    """Write rows (dicts or a DataFrame) to Parquet atomically: a reader sees the old file or the new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    table = to_table(rows_or_df, schema)
    # Named before it is made, unlike mkstemp's: a Ctrl-C or SIGTERM (raised in the driver) arriving as it is made,
    # before its name is known, would leave it. Opened as a plain new file: its mode is what the umask gives.
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "xb") as f:
            pq.write_table(table, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def remove_unfinished_writes(folder):
    """Remove the temporary files of write_table's writes into folder that a killed process left (SIGKILL, a lost
    machine): one per kill, never read. Only by the output's lock holder, before it writes (scaling.run.run_study)."""
    for name in (RESULTS_FILE, CURVES_FILE):
        for tmp in Path(folder).glob(f".{name}.*.tmp"):
            tmp.unlink(missing_ok=True)


def results_path(path):
    """The results.parquet a path names: the file itself or the study output folder holding it."""
    path = Path(path)
    if path.is_dir():
        path = path / RESULTS_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file")
    return path


def read_parquet(path):
    """A Parquet file as an Arrow table, read through one open handle.

    Given a path, pyarrow opens the file once for the footer and again for the pages; a writer's
    atomic replace in between would pair one version's footer with the next one's pages. An open
    handle keeps reading the version it opened. In this thread: Arrow's reader threads can outlive the read, and a
    process that exits right after it then aborts in their teardown (status 134, apache/arrow#34314; a CLI that
    refuses a file and exits 2 did in 15 runs of 60). These tables are small; threads would not speed them up.
    """
    with open(path, "rb") as f:
        return pq.read_table(f, use_threads=False)


def load_results(path, strict=False):
    """The results table at path (a results.parquet or a folder holding one) as a pandas DataFrame.

    Schema columns the file lacks beyond the required ones come back as nulls, so older files load. Columns the
    schema lacks are left out, so a newer file reads; strict=True refuses them instead, for a file a run rewrites
    (its next write would drop them).
    """
    path = results_path(path)
    table = _read_known_columns(path, RESULTS_SCHEMA, strict)
    missing = [c for c in REQUIRED_COLUMNS if c not in table.column_names]
    if missing:
        raise ValueError(f"{path}: missing required columns: {', '.join(missing)}")
    try:
        table = to_table(table, RESULTS_SCHEMA)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    df = table.to_pandas()
    bad = sorted(set(df.status.dropna()) - set(STATUSES))
    if bad:
        raise ValueError(f"{path}: unknown status values {bad}; expected one of {list(STATUSES)}")
    check_trial_rows(df, path)
    return df


def load_curves(path, strict=False):
    """The loss curves at path as a DataFrame, read and checked as load_results reads results (strict alike);
    ValueError naming the file."""
    table = _read_known_columns(path, LOSS_CURVES_SCHEMA, strict)
    try:
        df = to_table(table, LOSS_CURVES_SCHEMA).to_pandas()  # a column it lacks comes back null: refused below
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    check_trial_rows(df, path, CURVE_IDENTITY_COLUMNS)
    return df


def _read_known_columns(path, schema, strict):
    """The Parquet file at path as an Arrow table of its columns that schema names (load_results' rule for others)."""
    try:
        table = read_parquet(path)
    except (pa.ArrowException, OSError) as e:
        reason = " ".join(str(e).split())  # one line: the CLI prints it as its only error line
        raise ValueError(f"{path}: not a readable Parquet file ({reason})") from None
    # pandas' index, which to_parquet stores as a column once rows are removed: no data of the user's.
    index = {c for c in (table.schema.pandas_metadata or {}).get("index_columns", []) if isinstance(c, str)}
    unknown = ", ".join(str(c) for c in table.column_names if c not in schema.names and c not in index)
    if strict and unknown:
        raise ValueError(f"{path}: columns this version does not write: {unknown}; the study's next write would drop "
                         "them")
    return table.select([c for c in table.column_names if c in schema.names])


# What every row must hold: readers key measurements by trial and step (the driver's recorder by both, to replace a
# row rather than add one), and the report labels them by model.
IDENTITY_COLUMNS = {"trial_id": "trial id", "model": "model name", "step": "step",
                    "status": "status (ok, diverged or failed)"}
CURVE_IDENTITY_COLUMNS = {"trial_id": "trial id", "step": "step"}


def check_trial_rows(df, source, identity=IDENTITY_COLUMNS):
    """Refuse rows no study writes: one without its trial id, model or step, two different ones at one trial's step."""
    for col, what in identity.items():
        missing = df[col].isna().to_numpy()
        if missing.any():
            raise ValueError(f"{source}: column {col!r} is empty (null) in {missing.sum()} of {len(df)} rows "
                             f"({row_where(df, missing)}); every row needs its {what}")
    # The recorder keeps one row per (trial, step), never adding a second, so a file with two was put together
    # from several by hand. Exact copies say nothing new: the report counts them once, with a note.
    distinct = df.drop_duplicates()
    clash = distinct.duplicated(["trial_id", "step"], keep=False).to_numpy()
    if not clash.any():
        return
    first = distinct[clash].iloc[0]

    def at_first(d):
        return ((d.trial_id == first.trial_id) & (d.step == first.step)).to_numpy()
    rows = distinct[at_first(distinct)]
    differ = ", ".join(repr(c) for c in df.columns if rows[c].nunique(dropna=False) > 1)
    positions = np.flatnonzero(at_first(df))
    pairs = distinct[clash][["trial_id", "step"]].drop_duplicates()
    more = f"; {len(pairs) - 1} more trial and step pair(s) have such rows" if len(pairs) > 1 else ""
    listed = f"rows {', '.join(map(str, positions[:-1]))} and {positions[-1]}"
    raise ValueError(f"{source}: trial {first.trial_id} has {len(rows)} different rows at step {int(first.step)} "
                     f"({listed}; they differ in {differ}){more}; a study writes one row per trial and step: keep the "
                     "one that stands")


def row_where(df, mask):
    """The first row mask marks, as a reader finds it: its position and, where known, trial and step."""
    i = int(np.flatnonzero(mask)[0])
    row = df.iloc[i]
    where = f"{'the first: ' if mask.sum() > 1 else ''}row {i}"
    if pd.notna(row.trial_id):
        where += f", trial {row.trial_id}"
    if pd.notna(row.step):
        where += f", step {int(row.step)}"
    return where


def trial_end(milestones, statuses):
    """How a trial ended by its rows' statuses ({step: "ok", "diverged" or "failed"}): "ok" with every milestone ok
    (a failure after the last changes no result), "diverged" once it diverged (a result: a re-run skips it),
    "failed" after a failure (a re-run trains it again); None while it is unfinished."""
    if all(statuses.get(s) == "ok" for s in milestones):
        return "ok"
    return next((how for how in ("diverged", "failed") if how in statuses.values()), None)


def recorded_trials(study, results=None):
    """(finished, foreign): trial ids of the study whose results.parquet has an ok row at every milestone
    (whatever follows them: a failure after the last changes no result) or a diverged row, which a re-run
    skips, and trial ids it holds that the study file no longer defines (it was edited since they ran).
    results: its rows, loaded (else read here)."""
    path = study.output / RESULTS_FILE
    if results is None and not path.exists():
        return set(), set()
    df = load_results(path) if results is None else results
    finished = set()
    for t in study.trials:
        rows = df[df.trial_id == t.trial_id]
        if trial_end(t.milestones, dict(zip(rows.step, rows.status))) in ("ok", "diverged"):
            finished.add(t.trial_id)
    return finished, set(df.trial_id) - {t.trial_id for t in study.trials}


def measured_on_other_data(study, results=None):
    """{trial id: encode id} of the study's trials whose rows were measured on another encode of data.path's latents
    than the one there now (the rows' configuration names it: core.latents.encode_id); those written before it did,
    and data not read, are taken as the same. results: the study's results.parquet, loaded (else read here)."""
    path = study.output / RESULTS_FILE
    if results is None and not path.exists():
        return {}
    df = load_results(path) if results is None else results
    ours = {t.trial_id: t for t in study.trials}
    other = {}
    for trial_id, config_json in zip(df.trial_id, df.config_json):
        t = ours.get(trial_id)
        recorded = (row_config(config_json) or {}).get("data_encode")
        if t is not None and other_encode(recorded, t.data_encode):
            other[trial_id] = recorded
    return other


def row_config(config_json):
    """A row's config_json as the trial's configuration (a dict); None for none, or for text that is not one."""
    try:
        config = json.loads(config_json)
    except (TypeError, ValueError):
        return None
    return config if isinstance(config, dict) else None


def other_encode(recorded, now):
    """Whether two encode ids (core.latents.encode_id) name different encodes; None, unknown, is taken as the same."""
    return None not in (recorded, now) and recorded != now


def paper_results():
    """The DiT paper's Table 4 (12 models at 400K steps) as a results table of the study "dit_paper_table4"."""
    csv = resources.files("scaling") / "data" / "paper_table4.csv"
    with resources.as_file(csv) as f:
        paper = pd.read_csv(f, comment="#")
    df = paper.drop(columns=["depth", "hidden_size"]).assign(
        study="dit_paper_table4", trial_id=paper.model, max_step=paper.step,
        train_compute=paper.gflops * paper.batch_size * paper.step * 3,
        fid_samples=50_000, feature_extractor="inception-v3", sampler="ddpm-250", cfg_scale=1.0,
        dataset="ImageNet 256×256 (Peebles & Xie 2023, Table 4)", status="ok",
    )
    return to_table(df, RESULTS_SCHEMA).to_pandas()
