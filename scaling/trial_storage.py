"""Where a study keeps each trial's Ray Train run: its checkpoints, which a re-run of the study resumes from."""
import json
from pathlib import Path


def ray_storage(output):
    """The study's Ray storage folder (Tune's experiment and every trial's Train run)."""
    return Path(output) / "ray"


def train_run_name(trial_id):
    """A trial's Ray Train run name: a re-run of the study that names it again restores its latest checkpoint."""
    return f"train-{trial_id}"


def passed_milestones_message(trial, milestones, step, storage):
    """What to do about a trial (its dict) whose checkpoint at step is past milestones without a result."""
    axis = "their budgets from sweep.compute" if trial.get("budgets") else "those steps from sweep.steps"
    return (f"trial {trial['trial_id']}'s checkpoint at step {step} is past milestone(s) "
            f"{', '.join(map(str, milestones))} without a result, which it can no longer measure: drop {axis}, or "
            f"delete {Path(storage) / train_run_name(trial['trial_id'])} to train it again from step 0")


def _trainer_states(output, trial_id):
    """The trainer-state files of the checkpoints a trial's Train run holds in storage (one a checkpoint: complete)."""
    from core.checkpoint import STATE_FILE

    return (ray_storage(output) / train_run_name(trial_id)).glob(f"*/{STATE_FILE}")


def checkpoints_held(output, trial_id):
    """How many checkpoints a trial's Train run holds in storage."""
    return sum(1 for _ in _trainer_states(output, trial_id))


def checkpoint_step(output, trial_id):
    """The highest step of the checkpoints a trial's Train run holds in storage, 0 if none: a re-run of the trial
    resumes from it or, after a persist cut short that Ray never registered, from an earlier one, never a later."""
    state = latest_trainer_state(output, trial_id)
    return state["step"] if state else 0


def latest_trainer_state(output, trial_id):
    """The trainer state (core.checkpoint's) of the highest-step checkpoint a trial's Train run holds, with its "path";
    None if it holds none."""
    latest = None
    for path in _trainer_states(output, trial_id):
        try:
            state = json.loads(path.read_text())
            step = int(state["step"])
        except (OSError, ValueError, KeyError, TypeError):  # a folder cut short: Ray never registered it
            continue
        if latest is None or step > latest["step"]:
            latest = {**state, "step": step, "path": path.parent}
    return latest
