"""What a person watching a study sees: trials done / running / pending, each running trial's step and loss, an ETA."""
import sys
import time

from core.flops import training_compute

# A running trial silent this long says for how long: it may be evaluating, or waiting for a node to start its workers
# on, which Ray waits for without limit (an autoscaler's node, or one lost for good).
QUIET_S = 120.0


class Progress:
    """Progress of a study's trials, printed at most every `every` seconds."""

    def __init__(self, trials, skipped=(), every=10.0, stream=sys.stdout, clock=time.time):
        self.trials = {t.trial_id: t for t in trials}
        self.state = {t.trial_id: "done" if t.trial_id in skipped else "pending" for t in trials}
        self.step = {t.trial_id: (t.train["max_steps"] if t.trial_id in skipped else 0) for t in trials}
        self.loss, self.speed = {}, {}
        self.heard = {}  # trial_id -> when it started or last reported
        self.every, self.stream, self.clock = every, stream, clock
        self.start, self.last_print = clock(), 0.0
        self.start_compute = self.done_compute()

    def started(self, trial_id):
        self.state[trial_id] = "running"
        self.heard[trial_id] = self.clock()

    def resumed(self, trial_id, step):
        """Trial trial_id resumed from a checkpoint, reporting step first: this run's progress counts from there (the
        training up to it, done by earlier runs, made a resumed study's ETA minutes where hours remained)."""
        self.start_compute += self._compute(trial_id, step) - self._compute(trial_id, self.step[trial_id])
        self.step[trial_id] = step

    def update(self, trial_id, step, loss, images_per_s):
        self.step[trial_id] = step
        self.heard[trial_id] = self.clock()
        if loss is not None:
            self.loss[trial_id] = loss
        if images_per_s:
            self.speed[trial_id] = images_per_s

    def finished(self, trial_id, how):
        """Trial trial_id ended: how is results.trial_end's "ok", "diverged" (a result, not a failure) or "failed"."""
        self.state[trial_id] = {"ok": "done", "diverged": "diverged"}.get(how, "failed")
        self.maybe_print(force=True)

    def _compute(self, trial_id, step):
        t = self.trials[trial_id]
        return training_compute(t.gflops, t.train["batch_size"], step)

    def done_compute(self):
        return sum(self._compute(i, self.step[i] if self.state[i] != "done" else self.trials[i].train["max_steps"])
                   for i in self.trials)

    def eta_seconds(self):
        """Remaining training compute at the compute rate this run has achieved so far, overhead included."""
        elapsed = self.clock() - self.start
        progressed = self.done_compute() - self.start_compute
        remaining = sum(self._compute(i, self.trials[i].train["max_steps"]) for i in self.trials
                        if self.state[i] in ("pending", "running")) - sum(
            self._compute(i, self.step[i]) for i in self.trials if self.state[i] == "running")
        if progressed <= 0 or elapsed <= 0:
            return None
        return remaining / (progressed / elapsed)

    def render(self):
        counts = {s: sum(v == s for v in self.state.values())
                  for s in ("done", "running", "pending", "diverged", "failed")}
        eta = self.eta_seconds()
        now = self.clock()
        head = (f"[{_clock(now - self.start)}] trials: {counts['done']} done, {counts['running']} running, "
                f"{counts['pending']} pending" + "".join(f", {counts[s]} {s}" for s in ("diverged", "failed")
                                                          if counts[s])
                + (f" | ETA {_clock(eta)}" if eta is not None else ""))
        lines = [head]
        for i, s in self.state.items():
            if s == "running":
                t = self.trials[i]
                loss = f"loss {self.loss[i]:.4f}" if i in self.loss else "starting"
                speed = f", {self.speed[i]:.0f} img/s" if i in self.speed else ""
                quiet = now - self.heard[i]  # set by started(), as the state
                silent = f" | no report for {_clock(quiet)}" if quiet >= QUIET_S else ""
                lines.append(f"    {i:28} step {self.step[i]:>7}/{t.train['max_steps']:<7} {loss}{speed}{silent}")
        return "\n".join(lines)

    def maybe_print(self, force=False):
        if force or self.clock() - self.last_print >= self.every:
            print(self.render(), file=self.stream, flush=True)
            self.last_print = self.clock()


def _clock(seconds):
    seconds = int(seconds)
    return f"{seconds // 3600:d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
