"""What the person who launched a sweep sees: a compact view of the trials (one line per ended trial, one status line),
while Ray's own output (trial tables, forwarded worker logs) goes to the launch's log file."""
from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from pathlib import Path

from ray.tune import Callback

from tracking import metrics
from tracking.private_apis import worker_logs_to


class SweepView(Callback):
    """The driver's compact view of a sweep: one line per ended trial and one status line (counts, running epochs,
    best so far, elapsed, ETA), rewritten in place on a terminal and printed at most every ``interval`` s otherwise."""

    def __init__(self, total: int, epochs: int, metric: str, mode: str, interval: float = 30.0):
        self.total, self.epochs, self.metric, self.mode, self.interval = total, epochs, metric, mode, interval
        self.start, self.last_status = time.time(), 0.0
        self.running: dict[str, int] = {}  # trial name -> epochs done
        self.ended = {"done": 0, "failed": 0, "pruned": 0}
        self.best: tuple[float, str] | None = None
        self.epoch_seconds: list[float] = []
        self.epochs_done = 0

    # --- Tune's hooks -------------------------------------------------------------------------

    def setup(self, **info) -> None:
        """Say at once what a Ctrl-C (or the SIGTERM the driver turns into one) does: Tune's own handler, installed by
        now, only logs to the launch log, and then waits up to 10 s for running trials to stop before Ray ends them."""
        handler = signal.getsignal(signal.SIGINT)
        if not callable(handler) or threading.current_thread() is not threading.main_thread():
            return

        def announce(signum, frame):
            out = console()
            out.write(("\r\033[K" if out.isatty() else "") + f"stopping: the sweep's state is saved; the {len(self.running)} running "
                      "trial(s) get up to 10 s to stop before Ray ends them\n")
            out.flush()
            handler(signum, frame)

        signal.signal(signal.SIGINT, announce)

    def on_trial_start(self, iteration: int, trials: list, trial, **info) -> None:
        self.running.setdefault(str(trial), 0)
        self.status()

    def on_trial_result(self, iteration: int, trials: list, trial, result: dict, **info) -> None:
        self.running[str(trial)] = int(result.get(metrics.EPOCH, 0))
        self.epochs_done += 1
        if "time_this_iter_s" in result:
            self.epoch_seconds.append(float(result["time_this_iter_s"]))
        value = result.get(self.metric)
        if isinstance(value, (int, float)) and (self.best is None or (value > self.best[0] if self.mode == "max" else value < self.best[0])):
            self.best = (float(value), str(trial))
        self.status()

    def on_trial_complete(self, iteration: int, trials: list, trial, **info) -> None:
        result = trial.last_result or {}
        tested = metrics.TEST_ACC in result
        self.ended["done" if tested else "pruned"] += 1
        self.epochs_done += self.epochs - int(result.get(metrics.EPOCH, 0))  # a pruned trial's remaining epochs will not run
        shown = "  ".join(f"{k}={result[k]:.4f}" for k in dict.fromkeys((self.metric, metrics.TEST_ACC)) if isinstance(result.get(k), (int, float)))
        what = "done" if tested else f"pruned at epoch {int(result.get(metrics.EPOCH, 0))}"
        self.line(f"[{self.count()}] {trial}  {what}  {shown}", trial)

    def on_trial_error(self, iteration: int, trials: list, trial, **info) -> None:
        self.ended["failed"] += 1
        self.line(f"[{self.count()}] {trial}  FAILED: {getattr(trial, 'error_file', '') or 'see the launch log'}", trial)

    # --- output -------------------------------------------------------------------------------

    def count(self) -> str:
        return f"{sum(self.ended.values())}/{self.total}"

    def line(self, text: str, trial) -> None:
        self.running.pop(str(trial), None)
        out = console()
        out.write(("\r\033[K" if out.isatty() else "") + text + "\n")
        self.status(force=out.isatty())

    def status(self, force: bool = False) -> None:
        out, now = console(), time.time()
        if not out.isatty() and not force and now - self.last_status < self.interval:
            return
        self.last_status = now
        pending = self.total - sum(self.ended.values()) - len(self.running)
        parts = [f"{self.ended['done']} done, {len(self.running)} running, {max(0, pending)} pending, {self.ended['failed']} failed, {self.ended['pruned']} pruned"]
        if self.running:
            parts.append("epochs " + " ".join(f"{e}/{self.epochs}" for e in list(self.running.values())[:6]) + (" ..." if len(self.running) > 6 else ""))
        if self.best:
            parts.append(f"best {self.metric} {self.best[0]:.4f} ({self.best[1]})")
        parts.append(f"{clock(now - self.start)} elapsed" + (f", ETA {clock(self.eta())}" if self.epoch_seconds else ""))
        text = f"sweep: {' | '.join(parts)}"
        out.write(f"\r\033[K{text}" if out.isatty() else text + "\n")
        out.flush()

    def eta(self) -> float:
        """Epochs left x the mean epoch time / the trials running side by side."""
        left = max(0, self.total * self.epochs - self.epochs_done)
        return left * sum(self.epoch_seconds) / len(self.epoch_seconds) / max(1, len(self.running))


def clock(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes // 60}h{minutes % 60:02d}m" if minutes >= 60 else f"{minutes}m{secs:02d}s"


CONSOLE: list = []  # the driver's real stdout while Ray's own output goes to the launch log (module state: never pickled)


def console():
    """Where the sweep view writes: the terminal saved before Ray's output was redirected, else stdout."""
    return CONSOLE[-1] if CONSOLE else sys.stdout


@contextlib.contextmanager
def ray_output_to(log: Path, enabled: bool = True):
    """Send everything this process writes to stdout and stderr (Ray's trial tables, forwarded worker logs, MLflow's
    links) to ``log``, at the file-descriptor level; the sweep view keeps writing to the real terminal."""
    if not enabled:
        yield
        return
    log.parent.mkdir(parents=True, exist_ok=True)
    worker_logs_to(log)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    terminal = os.fdopen(os.dup(saved[0]), "w", buffering=1)
    with open(log, "a") as sink:
        os.dup2(sink.fileno(), 1)
        os.dup2(sink.fileno(), 2)
        CONSOLE.append(terminal)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)
            CONSOLE.remove(terminal)
            terminal.write("\n" if terminal.isatty() else "")
            terminal.close()
