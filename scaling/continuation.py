"""A trial that goes on from a recorded run of the same training: steps added to a study resume, not retrain; data
moved elsewhere does not retrain either.

A trial's id hashes its step counts and its data's path, so `sweep.steps: [..., 400000]` grown to
`[..., 400000, 800000]`, or `data.path` pointing at the same latents moved to another disk, names new trials. Under a
constant lr the longer trial trains the same weights as the recorded one up to its last step, and a moved latent
folder that records the same encode (core.latents.encode_id) holds the same data (scaling.study.training_lineage). So
such a trial takes the recorded trial's id instead: its rows, its MLflow run and its Ray Train run, whose latest
checkpoint it resumes from, evaluating only the milestones that have no row. It may do so when the run trained on
the same encode of the data and every one of its milestones before that checkpoint's step has an ok row there (one
at the step is evaluated on resume; one before cannot be any more: the weights of that step are gone); not when the
run diverged after the trial's last step (a straight run of it ends ok), nor from data elsewhere that cannot be known
to be the same (an image folder, a run that recorded no encode). A run whose rows already name the trial's steps is
the trial itself, continued before and stopped, or moved: it resumes as any unfinished trial does, or is finished.
Otherwise the trial trains anew under its own id.
"""
import dataclasses
import os
from pathlib import Path

from scaling.results import RESULTS_FILE, load_results, other_encode, row_config
from scaling.study import EVAL_PATHS, training_lineage
from scaling.trial_storage import checkpoint_step, ray_storage, train_run_name


@dataclasses.dataclass(frozen=True)
class RecordedRun:
    """A trial of results.parquet that the study no longer defines, as far as a continuation needs it."""

    trial_id: str
    ok_steps: frozenset  # steps with an ok row
    # The step its run would resume from: its latest checkpoint's (Ray's registered one, or a later one cut short:
    # at most this), 0 without one; for a diverged run, the step it diverged at.
    reached: int
    diverged: bool
    steps: tuple  # (max_steps, (milestones, ...)) it was last launched with
    data_encode: str  # the encode of data.path's latents it trained on (Trial.data_encode), None if not recorded
    data_path: str  # where its data was when it last ran (data.path; None for digits)
    eval_paths: dict  # where its eval section's files were (scaling.study.EVAL_PATHS)

    def refusal(self, trial):
        """Why the trial may not go on from this run, or None when it may."""
        path = trial.data["path"]
        if not same_place(self.data_path, path):
            if trial.data["dataset"] != "latents":
                return f"trained on {self.data_path}: an image folder moved cannot be told from other images"
            if None in (self.data_encode, trial.data_encode):
                read = "its rows name no encode" if self.data_encode is None else f"{path} could not be read"
                return f"trained on the latents in {self.data_path}, which cannot be matched to {path}'s ({read})"
            if self.data_encode != trial.data_encode:
                return (f"trained on other latents, in {self.data_path} (encode {self.data_encode}; {path} holds "
                        f"{trial.data_encode})")
            if not _encode_names_its_folder(path):
                return (f"trained on the latents in {self.data_path}, whose encode (written before 2026-12-05) cannot "
                        f"be told from another folder's of the same settings")
        elif other_encode(self.data_encode, trial.data_encode):
            return f"trained on another encode of {path} ({self.data_encode}, now {trial.data_encode})"
        if self.diverged and trial.milestones[-1] < self.reached:
            return f"diverged at step {self.reached}, after this trial's last step"
        if self.steps == (trial.train["max_steps"], tuple(trial.milestones)):
            return None
        missing = [m for m in trial.milestones if m < self.reached and m not in self.ok_steps]
        return f"is past step {_steps(missing)}, which it did not measure" if missing else None


def continue_recorded_runs(study, output=None, results=None):
    """Give each trial of the study that has no record of its own the id of a recorded run it continues (the one that
    reached furthest); returns one line per trial for the user, on what was continued or why not.

    output: the study's folder where it is now (a replay's, moved since), else study.output. results: its
    results.parquet, loaded (else read here).
    """
    output = Path(output or study.output)
    if results is None and not (output / RESULTS_FILE).exists():
        return []
    df = load_results(output / RESULTS_FILE) if results is None else results
    ours = {t.trial_id for t in study.trials}
    recorded, eval_moved = {}, {}  # lineage -> [RecordedRun]; the same by lineage without the eval files
    for trial_id, rows in df.groupby("trial_id", sort=True):
        if trial_id in ours:
            continue
        config = _latest_config(rows)
        lineages = _recorded_lineages(config)
        if lineages is not None:
            run = _recorded_run(output, trial_id, rows, config)
            recorded.setdefault(lineages[0], []).append(run)
            eval_moved.setdefault(lineages[1], []).append(run)
    lines, with_rows, taken = [], set(df.trial_id), set()  # taken: runs a trial goes on from (one trial per run)
    for i, trial in enumerate(study.trials):
        if trial.trial_id in with_rows or (ray_storage(output) / train_run_name(trial.trial_id)).exists():
            continue  # a run of its own (checkpoints without rows: started, stopped before its first milestone)
        runs = [r for r in recorded.get(training_lineage(trial.to_dict()), []) if r.trial_id not in taken]
        if not runs:  # a run of the same settings but its eval files' paths: the same files spelt otherwise go on
            elsewhere = [r for r in eval_moved.get(training_lineage(trial.to_dict(), eval_paths=False), [])
                         if r.trial_id not in taken]
            runs = [r for r in elsewhere if _same_eval_files(trial, r)]
            read_elsewhere = [r for r in elsewhere if _eval_files_moved(trial, r)]
            if not runs and read_elsewhere:
                run = max(read_elsewhere, key=lambda r: r.reached)
                lines.append(f"{trial.model}: trains from step 0 as {trial.trial_id}: recorded trial {run.trial_id} of "
                             f"the same settings had {', '.join(_eval_files_moved(trial, run))}; of the study's files "
                             f"only data.path's latents can be told the same elsewhere (put the others back to go on "
                             f"from it)")
            if not runs:
                continue
        fits = [r for r in runs if r.refusal(trial) is None]
        if fits:
            run = max(fits, key=lambda r: (r.reached, len(r.ok_steps), r.trial_id))
            taken.add(run.trial_id)
            study.trials[i] = dataclasses.replace(trial, trial_id=run.trial_id)
            moved = "" if same_place(run.data_path, trial.data["path"]) else (
                f"its latents moved from {run.data_path}, the same encode; ")
            if not run.reached:  # its rows and MLflow run are kept; the weights are trained again
                lines.append(f"{trial.model}: trains recorded trial {run.trial_id} again from step 0 ({moved}steps "
                             f"{_steps(run.ok_steps)} measured, no checkpoint left), under its id rather than as "
                             f"{trial.trial_id}")
                continue
            at = f"diverged at step {run.reached}" if run.diverged else f"checkpoint at step {run.reached}"
            lines.append(f"{trial.model}: continues recorded trial {run.trial_id} ({moved}steps "
                         f"{_steps(run.ok_steps)} measured, {at}) instead of training {trial.trial_id} from step 0")
        else:
            run = max(runs, key=lambda r: r.reached)
            lines.append(f"{trial.model}: trains from step 0 as {trial.trial_id}: recorded trial {run.trial_id} of the "
                         f"same settings {run.refusal(trial)}")
    return lines


def same_place(a, b):
    """Whether two paths name one place (spelt otherwise, or through a link); None is no path."""
    return a == b or (None not in (a, b) and os.path.realpath(a) == os.path.realpath(b))


def _encode_names_its_folder(path):
    """Whether the latents at path name the folder their encode was written in, which makes their encode id one of a
    kind (core.latents.encode_id); older encodes hash their settings alone."""
    from core.latents import read_meta  # imports torch: only for a trial whose latents moved

    try:
        return isinstance(read_meta(path).get("encoded_in"), str)
    except (OSError, ValueError):
        return False


def _same_eval_files(trial, run):
    """Whether a recorded run read the trial's eval files: each setting unset on both sides, or one place on both."""
    pairs = [(run.eval_paths.get(k), trial.eval.get(k)) for k in EVAL_PATHS]
    return all(a == b or (None not in (a, b) and same_place(a, b)) for a, b in pairs)


def _eval_files_moved(trial, run):
    """The eval files (scaling.study.EVAL_PATHS) a recorded run read elsewhere than the trial would, as
    "eval.vae at /old"; none where both name one place. A setting given on one side only is an edit, not a move."""
    return [f"eval.{k} at {run.eval_paths[k]}" for k in EVAL_PATHS
            if None not in (run.eval_paths.get(k), trial.eval.get(k))
            and not same_place(run.eval_paths[k], trial.eval[k])]


def _latest_config(rows):
    """A recorded trial's configuration, from its latest row (a dict; None when it has none that reads)."""
    configs = rows.sort_values("timestamp", na_position="first").config_json.dropna()  # an undated row is no later
    return row_config(configs.iloc[-1]) if len(configs) else None


def _recorded_lineages(config):
    """The training lineage of a recorded trial's configuration, with and without its eval files; None for none, or
    a row that predates a setting the lineage hashes."""
    try:
        return None if config is None else (training_lineage(config), training_lineage(config, eval_paths=False))
    except (KeyError, TypeError, AttributeError, ValueError):
        return None


def _recorded_run(output, trial_id, rows, config):
    ok = frozenset(int(s) for s in rows[rows.status == "ok"].step)
    diverged = rows[rows.status == "diverged"]
    reached = int(diverged.step.min()) if len(diverged) else checkpoint_step(output, trial_id)
    steps = (config["train"].get("max_steps"), tuple(config.get("milestones", ())))
    return RecordedRun(trial_id, ok, reached, bool(len(diverged)), steps, config.get("data_encode"),
                       config["data"].get("path"), {k: config["eval"].get(k) for k in EVAL_PATHS})


def _steps(steps):
    return ", ".join(str(s) for s in sorted(steps)) or "none"
